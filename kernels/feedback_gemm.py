"""Triton epilogues of the GEMM path of the feedback solve (wide heads: Dk > 256 or Dv > 128).

There the logits q k^T and lam s^T of a block of rows come from cuBLAS (torch.bmm, fp32 output)
into a scratch of shape (B*H, R, NC) (rows r0 .. r0 + R of the sequence against keys 0 .. NC, or
an apply's column block), and these kernels turn them into what the next product needs.  Shapes
and units as in ``kernels/feedback.py`` (lse in base 2, qk_scale = scale * log2(e)); value-width
slabs here are head-major (B*H, T, Dv) with strides (sx_bh, sx_t), except f ((B, T, H, Dv),
strides (sf_b, sf_t)).

All are memory-bound, so every kernel that reads the scratch runs one (BM, BN) tile per program
(many programs in flight); row sums across tiles go through per-tile partials (B*H, R, NCB),
NCB = cdiv(NC, BN), and a small reduction.  Row lengths NC stay specialized (rows known to be
16-aligned load as vectors); positions, heights and gamma's strides do not (fewer compilations).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sessa_scale.kernels.feedback import _lse_final


@triton.jit
def _tile_rows(r0, R, NC, BM: tl.constexpr, BN: tl.constexpr):
    """Program (pid_m, pid_n, bh)'s tile of a (B*H, R, NC) block: (bh, i, t = r0 + i, cols, masks, offsets)."""
    bh = tl.program_id(2)
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    imask = i < R
    m2 = imask[:, None] & (cols < NC)[None, :]
    return bh, i, r0 + i, cols, imask, m2, bh * R * NC + i[:, None] * NC + cols[None, :]


@triton.jit(do_not_specialize=['r0', 'R'])
def lse_partial_kernel(a_ptr, m_ptr, l_ptr, r0, R, NC, NCB, qk_scale, BM: tl.constexpr, BN: tl.constexpr):
    """Per tile of the logits A (B*H, R, NC) of rows r0 + i against keys 0 .. NC: the base-2 max m and
    sum l = sum 2^(qk_scale A - m) over the keys j < r0 + i, into (B*H, R, NCB) partials."""
    bh, i, t, cols, imask, m2, off = _tile_rows(r0, R, NC, BM, BN)
    ACC = m_ptr.dtype.element_ty
    m = tl.full((BM,), -1e30, dtype=ACC)
    l = tl.zeros((BM,), dtype=ACC)
    if tl.program_id(1) * BN < r0 + tl.program_id(0) * BM + BM - 1:  # some key precedes some row
        ok = (cols[None, :] < t[:, None]) & m2
        s = tl.where(ok, tl.load(a_ptr + off, mask=m2, other=0.0) * qk_scale, float("-inf"))
        m = tl.maximum(m, tl.max(s, 1))
        l = tl.sum(tl.exp2(s - m[:, None]), 1)
    po = bh * R * NCB + i * NCB + tl.program_id(1)
    tl.store(m_ptr + po, m, mask=imask)
    tl.store(l_ptr + po, l, mask=imask)


@triton.jit(do_not_specialize=['T', 'r0', 'R', 'NCB'])
def lse_reduce_kernel(m_ptr, l_ptr, lse_ptr, T, r0, R, NCB, BM: tl.constexpr, BN: tl.constexpr):
    """lse[bh, r0 + i] from the partials of lse_partial_kernel (0 for rows with no earlier key)."""
    bh = tl.program_id(1)
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    imask = i < R
    ACC = lse_ptr.dtype.element_ty
    M = tl.full((BM,), -1e30, dtype=ACC)
    S = tl.zeros((BM,), dtype=ACC)
    for n0 in range(0, NCB, BN):
        c = n0 + tl.arange(0, BN)
        mk = imask[:, None] & (c < NCB)[None, :]
        po = bh * R * NCB + i[:, None] * NCB + c[None, :]
        m = tl.load(m_ptr + po, mask=mk, other=-1e30)
        l = tl.load(l_ptr + po, mask=mk, other=0.0)
        M_new = tl.maximum(M, tl.max(m, 1))
        S = S * tl.exp2(M - M_new) + tl.sum(l * tl.exp2(m - M_new[:, None]), 1)
        M = M_new
    tl.store(lse_ptr + bh * T + r0 + i, _lse_final(M, S), mask=imask)


@triton.jit(do_not_specialize=['T', 'r0', 'R', 'sg_b', 'sg_t'])
def probs_kernel(a_ptr, p_ptr, g_ptr, lse_ptr, T, H, r0, R, NC, sg_b, sg_t, qk_scale,
                 BM: tl.constexpr, BN: tl.constexpr):
    """P = gamma_t 2^(qk_scale A - lse_t) of an apply's block (rows r0 + i, every column before
    them: no mask), A (B*H, R, NC) in ACC -> P, same shape, in P's dtype (may be A itself)."""
    bh, i, t, cols, imask, m2, off = _tile_rows(r0, R, NC, BM, BN)
    ACC = lse_ptr.dtype.element_ty
    lse = tl.load(lse_ptr + bh * T + t, mask=imask, other=0.0)
    g = tl.load(g_ptr + (bh // H) * sg_b + bh % H + t * sg_t, mask=imask, other=0.0).to(ACC)
    p = g[:, None] * tl.exp2(tl.load(a_ptr + off, mask=m2, other=0.0) * qk_scale - lse[:, None])
    tl.store(p_ptr + off, p.to(p_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=['T'])
def delta_kernel(lam_ptr, s_ptr, f_ptr, dl_ptr, T, H, Dv, sx_bh, sx_t, sf_b, sf_t, BM: tl.constexpr, BV: tl.constexpr):
    """delta[bh, t] = lam_t . (s_t - f_t) in ACC (the softmax-backward row term)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = tl.program_id(0) * BM + tl.arange(0, BM)
    tmask = t < T
    ACC = dl_ptr.dtype.element_ty
    dl = tl.zeros((BM,), dtype=ACC)
    for v0 in range(0, Dv, BV):
        vv = v0 + tl.arange(0, BV)
        mv = tmask[:, None] & (vv < Dv)[None, :]
        xo = bh * sx_bh + t[:, None] * sx_t + vv[None, :]
        lam = tl.load(lam_ptr + xo, mask=mv, other=0.0).to(ACC)
        sv = tl.load(s_ptr + xo, mask=mv, other=0.0).to(ACC)
        fv = tl.load(f_ptr + b * sf_b + h * Dv + t[:, None] * sf_t + vv[None, :], mask=mv, other=0.0).to(ACC)
        dl += tl.sum(lam * (sv - fv), 1)
    tl.store(dl_ptr + bh * T + t, dl, mask=tmask)


@triton.jit(do_not_specialize=['T', 'r0', 'R', 'c0', 'NCB', 'nb0', 'sg_b', 'sg_t'])
def ds_kernel(a_ptr, d_ptr, ds_ptr, dgp_ptr, g_ptr, lse_ptr, dl_ptr, T, H, r0, R, c0, NC, NCB, nb0, sg_b, sg_t,
              qk_scale, scale, BM: tl.constexpr, BN: tl.constexpr):
    """Rows t = r0 + i, keys j = c0 + c of the softmax backward from the logits A and D = lam s^T (both
    (B*H, R, NC) in ACC): dS_scaled = scale P (gamma_t D - delta_t) into ds (zero for j >= t; its
    dtype) and the tile's partial dgamma sum_j P D into column nb0 + pid_n of dgp (B*H, R, NCB), the
    partials of a whole strip of rows (its blocks at column offsets nb0, one rowsum per strip)."""
    bh, i, t, cols, imask, m2, off = _tile_rows(r0, R, NC, BM, BN)
    ACC = lse_ptr.dtype.element_ty
    ds = tl.zeros((BM, BN), dtype=ACC)
    dg = tl.zeros((BM,), dtype=ACC)
    if c0 + tl.program_id(1) * BN < r0 + tl.program_id(0) * BM + BM - 1:  # some key precedes some row
        lse = tl.load(lse_ptr + bh * T + t, mask=imask, other=0.0)
        dl = tl.load(dl_ptr + bh * T + t, mask=imask, other=0.0)
        g = tl.load(g_ptr + (bh // H) * sg_b + bh % H + t * sg_t, mask=imask, other=0.0).to(ACC)
        d = tl.load(d_ptr + off, mask=m2, other=0.0)
        p = tl.exp2(tl.load(a_ptr + off, mask=m2, other=0.0) * qk_scale - lse[:, None])
        p = tl.where((c0 + cols[None, :] < t[:, None]) & m2, p, 0.0)
        dg = tl.sum(p * d, 1)
        ds = scale * p * (g[:, None] * d - dl[:, None])
    tl.store(ds_ptr + off, ds.to(ds_ptr.dtype.element_ty), mask=m2)
    tl.store(dgp_ptr + bh * R * NCB + i * NCB + nb0 + tl.program_id(1), dg, mask=imask)


@triton.jit(do_not_specialize=['T', 'r0', 'R', 'NCB'])
def rowsum_kernel(x_ptr, out_ptr, T, r0, R, NCB, BM: tl.constexpr, BN: tl.constexpr):
    """out[bh, r0 + i] = sum_c x[bh, i, c]  (x: (B*H, R, NCB) partials, out (B*H, T), both in ACC)."""
    bh = tl.program_id(1)
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    imask = i < R
    acc = tl.zeros((BM,), dtype=x_ptr.dtype.element_ty)
    for n0 in range(0, NCB, BN):
        c = n0 + tl.arange(0, BN)
        acc += tl.sum(tl.load(x_ptr + bh * R * NCB + i[:, None] * NCB + c[None, :],
                              mask=imask[:, None] & (c < NCB)[None, :], other=0.0), 1)
    tl.store(out_ptr + bh * T + r0 + i, acc, mask=imask)
