"""Triton kernels of the GEMM path of the feedback solve (wide heads: Dk > 256 or Dv > 128).

There the products over T (P s, P^T lam, dS k, dS^T q) and the leaf products go through cuBLAS;
these kernels form what those products read.  The logit kernels (``lse_partial_kernel``,
``probs_kernel``, ``ds_kernel``, and ``leaf_probs_kernel`` for the leaves' blocks below their
diagonal) compute the logits q k^T (and lam s^T) of their (BM, BN) tile
themselves, over Dk in BK chunks on the tensor cores (fp32 accumulation), and apply the softmax
part in registers: no fp32 logits reach memory, only P or dS in the product dtype (into a scratch
of shape (B*H, R, NC): rows r0 .. r0 + R of the sequence against a block of NC keys) or per-tile
row partials.  Tiles with no admissible pair skip their products.  Shapes and units as in
``kernels/feedback.py`` (lse in base 2, qk_scale = scale * log2(e)).  The logit kernels read q, k
(and lam, s) through TMA descriptors of head-major slabs flattened to (B*H*T, D): head bh's row t is
slab row bh * T + t (``feedback_gemm.slab_descriptor``); a tile reaching past its head reads the next
head's rows (or zeros past the slab), and those rows and keys are masked out of everything it writes.
Other value-width buffers are head-major (B*H, T, Dv) with strides (sx_bh, sx_t), except f
((B, T, H, Dv), strides (sf_b, sf_t)).

Row sums across tiles go through per-tile partials (B*H, R, NCB), NCB = cdiv(NC, BN), and a small
memory-bound reduction.  Row lengths NC and strides stay specialized (16-aligned rows load as
vectors); positions, heights and gamma's strides do not (fewer compilations).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sessa_scale.kernels.feedback import _dot, _lse_final


@triton.jit
def _tile_rows(r0, R, NC, BM: tl.constexpr, BN: tl.constexpr):
    """Program (pid_m, pid_n, bh)'s tile of a (B*H, R, NC) block: (bh, i, t = r0 + i, cols, masks, offsets)."""
    bh = tl.program_id(2)
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    imask = i < R
    m2 = imask[:, None] & (cols < NC)[None, :]
    return bh, i, r0 + i, cols, imask, m2, bh * R * NC + i[:, None] * NC + cols[None, :]


@triton.jit
def _logits(a_desc, b_desc, ra, rb, D, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
            PREC: tl.constexpr):
    """(BM, BN) tile a[ra:ra + BM] . b[rb:rb + BN]^T over the D columns of two (rows, D) slabs read
    through TMA descriptors (blocks (BM, BK) and (BN, BK)), in ACC: chunks of BK columns through the
    tensor cores (fp32 accumulation).  Rows past a slab's end and columns past D read as zeros."""
    acc = tl.zeros((BM, BN), dtype=ACC)
    for d0 in range(0, D, BK):
        acc += _dot(a_desc.load([ra, d0]), b_desc.load([rb, d0]).T, PREC)
    return acc


@triton.jit
def _logits_pair(a_desc, b_desc, c_desc, d_desc, ra, rb, D, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """The (BM, BN) tiles a[ra:] . b[rb:]^T and c[ra:] . d[rb:]^T (as _logits) of slabs of the same width
    D, in one loop over D: both products of a chunk issued together."""
    acc = tl.zeros((BM, BN), dtype=ACC)
    acc2 = tl.zeros((BM, BN), dtype=ACC)
    for d0 in range(0, D, BK):
        acc += _dot(a_desc.load([ra, d0]), b_desc.load([rb, d0]).T, PREC)
        acc2 += _dot(c_desc.load([ra, d0]), d_desc.load([rb, d0]).T, PREC)
    return acc, acc2


@triton.jit(do_not_specialize=['T', 'r0', 'R'])
def lse_partial_kernel(q_desc, k_desc, m_ptr, l_ptr, T, r0, R, NC, NCB, Dk, qk_scale,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Per (BM, BN) tile of the logits of rows r0 + i against keys c < NC, formed here from
    q and k (head-major (B*H, T, Dk)): the base-2 max m and sum l = sum 2^(qk_scale q.k - m) over
    the keys j < r0 + i, into column pid_n of the (B*H, R, NCB) partials (tiles with no earlier key
    skip the product and write m = -1e30, l = 0)."""
    bh, i, t, cols, imask, m2, off = _tile_rows(r0, R, NC, BM, BN)
    ACC = m_ptr.dtype.element_ty
    m = tl.full((BM,), -1e30, dtype=ACC)
    l = tl.zeros((BM,), dtype=ACC)
    if tl.program_id(1) * BN < r0 + tl.program_id(0) * BM + BM - 1:  # some key precedes some row
        row, key = bh * T + r0 + tl.program_id(0) * BM, bh * T + tl.program_id(1) * BN  # the tile's first in the slabs
        s = _logits(q_desc, k_desc, row, key, Dk, BM, BN, BK, ACC, PREC) * qk_scale
        s = tl.where((cols[None, :] < t[:, None]) & m2, s, float("-inf"))
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


@triton.jit(do_not_specialize=['T', 'r0', 'R', 'e0', 'n', 'step', 'sg_b', 'sg_t'])
def probs_kernel(q_desc, k_desc, p_ptr, g_ptr, lse_ptr, T, H, r0, R, e0, NC, n, step, Dk, sg_b, sg_t, qk_scale,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, GAMMA: tl.constexpr):
    """P = 2^(qk_scale q_t.k_j - lse_t) (GAMMA: gamma_t P) of n apply blocks per head (every key before every
    row: no mask), the logits formed here: program (pid_m, pid_n, z) takes head bh = z // n, rows t = r0' + i,
    keys j = e0' + c with r0' = r0 + (z % n) * step, e0' = e0 + (z % n) * step (n = 1: one block; n > 1: blocks
    `step` rows apart, e.g. the leaf pairs of the schedule) -> p (n * B*H, R, NC) at block z, in its dtype."""
    r0 = r0 + (tl.program_id(2) % n) * step
    e0 = e0 + (tl.program_id(2) % n) * step
    z, i, t, cols, imask, m2, off = _tile_rows(r0, R, NC, BM, BN)
    bh = z // n
    ACC = lse_ptr.dtype.element_ty
    row, key = bh * T + r0 + tl.program_id(0) * BM, bh * T + e0 + tl.program_id(1) * BN
    a = _logits(q_desc, k_desc, row, key, Dk, BM, BN, BK, ACC, PREC)
    lse = tl.load(lse_ptr + bh * T + t, mask=imask, other=0.0)
    p = tl.exp2(a * qk_scale - lse[:, None])
    if GAMMA:
        p *= tl.load(g_ptr + (bh // H) * sg_b + bh % H + t * sg_t, mask=imask, other=0.0).to(ACC)[:, None]
    tl.store(p_ptr + off, p.to(p_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=['T', 'NL', 'sg_b', 'sg_t'])
def leaf_probs_kernel(q_desc, k_desc, w_ptr, g_ptr, lse_ptr, T, H, L, NL, Dk, sg_b, sg_t, qk_scale,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """The leaves' blocks of W (B*H, NL*L, L) (ACC) below the diagonal: W[bh, a + i, c] = gamma_t P[t, a + c]
    for c < i, t = a + i < T (a = leaf * L), zero elsewhere (on and above the diagonal, rows past T);
    program (pid_m, pid_n, bh * NL + leaf) writes one (BM, BN) tile, tiles wholly on or above the
    diagonal without products.  leaf_prep_kernel (DIAG_ONLY) then writes the diagonal C x C inverses."""
    bh = tl.program_id(2) // NL
    a = (tl.program_id(2) % NL) * L
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    c = tl.program_id(1) * BN + tl.arange(0, BN)
    t = a + i
    ACC = w_ptr.dtype.element_ty
    w = tl.zeros((BM, BN), dtype=ACC)
    if tl.program_id(1) * BN < tl.program_id(0) * BM + BM - 1:  # some column before some row
        rmask = (i < L) & (t < T)
        row, key = bh * T + a + tl.program_id(0) * BM, bh * T + a + tl.program_id(1) * BN
        s = _logits(q_desc, k_desc, row, key, Dk, BM, BN, BK, ACC, PREC)
        lse = tl.load(lse_ptr + bh * T + t, mask=rmask, other=0.0)
        g = tl.load(g_ptr + (bh // H) * sg_b + bh % H + t * sg_t, mask=rmask, other=0.0).to(ACC)
        ok = (c[None, :] < i[:, None]) & rmask[:, None]
        w = tl.where(ok, g[:, None] * tl.exp2(s * qk_scale - lse[:, None]), 0.0)
    tl.store(w_ptr + (bh * NL * L + t[:, None]) * L + c[None, :], w, mask=(i < L)[:, None] & (c < L)[None, :])


@triton.jit(do_not_specialize=['T', 't0', 'R'])
def delta_kernel(lam_ptr, s_ptr, f_ptr, dl_ptr, T, t0, R, H, Dv, sl_bh, sl_t, sx_bh, sx_t, sf_b, sf_t,
                 BM: tl.constexpr, BV: tl.constexpr):
    """delta[bh, t] = lam_t . (s_t - f_t) in ACC (the softmax-backward row term), rows t0 <= t < t0 + R;
    lam head-major with strides (sl_bh, sl_t), s with (sx_bh, sx_t)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = t0 + tl.program_id(0) * BM + tl.arange(0, BM)
    tmask = t < t0 + R
    ACC = dl_ptr.dtype.element_ty
    dl = tl.zeros((BM,), dtype=ACC)
    for v0 in range(0, Dv, BV):
        vv = v0 + tl.arange(0, BV)
        mv = tmask[:, None] & (vv < Dv)[None, :]
        lam = tl.load(lam_ptr + bh * sl_bh + t[:, None] * sl_t + vv[None, :], mask=mv, other=0.0).to(ACC)
        sv = tl.load(s_ptr + bh * sx_bh + t[:, None] * sx_t + vv[None, :], mask=mv, other=0.0).to(ACC)
        fv = tl.load(f_ptr + b * sf_b + h * Dv + t[:, None] * sf_t + vv[None, :], mask=mv, other=0.0).to(ACC)
        dl += tl.sum(lam * (sv - fv), 1)
    tl.store(dl_ptr + bh * T + t, dl, mask=tmask)


@triton.jit(do_not_specialize=['T', 'a', 'R', 'sg_b', 'sg_t'])
def scaled_rows_kernel(f_ptr, g_ptr, u_ptr, x_ptr, T, a, R, H, Dv, sf_b, sf_t, sg_b, sg_t, su_bh, su_t, sx_bh, sx_t,
                       BM: tl.constexpr, BV: tl.constexpr, ADD_F: tl.constexpr):
    """x[bh, i] = gamma_t u_t (ADD_F: f_t + gamma_t u_t) for rows t = a + i, i < R, in x's dtype: u head-major
    with strides (su_bh, su_t) (the forward's leaf right-hand side: u_t = sum_{j < a} P[t, j] s_j in ACC; the
    backward's gamma lam: u = lam), x (B*H, R, Dv) with strides (sx_bh, sx_t), f (B, T, H, Dv) with (sf_b, sf_t),
    gamma (B, T, H) with (sg_b, sg_t)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    t = a + i
    imask = i < R
    ACC = tl.float64 if u_ptr.dtype.element_ty == tl.float64 else tl.float32
    g = tl.load(g_ptr + b * sg_b + h + t * sg_t, mask=imask, other=0.0).to(ACC)
    for v0 in range(0, Dv, BV):
        vv = v0 + tl.arange(0, BV)
        mv = imask[:, None] & (vv < Dv)[None, :]
        x = g[:, None] * tl.load(u_ptr + bh * su_bh + t[:, None] * su_t + vv[None, :], mask=mv, other=0.0).to(ACC)
        if ADD_F:
            x += tl.load(f_ptr + b * sf_b + h * Dv + t[:, None] * sf_t + vv[None, :], mask=mv, other=0.0).to(ACC)
        tl.store(x_ptr + bh * sx_bh + i[:, None] * sx_t + vv[None, :], x.to(x_ptr.dtype.element_ty), mask=mv)


@triton.jit(do_not_specialize=['T', 'r0', 'R', 'c0', 'NCB', 'n', 'step', 'sg_b', 'sg_t', 'sk_z'])
def ds_kernel(q_desc, k_desc, lam_desc, s_desc, ds_ptr, p_ptr, pk_ptr, dgp_ptr, g_ptr, lse_ptr, dl_ptr, T, H, r0, R,
              c0, NC, NCB, n, step, Dk, Dv, sg_b, sg_t, sk_z, sk_r, qk_scale, scale,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, WRITE_P: tl.constexpr,
              READ_P: tl.constexpr, ONE_LOOP: tl.constexpr, SLOT: tl.constexpr):
    """The softmax backward of n blocks per head: program (pid_m, pid_n, z) takes head bh = z // n, rows
    t = r0' + i, keys j = c0' + c with r0' = r0 + (z % n) * step, c0' = c0 + (z % n) * step (n = 1: one
    block; n > 1: blocks `step` rows apart along the diagonal, e.g. adjacent bands).  It forms the logits
    q_t.k_j and D = lam_t.s_j (q, k, lam, s through slab descriptors) and writes dS_scaled =
    scale P (gamma_t D - delta_t) into ds (n * B*H, R, NC) at block z (zero for j >= t; its dtype),
    WRITE_P: also gamma_t P into p (same layout), and the tile's partial dgamma sum_j P D into dgp
    (B*H, T, NCB) at column (c0' + pid_n * BN) / SLOT (c0' a multiple of BN, BN of SLOT: each (row, key tile)
    has its own slot, zero where no tile starts; one rowsum at the end).  READ_P (n = 1): P is not formed
    from the logits but read from pk, the forward's P of the block (entry (z, i, c) at z * sk_z + i * sk_r + c;
    loaded before the product, which it overlaps): one product, lam s^T.  Tiles with no earlier key skip the
    products.  ONE_LOOP (Dk == Dv): both products in one loop over the width."""
    r0 = r0 + (tl.program_id(2) % n) * step
    c0 = c0 + (tl.program_id(2) % n) * step
    z, i, t, cols, imask, m2, off = _tile_rows(r0, R, NC, BM, BN)  # z: the block's index in ds (and p)
    bh = z // n
    ACC = lse_ptr.dtype.element_ty
    ds = tl.zeros((BM, BN), dtype=ACC)
    p = tl.zeros((BM, BN), dtype=ACC)
    dg = tl.zeros((BM,), dtype=ACC)
    g = tl.load(g_ptr + (bh // H) * sg_b + bh % H + t * sg_t, mask=imask, other=0.0).to(ACC)
    if c0 + tl.program_id(1) * BN < r0 + tl.program_id(0) * BM + BM - 1:  # some key precedes some row
        causal = ((c0 + cols)[None, :] < t[:, None]) & m2
        row, key = bh * T + r0 + tl.program_id(0) * BM, bh * T + c0 + tl.program_id(1) * BN
        if READ_P:
            pk = tl.load(pk_ptr + z * sk_z + i[:, None] * sk_r + cols[None, :], mask=causal, other=0.0)
            d = _logits(lam_desc, s_desc, row, key, Dv, BM, BN, BK, ACC, PREC)
            p = pk.to(ACC)
        else:
            if ONE_LOOP:  # Dk == Dv
                a, d = _logits_pair(q_desc, k_desc, lam_desc, s_desc, row, key, Dk, BM, BN, BK, ACC, PREC)
            else:
                a = _logits(q_desc, k_desc, row, key, Dk, BM, BN, BK, ACC, PREC)
                d = _logits(lam_desc, s_desc, row, key, Dv, BM, BN, BK, ACC, PREC)
            lse = tl.load(lse_ptr + bh * T + t, mask=imask, other=0.0)
            p = tl.where(causal, tl.exp2(a * qk_scale - lse[:, None]), 0.0)
        dl = tl.load(dl_ptr + bh * T + t, mask=imask, other=0.0)
        dg = tl.sum(p * d, 1)
        ds = scale * p * (g[:, None] * d - dl[:, None])
    tl.store(ds_ptr + off, ds.to(ds_ptr.dtype.element_ty), mask=m2)
    if WRITE_P:
        tl.store(p_ptr + off, (g[:, None] * p).to(p_ptr.dtype.element_ty), mask=m2)
    tl.store(dgp_ptr + (bh * T + t) * NCB + (c0 + tl.program_id(1) * BN) // SLOT, dg, mask=imask)


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
