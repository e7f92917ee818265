"""Triton epilogues of the GEMM path of the feedback solve (wide heads: Dk > 256 or Dv > 128).

There the logits q k^T and lam s^T of a block of rows come from cuBLAS (torch.bmm, fp32 output)
into a scratch of shape (B*H, R, NC) (rows r0 .. r0 + R of the sequence against keys 0 .. NC or
an apply's column block), and these kernels turn them into what the next product needs.  Shapes
and units as in ``kernels/feedback.py`` (lse in base 2, qk_scale = scale * log2(e)); value-width
slabs here are head-major (B*H, T, Dv) with strides (sx_bh, sx_t), except f ((B, T, H, Dv),
strides (sf_b, sf_t)).  Memory-bound: one pass over the scratch each.  Row lengths NC stay
specialized (rows known to be 16-aligned load as vectors); positions, heights and gamma's
strides do not (fewer compilations).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.feedback import _lse_final, _online


@triton.jit(do_not_specialize=['T', 'r0', 'R'])
def lse_rows_kernel(a_ptr, lse_ptr, T, r0, R, NC, qk_scale, BM: tl.constexpr, BN: tl.constexpr):
    """lse[bh, r0 + i] over the strictly causal part (j < r0 + i) of the logits A (B*H, R, NC)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    i = pid_m * BM + tl.arange(0, BM)
    t = r0 + i
    imask = i < R
    ap = a_ptr + bh * R * NC + i[:, None] * NC
    ACC = lse_ptr.dtype.element_ty
    m = tl.full((BM,), -1e30, dtype=ACC)
    l = tl.zeros((BM,), dtype=ACC)
    for n0 in range(0, tl.minimum(NC, r0 + pid_m * BM + BM), BN):
        cols = n0 + tl.arange(0, BN)
        ok = (cols[None, :] < t[:, None]) & imask[:, None]
        s = tl.load(ap + cols[None, :], mask=ok, other=0.0) * qk_scale
        m, l = _online(m, l, tl.where(ok, s, float("-inf")))
    tl.store(lse_ptr + bh * T + t, _lse_final(m, l), mask=imask)


@triton.jit(do_not_specialize=['T', 'r0', 'R', 'sg_b', 'sg_t'])
def probs_kernel(a_ptr, p_ptr, g_ptr, lse_ptr, T, H, r0, R, NC, sg_b, sg_t, qk_scale,
                 BM: tl.constexpr, BN: tl.constexpr):
    """P = gamma_t 2^(qk_scale A - lse_t) of an apply's block (rows r0 + i, every column before
    them: no mask), A (B*H, R, NC) in ACC -> P, same shape, in P's dtype (may be A itself)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    i = pid_m * BM + tl.arange(0, BM)
    t = r0 + i
    imask = i < R
    cols = pid_n * BN + tl.arange(0, BN)
    m2 = imask[:, None] & (cols < NC)[None, :]
    off = bh * R * NC + i[:, None] * NC + cols[None, :]
    ACC = lse_ptr.dtype.element_ty
    lse = tl.load(lse_ptr + bh * T + t, mask=imask, other=0.0)
    g = tl.load(g_ptr + b * sg_b + h + t * sg_t, mask=imask, other=0.0).to(ACC)
    p = g[:, None] * tl.exp2(tl.load(a_ptr + off, mask=m2, other=0.0) * qk_scale - lse[:, None])
    tl.store(p_ptr + off, p.to(p_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=['T', 'r0', 'R', 'sg_b', 'sg_t', 'sdg_b', 'sdg_t'])
def ds_rows_kernel(a_ptr, d_ptr, ds_ptr, g_ptr, lse_ptr, lam_ptr, s_ptr, f_ptr, dg_ptr,
                   T, H, Dv, r0, R, NC, sg_b, sg_t, sx_bh, sx_t, sf_b, sf_t, sdg_b, sdg_t, qk_scale, scale,
                   BM: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr):
    """Rows t = r0 + i of the softmax backward from the logits A and D = lam s^T (both (B*H, R, NC)
    in ACC, keys 0 .. NC):  dS_scaled = scale P (gamma_t D - delta_t) into ds (zero for j >= t; its
    dtype), dgamma_t = sum_j P D (dg's dtype, at (b, t, h)), with delta_t = lam_t . (s_t - f_t)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    i = pid_m * BM + tl.arange(0, BM)
    t = r0 + i
    imask = i < R
    ACC = lse_ptr.dtype.element_ty
    dl = tl.zeros((BM,), dtype=ACC)
    for v0 in range(0, Dv, BV):
        vv = v0 + tl.arange(0, BV)
        mv = imask[:, None] & (vv < Dv)[None, :]
        xo = bh * sx_bh + t[:, None] * sx_t + vv[None, :]
        lam = tl.load(lam_ptr + xo, mask=mv, other=0.0).to(ACC)
        sv = tl.load(s_ptr + xo, mask=mv, other=0.0).to(ACC)
        fv = tl.load(f_ptr + b * sf_b + h * Dv + t[:, None] * sf_t + vv[None, :], mask=mv, other=0.0).to(ACC)
        dl += tl.sum(lam * (sv - fv), 1)
    lse = tl.load(lse_ptr + bh * T + t, mask=imask, other=0.0)
    g = tl.load(g_ptr + b * sg_b + h + t * sg_t, mask=imask, other=0.0).to(ACC)
    dg = tl.zeros((BM,), dtype=ACC)
    row = bh * R * NC + i[:, None] * NC
    for n0 in range(0, NC, BN):
        cols = n0 + tl.arange(0, BN)
        m2 = imask[:, None] & (cols < NC)[None, :]
        a = tl.load(a_ptr + row + cols[None, :], mask=m2, other=0.0)
        d = tl.load(d_ptr + row + cols[None, :], mask=m2, other=0.0)
        p = tl.where(cols[None, :] < t[:, None], tl.exp2(a * qk_scale - lse[:, None]), 0.0)
        dg += tl.sum(p * d, 1)
        tl.store(ds_ptr + row + cols[None, :], (scale * p * (g[:, None] * d - dl[:, None])).to(ds_ptr.dtype.element_ty),
                 mask=m2)
    tl.store(dg_ptr + b * sdg_b + h + t * sdg_t, dg.to(dg_ptr.dtype.element_ty), mask=imask)
