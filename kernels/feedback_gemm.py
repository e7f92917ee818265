"""Triton kernels of the GEMM path of the feedback solve (wide heads: Dk > 256 or Dv > 128).

There the products over T (P s, P^T lam, dS k, dS^T q) and the leaf products go through cuBLAS;
these kernels form what those products read.  The logit kernels (``lse_partial_kernel``,
``probs_kernel``, ``ds_kernel``) compute the logits q k^T (and lam s^T) of their (BM, BN) tile
themselves, over Dk in BK chunks on the tensor cores (fp32 accumulation), and apply the softmax
part in registers: no fp32 logits reach memory, only P or dS in the product dtype (into a scratch
of shape (B*H, R, NC): rows r0 .. r0 + R of the sequence against a block of NC keys) or per-tile
row partials.  Tiles with no admissible pair skip their products.  Shapes and units as in
``kernels/feedback.py`` (lse in base 2, qk_scale = scale * log2(e)); q, k are head-major
(B*H, T, Dk) with strides (sq_bh, sq_t); value-width slabs are head-major (B*H, T, Dv) with
strides (sx_bh, sx_t), except f ((B, T, H, Dv), strides (sf_b, sf_t)).

Row sums across tiles go through per-tile partials (B*H, R, NCB), NCB = cdiv(NC, BN), and a small
memory-bound reduction.  Row lengths NC and strides stay specialized (16-aligned rows load as
vectors); positions, heights and gamma's strides do not (fewer compilations).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sessa_scale.kernels.feedback import _dot, _lse_final


@triton.jit
def _rows(r0, R, BM: tl.constexpr):
    """Program (pid_m, pid_s, bh)'s rows of a (B*H, R, NC) block: (bh, i, t = r0 + i, row mask)."""
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    return tl.program_id(2), i, r0 + i, i < R


@triton.jit
def _segment(NC, BN: tl.constexpr, SEG: tl.constexpr):
    """Column tiles [n0, n1) of program (pid_m, pid_s, bh): its segment of SEG tiles of BN keys."""
    n0 = tl.program_id(1) * SEG
    return n0, tl.minimum(n0 + SEG, tl.cdiv(NC, BN))


@triton.jit
def _causal_end(n1, r0, c0, BM: tl.constexpr, BN: tl.constexpr):
    """The end of the column tiles (block-relative, keys c0 + n * BN) that hold some key before the
    last row r0 + pid_m * BM + BM - 1 of the program (capped at n1)."""
    return tl.minimum(n1, tl.cdiv(tl.maximum(r0 + tl.program_id(0) * BM + BM - 1 - c0, 0), BN))


@triton.jit
def _logits(a_ptr, b_ptr, ra, rb, ma, mb, sa_t, sb_t, D, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            ACC: tl.constexpr, PREC: tl.constexpr):
    """(BM, BN) tile a[ra] . b[rb]^T over the D columns of two row-major (., D) slabs (row strides
    sa_t, sb_t), in ACC: chunks of BK columns through the tensor cores (fp32 accumulation)."""
    dd = tl.arange(0, BK)
    ap = a_ptr + ra[:, None] * sa_t + dd[None, :]
    bp = b_ptr + rb[None, :] * sb_t + dd[:, None]  # b's tile loaded transposed: (BK, BN)
    acc = tl.zeros((BM, BN), dtype=ACC)
    for d0 in range(0, D, BK):
        a = tl.load(ap, mask=ma[:, None] & (d0 + dd < D)[None, :], other=0.0)
        b = tl.load(bp, mask=mb[None, :] & (d0 + dd < D)[:, None], other=0.0)
        acc += _dot(a, b, PREC)
        ap += BK
        bp += BK
    return acc


@triton.jit(do_not_specialize=['T', 'r0', 'R', 'c0'])
def lse_partial_kernel(q_ptr, k_ptr, m_ptr, l_ptr, T, r0, R, c0, NC, NCB, Dk, sq_bh, sq_t, sk_bh, sk_t, qk_scale,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SEG: tl.constexpr,
                       FLAT: tl.constexpr, PREC: tl.constexpr):
    """Per program, rows r0 + i against a segment of SEG tiles of BN keys c0 + c (c < NC), the logits
    formed here from q and k (head-major (B*H, T, Dk)): the base-2 max m and sum l = sum
    2^(qk_scale q.k - m) over the keys j < r0 + i (online across the segment's tiles; tiles with no
    earlier key are skipped), into column pid_s of the (B*H, R, NCB) partials (m = -1e30, l = 0 for
    none).  FLAT: let the compiler flatten the tile and head-width loops into one pipeline."""
    bh, i, t, imask = _rows(r0, R, BM)
    n0, n1 = _segment(NC, BN, SEG)
    ACC = m_ptr.dtype.element_ty
    m = tl.full((BM,), -1e30, dtype=ACC)
    l = tl.zeros((BM,), dtype=ACC)
    for n in tl.range(n0, _causal_end(n1, r0, c0, BM, BN), flatten=FLAT):
        j = c0 + n * BN + tl.arange(0, BN)
        s = _logits(q_ptr + bh * sq_bh, k_ptr + bh * sk_bh, t, j, imask, j < c0 + NC, sq_t, sk_t, Dk,
                    BM, BN, BK, ACC, PREC) * qk_scale
        s = tl.where((j[None, :] < t[:, None]) & imask[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m = m_new
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


@triton.jit(do_not_specialize=['T', 'r0', 'R', 'e0', 'sg_b', 'sg_t'])
def probs_kernel(q_ptr, k_ptr, p_ptr, g_ptr, lse_ptr, T, H, r0, R, e0, NC, Dk, sq_bh, sq_t, sk_bh, sk_t, sg_b, sg_t,
                 qk_scale, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SEG: tl.constexpr,
                 FLAT: tl.constexpr, PREC: tl.constexpr):
    """P = gamma_t 2^(qk_scale q_t.k_j - lse_t) of an apply's block (rows t = r0 + i, keys j = e0 + c,
    every key before every row: no mask), the logits formed here, a segment of SEG tiles of BN keys
    per program; -> p (B*H, R, NC) in its dtype."""
    bh, i, t, imask = _rows(r0, R, BM)
    n0, n1 = _segment(NC, BN, SEG)
    ACC = lse_ptr.dtype.element_ty
    lse = tl.load(lse_ptr + bh * T + t, mask=imask, other=0.0)
    g = tl.load(g_ptr + (bh // H) * sg_b + bh % H + t * sg_t, mask=imask, other=0.0).to(ACC)
    for n in tl.range(n0, n1, flatten=FLAT):
        c = n * BN + tl.arange(0, BN)
        a = _logits(q_ptr + bh * sq_bh, k_ptr + bh * sk_bh, t, e0 + c, imask, c < NC, sq_t, sk_t, Dk,
                    BM, BN, BK, ACC, PREC)
        p = g[:, None] * tl.exp2(a * qk_scale - lse[:, None])
        tl.store(p_ptr + bh * R * NC + i[:, None] * NC + c[None, :], p.to(p_ptr.dtype.element_ty),
                 mask=imask[:, None] & (c < NC)[None, :])


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
def ds_kernel(q_ptr, k_ptr, lam_ptr, s_ptr, ds_ptr, dgp_ptr, g_ptr, lse_ptr, dl_ptr, T, H, r0, R, c0, NC, NCB, nb0,
              Dk, Dv, sq_bh, sq_t, sk_bh, sk_t, sl_bh, sl_t, ss_bh, ss_t, sg_b, sg_t, qk_scale, scale,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SEG: tl.constexpr, FLAT: tl.constexpr,
              PREC: tl.constexpr):
    """Rows t = r0 + i, keys j = c0 + c of the softmax backward, a segment of SEG tiles of BN keys per
    program, forming here the logits q_t.k_j and D = lam_t.s_j (q, k, lam, s head-major; lam, s with
    strides (sl_bh, sl_t), (ss_bh, ss_t)): dS_scaled = scale P (gamma_t D - delta_t) into ds
    (B*H, R, NC) (zero for j >= t; its dtype) and the segment's partial dgamma sum_j P D into column
    nb0 + pid_s of dgp (B*H, R, NCB), the partials of a whole strip of rows (its blocks at column
    offsets nb0, one rowsum per strip).  Tiles with no earlier key skip both products."""
    bh, i, t, imask = _rows(r0, R, BM)
    n0, n1 = _segment(NC, BN, SEG)
    ACC = lse_ptr.dtype.element_ty
    lse = tl.load(lse_ptr + bh * T + t, mask=imask, other=0.0)
    dl = tl.load(dl_ptr + bh * T + t, mask=imask, other=0.0)
    g = tl.load(g_ptr + (bh // H) * sg_b + bh % H + t * sg_t, mask=imask, other=0.0).to(ACC)
    dg = tl.zeros((BM,), dtype=ACC)
    row = ds_ptr + bh * R * NC + i[:, None] * NC
    n_causal = tl.maximum(n0, _causal_end(n1, r0, c0, BM, BN))
    for n in tl.range(n0, n_causal, flatten=FLAT):
        c = n * BN + tl.arange(0, BN)
        j, cmask = c0 + c, c < NC
        a = _logits(q_ptr + bh * sq_bh, k_ptr + bh * sk_bh, t, j, imask, cmask, sq_t, sk_t, Dk, BM, BN, BK, ACC, PREC)
        p = tl.where((j[None, :] < t[:, None]) & imask[:, None], tl.exp2(a * qk_scale - lse[:, None]), 0.0)
        d = _logits(lam_ptr + bh * sl_bh, s_ptr + bh * ss_bh, t, j, imask, cmask, sl_t, ss_t, Dv, BM, BN, BK, ACC,
                    PREC)
        dg += tl.sum(p * d, 1)
        ds = scale * p * (g[:, None] * d - dl[:, None])
        tl.store(row + c[None, :], ds.to(ds_ptr.dtype.element_ty), mask=imask[:, None] & cmask[None, :])
    for n in range(n_causal, n1):  # tiles wholly at or after the rows: dS = 0
        c = n * BN + tl.arange(0, BN)
        tl.store(row + c[None, :], tl.zeros((BM, BN), dtype=ds_ptr.dtype.element_ty),
                 mask=imask[:, None] & (c < NC)[None, :])
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
