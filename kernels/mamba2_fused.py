"""Triton kernels for the Mamba-2 mixer's elementwise parts that PyTorch runs as many passes over
memory (autograd wrappers: ``sessa_scale/ops/mamba2_fused.py``; plain references: the PyTorch paths
of ``sessa_scale/models/mamba2.py``).

* Causal depthwise conv + SiLU over (B, T, C) with channels innermost (as the projections leave
  them): out[t, c] = silu(bias[c] + sum_k w[c, k] in[t - (K-1) + k, c]), zero inputs before t = 0.
  PyTorch runs it as transposes, a cuDNN conv over (B, C, T), a slice and a SiLU; its backward
  adds cuDNN's depthwise weight gradient. The backward here recomputes the pre-activations of the
  K output positions that read each input (K x K shifted loads, cache-resident) instead of storing
  them; the weight and bias gradients are per-program partial sums over T-tiles that the wrapper
  adds up (deterministic).
* Gated RMSNorm: out = h * rsqrt(mean_group(h^2) + eps) * weight with h = y * silu(z), per group
  of channels; one program per (block of rows, group), float32 inside, the inverse RMS kept for
  the backward (PyTorch: about ten float32 passes, recomputed in the backward under checkpointing).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _conv_pre(in_ptr, w_ptr, bias, t, c, cmask, T, s_t, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """bias + sum_k w[c, k] in[t - (K-1) + k, c] for a (BT, BC) tile, float32 (zero past the ends)."""
    acc = tl.zeros((BT, BC), dtype=tl.float32) + bias[None, :]
    for k in tl.static_range(K):
        src = t - (K - 1) + k
        m = ((src >= 0) & (src < T))[:, None] & cmask[None, :]
        v = tl.load(in_ptr + src[:, None] * s_t + c[None, :], mask=m, other=0.0).to(tl.float32)
        acc += v * tl.load(w_ptr + c * K + k, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit(do_not_specialize=["T"])
def conv_fwd_kernel(in_ptr, w_ptr, b_ptr, out_ptr, T, C, s_ib, s_it, s_ob, s_ot,
                    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """out = silu(causal depthwise conv(in)); in / out (B, T, C) with channel stride 1, w (C, K)
    contiguous, bias (C,). Grid (cdiv(T, BT), cdiv(C, BC), B)."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2).to(tl.int64)
    cmask = c < C
    bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    pre = _conv_pre(in_ptr + b * s_ib, w_ptr, bias, t, c, cmask, T, s_it, K, BT, BC)
    out = pre * tl.sigmoid(pre)
    tl.store(out_ptr + b * s_ob + t[:, None] * s_ot + c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(t < T)[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["T"])
def conv_bwd_kernel(in_ptr, w_ptr, b_ptr, dout_ptr, din_ptr, dw_ptr, db_ptr, T, C,
                    s_ib, s_it, s_gb, s_gt, s_db, s_dt,
                    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """din[t] = sum_j w[K-1-j] dpre[t + j] with dpre = dout * silu'(pre) recomputed; this program's
    partial sums dw[pid, c, k] = sum_t dpre[t] in[t - (K-1) + k] and db[pid, c] = sum_t dpre[t]
    (dw (P, C, K), db (P, C) float32, P = programs along B and T). Grid as conv_fwd_kernel."""
    pid_t = tl.program_id(0)
    t = pid_t * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    cmask = c < C
    bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    ip = in_ptr + b64 * s_ib
    din = tl.zeros((BT, BC), dtype=tl.float32)
    part = (b * tl.num_programs(0) + pid_t).to(tl.int64) * C
    for j in tl.static_range(K):
        pos = t + j
        pre = _conv_pre(ip, w_ptr, bias, pos, c, cmask, T, s_it, K, BT, BC)
        m = (pos < T)[:, None] & cmask[None, :]
        g = tl.load(dout_ptr + b64 * s_gb + pos[:, None] * s_gt + c[None, :], mask=m, other=0.0).to(tl.float32)
        s = tl.sigmoid(pre)
        dpre = g * s * (1.0 + pre * (1.0 - s))
        din += dpre * tl.load(w_ptr + c * K + (K - 1 - j), mask=cmask, other=0.0).to(tl.float32)[None, :]
        if j == 0:  # this tile's own positions: the weight and bias gradients
            tl.store(db_ptr + part + c, tl.sum(dpre, axis=0), mask=cmask)
            for k in tl.static_range(K):
                src = t - (K - 1) + k
                v = tl.load(ip + src[:, None] * s_it + c[None, :], mask=((src >= 0) & (src < T))[:, None] & cmask[None, :],
                            other=0.0).to(tl.float32)
                tl.store(dw_ptr + (part + c) * K + k, tl.sum(dpre * v, axis=0), mask=cmask)
    tl.store(din_ptr + b64 * s_db + t[:, None] * s_dt + c[None, :], din.to(din_ptr.dtype.element_ty),
             mask=(t < T)[:, None] & cmask[None, :])


@triton.jit
def _gated(y_ptr, z_ptr, row_y, row_z, c, cmask):
    y = tl.load(y_ptr + row_y + c, mask=cmask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row_z + c, mask=cmask, other=0.0).to(tl.float32)
    sz = tl.sigmoid(z)
    return y, z, sz, y * z * sz


@triton.jit
def norm_fwd_kernel(y_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr, R, T, GS, G, eps,
                    s_yb, s_yt, s_zb, s_zt, s_ob, s_ot, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """out = h rsqrt(mean(h^2) + eps) w, h = y silu(z), over the channels [g GS, (g+1) GS) of rows
    [pid ROWS, (pid+1) ROWS) of the (B, T) rows (R = B T); rstd (R, G) float32. Channel stride 1.
    Grid (cdiv(R, ROWS), G)."""
    g = tl.program_id(1)
    c = g * GS + tl.arange(0, BLOCK)
    cmask = tl.arange(0, BLOCK) < GS
    w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    for i in range(ROWS):
        r = tl.program_id(0) * ROWS + i
        if r < R:
            b, t = (r // T).to(tl.int64), r % T
            _, _, _, h = _gated(y_ptr, z_ptr, b * s_yb + t * s_yt, b * s_zb + t * s_zt, c, cmask)
            rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / GS + eps)
            tl.store(out_ptr + b * s_ob + t * s_ot + c, (h * rstd * w).to(out_ptr.dtype.element_ty), mask=cmask)
            tl.store(rstd_ptr + r.to(tl.int64) * G + g, rstd)


@triton.jit
def norm_bwd_kernel(y_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr, dw_ptr, R, T, GS, G, E,
                    s_yb, s_yt, s_zb, s_zt, s_gb, s_gt, s_dyb, s_dyt, s_dzb, s_dzt,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Gradients of norm_fwd_kernel: dy, dz (their inputs' layouts) and this program's partial
    dw[pid, c] = sum over its rows of dout xhat (dw (P, E) float32). Grid as there."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    c = g * GS + tl.arange(0, BLOCK)
    cmask = tl.arange(0, BLOCK) < GS
    w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(ROWS):
        r = pid * ROWS + i
        if r < R:
            b, t = (r // T).to(tl.int64), r % T
            y, z, sz, h = _gated(y_ptr, z_ptr, b * s_yb + t * s_yt, b * s_zb + t * s_zt, c, cmask)
            rstd = tl.load(rstd_ptr + r.to(tl.int64) * G + g)
            go = tl.load(dout_ptr + b * s_gb + t * s_gt + c, mask=cmask, other=0.0).to(tl.float32)
            xhat = h * rstd
            dw += go * xhat
            dxhat = go * w
            dh = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / GS))
            dy = dh * z * sz
            dz = dh * y * sz * (1.0 + z * (1.0 - sz))
            tl.store(dy_ptr + b * s_dyb + t * s_dyt + c, dy.to(dy_ptr.dtype.element_ty), mask=cmask)
            tl.store(dz_ptr + b * s_dzb + t * s_dzt + c, dz.to(dz_ptr.dtype.element_ty), mask=cmask)
    tl.store(dw_ptr + pid.to(tl.int64) * E + c, dw, mask=cmask)
