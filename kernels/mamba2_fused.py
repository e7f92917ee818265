"""Triton kernels for the Mamba-2 mixer's elementwise parts that PyTorch runs as many passes over
memory (autograd wrappers: ``sessa_scale/ops/mamba2_fused.py``; plain references: the PyTorch paths
of ``sessa_scale/models/mamba2.py``).

* Causal depthwise conv + SiLU over (B, T, C) with channels innermost (as the projections leave
  them): out[t, c] = silu(bias[c] + sum_k w[k, c] in[t - (K-1) + k, c]), zero inputs before t = 0,
  with the taps w (K, C) channels-contiguous (each tap one vector load).
  PyTorch runs it as transposes, a cuDNN conv over (B, C, T), a slice and a SiLU; its backward
  adds cuDNN's depthwise weight gradient. The backward here recomputes the pre-activations of the
  K output positions that read each input (K x K shifted loads, cache-resident) instead of storing
  them. Each backward program walks a run of T-tiles and keeps the weight and bias gradients in
  registers, so its partial sums are few ((B x a few runs, C, K) floats), added up in a fixed
  order by a second small kernel that writes them in the parameters' dtype (deterministic).
* Gated RMSNorm: out = h * rsqrt(mean_group(h^2) + eps) * weight with h = y * silu(z), per group
  of channels; one program per (block of rows, group), float32 inside, the inverse RMS kept for
  the backward (PyTorch: about ten float32 passes, recomputed in the backward under checkpointing).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _conv_pre(in_ptr, w_ptr, bias, t, c, cmask, T, C, s_t, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """bias + sum_k w[k, c] in[t - (K-1) + k, c] for a (BT, BC) tile, float32 (zero past the ends);
    w (K, C) contiguous, so each tap loads as a vector."""
    acc = tl.zeros((BT, BC), dtype=tl.float32) + bias[None, :]
    for k in tl.static_range(K):
        src = t - (K - 1) + k
        m = ((src >= 0) & (src < T))[:, None] & cmask[None, :]
        v = tl.load(in_ptr + src[:, None] * s_t + c[None, :], mask=m, other=0.0).to(tl.float32)
        acc += v * tl.load(w_ptr + k * C + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit(do_not_specialize=["T"])
def conv_fwd_kernel(in_ptr, w_ptr, b_ptr, out_ptr, T, C, s_ib, s_it, s_ob, s_ot,
                    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """out = silu(causal depthwise conv(in)); in / out (B, T, C) with channel stride 1, taps w (K, C)
    contiguous, bias (C,). Grid (cdiv(T, BT), cdiv(C, BC), B)."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2).to(tl.int64)
    cmask = c < C
    bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    pre = _conv_pre(in_ptr + b * s_ib, w_ptr, bias, t, c, cmask, T, C, s_it, K, BT, BC)
    out = pre * tl.sigmoid(pre)
    tl.store(out_ptr + b * s_ob + t[:, None] * s_ot + c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(t < T)[:, None] & cmask[None, :])


@triton.jit
def _conv_dpre(ip, gp, w_ptr, bias, pos, c, cmask, T, C, s_it, s_gt, K: tl.constexpr, BT: tl.constexpr,
               BC: tl.constexpr):
    """dpre = dout * silu'(pre) at positions pos (zero at pos >= T), float32 (BT, BC)."""
    pre = _conv_pre(ip, w_ptr, bias, pos, c, cmask, T, C, s_it, K, BT, BC)
    g = tl.load(gp + pos[:, None] * s_gt + c[None, :], mask=(pos < T)[:, None] & cmask[None, :], other=0.0)
    s = tl.sigmoid(pre)
    return g.to(tl.float32) * s * (1.0 + pre * (1.0 - s))


@triton.jit(do_not_specialize=["T", "NT"])
def conv_bwd_kernel(in_ptr, w_ptr, b_ptr, dout_ptr, din_ptr, dw_ptr, db_ptr, ring_ptr, T, C, NT,
                    s_ib, s_it, s_gb, s_gt, s_db, s_dt,
                    K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Backward of conv_fwd_kernel over a run of NT (BT, BC) tiles, positions [R0, R0 + NT BT) with
    R0 = pid_t NT BT, walked from the last tile to the first. Per tile: dpre = dout * silu'(pre)
    (pre recomputed once per position), then din[t] = sum_j w[K-1-j] dpre[t + j], reading the
    shifted dpre rows back from this program's ring of two tiles (ring (programs, 2 BT, BC) float32:
    a tile's rows and the first rows of the tile after it, written one iteration earlier; before the
    walk, the K-1 positions after the run). The weight and bias gradients are summed over the run in
    registers and stored once as this program's partials dw[p, k, c] = sum_t dpre[t] in[t - (K-1) + k],
    db[p, c] = sum_t dpre[t] (dw (P, K, C), db (P, C) float32, p = b num_programs(0) + pid_t).
    KP = next_power_of_2(K) <= BT. Grid (cdiv(T, NT BT), cdiv(C, BC), B)."""
    pid_t = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    cmask = c < C
    kk = tl.arange(0, KP)
    rows = tl.arange(0, BT)
    bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    ip = in_ptr + b64 * s_ib
    gp = dout_ptr + b64 * s_gb
    prog = (b * tl.num_programs(0) + pid_t) * tl.num_programs(1) + tl.program_id(1)
    ring = ring_ptr + prog.to(tl.int64) * (2 * BT * BC) + tl.arange(0, BC)[None, :]
    r0 = pid_t * NT * BT
    # the K-1 positions after the run (another program's), into the ring half that tile NT-1 does not use
    halo = _conv_dpre(ip, gp, w_ptr, bias, r0 + NT * BT + kk, c, cmask, T, C, s_it, s_gt, K, KP, BC)
    tl.store(ring + ((NT % 2) * BT + kk)[:, None] * BC, halo)
    dw = tl.zeros((KP, BC), dtype=tl.float32)  # k along rows: the sums over positions broadcast in place
    db = tl.zeros((BC,), dtype=tl.float32)
    for n in range(NT):
        i = NT - 1 - n
        t = r0 + i * BT + rows
        dpre = _conv_dpre(ip, gp, w_ptr, bias, t, c, cmask, T, C, s_it, s_gt, K, BT, BC)
        db += tl.sum(dpre, axis=0)
        for k in tl.static_range(K):
            src = t - (K - 1) + k
            v = tl.load(ip + src[:, None] * s_it + c[None, :], mask=((src >= 0) & (src < T))[:, None] & cmask[None, :],
                        other=0.0).to(tl.float32)
            dw += tl.where(kk[:, None] == k, tl.sum(dpre * v, axis=0)[None, :], 0.0)
        half = (i % 2) * BT
        tl.debug_barrier()  # the previous iteration's reads of this half are done
        tl.store(ring + (half + rows)[:, None] * BC, dpre)
        tl.debug_barrier()  # ... and this tile's rows visible to all threads
        din = dpre * tl.load(w_ptr + (K - 1) * C + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        for j in tl.static_range(1, K):
            later = tl.load(ring + ((half + rows + j) % (2 * BT))[:, None] * BC)
            din += later * tl.load(w_ptr + (K - 1 - j) * C + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(din_ptr + b64 * s_db + t[:, None] * s_dt + c[None, :], din.to(din_ptr.dtype.element_ty),
                 mask=(t < T)[:, None] & cmask[None, :])
    part = (b * tl.num_programs(0) + pid_t).to(tl.int64) * C
    tl.store(db_ptr + part + c, db, mask=cmask)
    tl.store(dw_ptr + part * K + kk[:, None] * C + c[None, :], dw, mask=(kk < K)[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["P"])
def conv_wgrad_sum_kernel(dw_part_ptr, db_part_ptr, dw_ptr, db_ptr, P, C,
                          K: tl.constexpr, KP: tl.constexpr, BC: tl.constexpr):
    """dw[c, k] = sum_p dw_part[p, k, c], db[c] = sum_p db_part[p, c] in a fixed order
    (deterministic), written in dw's / db's dtype; the partials of conv_bwd_kernel, dw (C, K)
    contiguous. Grid (cdiv(C, BC),)."""
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    cmask = c < C
    kk = tl.arange(0, KP)
    m2 = (kk < K)[:, None] & cmask[None, :]
    tap = kk[:, None] * C + c[None, :]
    dw = tl.zeros((KP, BC), dtype=tl.float32)
    db = tl.zeros((BC,), dtype=tl.float32)
    for p in range(P):
        dw += tl.load(dw_part_ptr + p * (K * C) + tap, mask=m2, other=0.0)
        db += tl.load(db_part_ptr + p * C + c, mask=cmask, other=0.0)
    tl.store(dw_ptr + c[None, :] * K + kk[:, None], dw.to(dw_ptr.dtype.element_ty), mask=m2)
    tl.store(db_ptr + c, db.to(db_ptr.dtype.element_ty), mask=cmask)


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


@triton.jit
def _softplus_arg(raw_ptr, bias_ptr, rows, h, R, T, H, s_b, s_t, ACC: tl.constexpr):
    """raw[b, t, h] + bias[h] for rows r = b T + t (ACC, zero outside), and the in-range mask."""
    m = (rows < R)[:, None] & (h < H)[None, :]
    b, t = (rows // T).to(tl.int64), rows % T
    raw = tl.load(raw_ptr + (b * s_b + t * s_t)[:, None] + h[None, :], mask=m, other=0.0).to(ACC)
    return raw + tl.load(bias_ptr + h, mask=h < H, other=0.0).to(ACC)[None, :], m


@triton.jit
def dt_fwd_kernel(raw_ptr, bias_ptr, alog_ptr, dt_ptr, a_ptr, R, T, H, s_b, s_t,
                  ROWS: tl.constexpr, BH: tl.constexpr):
    """dt = softplus(raw + bias) (torch's: x above 20 passes through), raw (B, T, H) with unit stride
    along H, dt (R = B T, H) contiguous, computed in dt's dtype; program 0 also writes
    A = -exp(A_log) (H,). Grid (cdiv(R, ROWS),)."""
    ACC = dt_ptr.dtype.element_ty
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    h = tl.arange(0, BH)
    x, m = _softplus_arg(raw_ptr, bias_ptr, rows, h, R, T, H, s_b, s_t, ACC)
    u = tl.exp(-tl.abs(x))  # softplus = max(x, 0) + log1p(u), log1p exact also for tiny u (Goldberg)
    w = 1.0 + u
    dt = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0)))
    tl.store(dt_ptr + rows.to(tl.int64)[:, None] * H + h[None, :], dt, mask=m)
    if tl.program_id(0) == 0:
        alog = tl.load(alog_ptr + h, mask=h < H, other=0.0)
        tl.store(a_ptr + h, -tl.exp(alog.to(a_ptr.dtype.element_ty)), mask=h < H)


@triton.jit
def dt_bwd_kernel(raw_ptr, bias_ptr, ddt_ptr, draw_ptr, dbias_ptr, R, T, H, s_b, s_t, s_db, s_dt,
                  ROWS: tl.constexpr, BH: tl.constexpr):
    """Through dt_fwd_kernel's softplus: draw = ddt * sigmoid(raw + bias) (ddt where that is above
    20), in draw's dtype and layout (B, T, H), ddt (R, H) contiguous; this program's partial
    dbias[pid, h] = sum over its rows of draw (dbias (P, H) float32). Grid as there."""
    ACC = ddt_ptr.dtype.element_ty
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    h = tl.arange(0, BH)
    x, m = _softplus_arg(raw_ptr, bias_ptr, rows, h, R, T, H, s_b, s_t, ACC)
    g = tl.load(ddt_ptr + rows.to(tl.int64)[:, None] * H + h[None, :], mask=m, other=0.0)
    draw = tl.where(x > 20.0, g, g * tl.sigmoid(x))
    b, t = (rows // T).to(tl.int64), rows % T
    tl.store(draw_ptr + (b * s_db + t * s_dt)[:, None] + h[None, :], draw.to(draw_ptr.dtype.element_ty), mask=m)
    tl.store(dbias_ptr + tl.program_id(0).to(tl.int64) * H + h, tl.sum(draw.to(tl.float32), axis=0), mask=h < H)


@triton.jit(do_not_specialize=["P"])
def dt_param_grad_kernel(dbias_part_ptr, alog_ptr, da_ptr, dbias_ptr, dalog_ptr, P, H, HAS_DA: tl.constexpr,
                         BH: tl.constexpr):
    """dbias[h] = sum_p dbias_part[p, h] in a fixed order (deterministic) and, with HAS_DA,
    dA_log = dA * A = -dA exp(A_log), each in its parameter's dtype. One program."""
    h = tl.arange(0, BH)
    hm = h < H
    acc = tl.zeros((BH,), dtype=tl.float32)
    for p in range(P):
        acc += tl.load(dbias_part_ptr + p * H + h, mask=hm, other=0.0)
    tl.store(dbias_ptr + h, acc.to(dbias_ptr.dtype.element_ty), mask=hm)
    if HAS_DA:
        alog = tl.load(alog_ptr + h, mask=hm, other=0.0)
        da = tl.load(da_ptr + h, mask=hm, other=0.0).to(alog.dtype)
        tl.store(dalog_ptr + h, (-da * tl.exp(alog)).to(dalog_ptr.dtype.element_ty), mask=hm)
