"""Triton kernels for the Sessa feedback solve: leaves and the fused (flash-style) path.

Problem, per (batch, head):  s[t] = f[t] + gamma[t] * sum_{j<t} P[t, j] s[j],
P[t, :] = softmax_{j<t}(scale * q[t].k[j]) (strictly causal; row 0 is all zero).
Plain references: ``sessa_scale/ops/feedback_reference.py`` (dense, sequential) and
``sessa_scale/ops/feedback_chunked.py`` (blocked torch with hand backward).

Layouts: q, k (B, T, H, Dk) with any batch / row strides (head stride Dk, unit last stride);
gamma (B, T, H); value-width slabs (f, the solution S, the adjoint Lam, the accumulators X / Y)
(B, T, H, Dv) with batch / row strides passed in.  Work buffers are in the compute dtype ACC
(float32, or float64 for float64 inputs):
  lse  (B*H, T)         row log-sum-exp of the strictly causal logits in base 2 (log2 of the
                        softmax denominator of scale*log2(e)*q.k; 0 for row 0)
  W    (B*H, NL*L, L)   per leaf of L rows (NL leaves, the last padded with identity rows):
                        ``leaf_prep_kernel`` writes the C x C blocks A_ij = gamma_i P_ij (j < i),
                        the inverses of the diagonal systems (I - gamma_i P_ii) and zeros above;
                        ``merge_rows_kernel`` and ``merge_cols_kernel`` then merge them, in place,
                        into the full inverse N of (I - A_leaf) (two launches per doubling of the
                        block size, log2(L / C) doublings).
Schedule (``sessa_scale/ops/feedback_triton.py``): lse -> leaf inverses (both fully parallel)
-> recursive solve over leaves: solve the first half, apply its block of gamma*P to the second
half, recurse; a leaf is one product S = N X (``leaf_kernel``).

Fused path (head widths Dk <= 256, Dv <= 128: a whole head row is one tile), the kernels of
flash attention with P recomputed from q, k and lse:
  forward   ``lse_kernel``, ``fwd_apply_kernel``  X[l] += gamma_l P[l, e] S[e]
  backward  the transposed system backwards in time: ``bwd_apply_kernel`` Y[e] += P[l, e]^T
            gamma_l Lam[l] (optionally also dk of those pairs), the leaf product writes Lam and
            delta_t = lam_t . (s_t - f_t); then ``dq_kernel`` (rows: dq, dgamma) and
            ``dk_kernel`` (columns: dk), flash-attention backward with values S and output
            gradient gamma*Lam:  dS[t, j] = P[t, j] (gamma_t lam_t . s_j - delta_t).
Wide heads take the GEMM path (``kernels/feedback_gemm.py``).

Numerics: logits, lse, accumulators and the leaf inverses in ACC ("ieee" dots; "tf32" for the
leaf products, the diagonal-block inverses and their merges when inputs are half precision); P, dS,
S and Lam enter the products in the input dtype (bf16/fp16 tensor cores, fp32 accumulation) when
the inputs are half precision, ACC otherwise.  No atomics: results are deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    # fp32 operands: PREC ("ieee" or "tf32"); half-precision operands: tensor cores, fp32 acc.
    if a.dtype == tl.float32:
        r = tl.dot(a, b, input_precision=PREC)
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _tile(ptr, rows, rmask, st, d0, D, BK: tl.constexpr):
    """(len(rows), BK) tile of a (T, D) row-major slab at columns [d0, d0 + BK)."""
    dd = d0 + tl.arange(0, BK)
    return tl.load(ptr + rows[:, None] * st + dd[None, :], mask=rmask[:, None] & (dd < D)[None, :], other=0.0)


@triton.jit
def _qk(a0, a_ptr, b_ptr, rows, cols, rmask, cmask, sa_t, sb_t, Dk,
        BK: tl.constexpr, NK: tl.constexpr, PREC: tl.constexpr):
    """a[rows] . b[cols]^T over Dk (NK chunks of BK; a0 = chunk 0 of a[rows], preloaded)."""
    acc = _dot(a0, tl.trans(_tile(b_ptr, cols, cmask, sb_t, 0, Dk, BK)), PREC)
    if NK > 1:  # wide heads (leaf_prep of the GEMM path): a runtime loop over Dk chunks
        for c in range(1, NK):
            at = _tile(a_ptr, rows, rmask, sa_t, c * BK, Dk, BK)
            bt = _tile(b_ptr, cols, cmask, sb_t, c * BK, Dk, BK)
            acc += _dot(at, tl.trans(bt), PREC)
    return acc


@triton.jit
def _online(m, l, s):
    """One step of the base-2 online log-sum-exp: (max, sum of 2^(s - max)) of rows of s."""
    m_new = tl.maximum(m, tl.max(s, 1))
    l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
    return m_new, l


@triton.jit
def _lse_final(m, l):
    """log2 of the softmax denominator; 0 for rows with no admissible key (l = 0)."""
    return tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), 0.0)


# ----------------------------------------------------------------------------- leaves


@triton.jit
def _gp(q0, qp, kp, g, lse, rows, cols, rmask, T, sq_t, sk_t, Dk, qk_scale,
        BK: tl.constexpr, NK: tl.constexpr, PREC: tl.constexpr):
    """gamma_t P[t, j] on rows x cols (strictly causal, zero outside), in ACC."""
    s = _qk(q0, qp, kp, rows, cols, rmask, cols < T, sq_t, sk_t, Dk, BK, NK, PREC) * qk_scale
    ok = (cols[None, :] < rows[:, None]) & rmask[:, None]
    return g[:, None] * tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)


@triton.jit(do_not_specialize=['T', 'TP', 'sg_b', 'sg_t'])
def leaf_prep_kernel(q_ptr, k_ptr, g_ptr, lse_ptr, w_ptr, T, H, Dk, qk_scale,
                     sq_b, sq_t, sk_b, sk_t, sg_b, sg_t, TP,
                     L, C: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr, LOG2C: tl.constexpr,
                     PREC: tl.constexpr, INV_PREC: tl.constexpr, DIAG_ONLY: tl.constexpr):
    """One C-row block i of its leaf: W[i, j] = gamma_i P_ij for earlier blocks j, W[i, i] =
    (I - gamma_i P_ii)^-1 (product of (I + A^(2^k)), A nilpotent; its fp32 products in INV_PREC),
    zeros for later blocks.  Rows >= T get A = 0 (identity padding).  DIAG_ONLY: only W[i, i] (the
    GEMM path writes the rest with ``feedback_gemm.leaf_probs_kernel``)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qp = q_ptr + b * sq_b + h * Dk
    kp = k_ptr + b * sk_b + h * Dk
    r0 = pid * C
    a0 = (r0 // L) * L
    rows = r0 + tl.arange(0, C)
    rmask = rows < T
    ACC = lse_ptr.dtype.element_ty
    g = tl.load(g_ptr + b * sg_b + h + rows * sg_t, mask=rmask, other=0.0).to(ACC)
    wrow = w_ptr + bh * TP * L + rows[:, None] * L
    cl = tl.arange(0, C)
    q0 = _tile(qp, rows, rmask, sq_t, 0, Dk, BK)
    lse = tl.load(lse_ptr + bh * T + rows, mask=rmask, other=0.0)
    if not DIAG_ONLY:
        for c0 in range(a0, r0, C):
            A = _gp(q0, qp, kp, g, lse, rows, c0 + cl, rmask, T, sq_t, sk_t, Dk, qk_scale, BK, NK, PREC)
            tl.store(wrow + (c0 - a0) + cl[None, :], A)
    A = _gp(q0, qp, kp, g, lse, rows, rows, rmask, T, sq_t, sk_t, Dk, qk_scale, BK, NK, PREC)
    M = tl.where(cl[:, None] == cl[None, :], 1.0, 0.0).to(ACC) + A
    Ap = A
    for _ in range(LOG2C - 1):
        Ap = _dot(Ap, Ap, INV_PREC)
        M = M + _dot(M, Ap, INV_PREC)
    tl.store(wrow + (r0 - a0) + cl[None, :], M)
    if not DIAG_ONLY:
        for c0 in range(r0 + C, a0 + L, C):
            tl.store(wrow + (c0 - a0) + cl[None, :], tl.zeros((C, C), dtype=ACC))


# Merging a leaf's inverse (W (n, L, L) contiguous, n = B*H*NL leaves): at level H = C, 2C, ..., L/2,
# each pair of H x H diagonal blocks of a leaf, at rows and columns d0 = 2*H*blk, holds
#   [N11  0 ]   (N11, N22 the inverses of the two diagonal blocks of (I - A), lower triangular;
#   [A21 N22]    A21 the block of A below N11)  and becomes the inverse: A21 <- N22 A21 N11.
# Two launches per level, programs (tile, block pair, leaf) on a 1-D grid, tiles fastest (no grid-axis
# limit on n): stage 1 (merge_rows_kernel) T = A21 N11, a program per B rows; stage 2
# (merge_cols_kernel) N22 T, a program per B columns.  In place, no scratch: a program writes only
# its own rows (columns), which no other program of the launch reads, in B x B chunks whose
# products read, besides the untouched triangular factor, only entries no earlier chunk wrote (the
# factor being lower triangular, see each kernel).  Column chunks of one accumulator each instead of
# a full H-wide row: registers stay small at H = 512 and the factor's zero half is skipped.


@triton.jit
def _merge_pair(w_ptr, L, H: tl.constexpr, B: tl.constexpr):
    """-> (pointer to this program's leaf, first row / column d0 of its block pair, its tile index);
    the leaf index in int64 (n * L * L may pass 2^31)."""
    pid = tl.program_id(0)
    tiles = H // B
    pair = pid // tiles
    pairs = L // (2 * H)
    leaf = (pair // pairs).to(tl.int64)
    return w_ptr + leaf * L * L, (pair % pairs) * 2 * H, pid % tiles


@triton.jit
def merge_rows_kernel(w_ptr, L, H: tl.constexpr, B: tl.constexpr, PREC: tl.constexpr):
    """Merge stage 1 on W (n, L, L): rows [tile * B, +B) of A21 (H x H) <- the same rows of A21 N11.
    Output column chunks [j0, j0 + B) ascending: N11 lower triangular, chunk j0 sums A21[:, k]
    N11[k, j0..] over k >= j0 only, so reads columns of A21 that no earlier chunk overwrote."""
    wp, d0, tile = _merge_pair(w_ptr, L, H, B)
    ar = tl.arange(0, B)
    rows = d0 + H + tile * B + ar
    for j0 in range(0, H, B):
        acc = tl.zeros((B, B), dtype=w_ptr.dtype.element_ty)
        for k0 in range(j0, H, B):
            a = tl.load(wp + rows[:, None] * L + (d0 + k0 + ar)[None, :])
            n11 = tl.load(wp + (d0 + k0 + ar)[:, None] * L + (d0 + j0 + ar)[None, :])
            acc += _dot(a, n11, PREC)
        tl.store(wp + rows[:, None] * L + (d0 + j0 + ar)[None, :], acc)


@triton.jit
def merge_cols_kernel(w_ptr, L, H: tl.constexpr, B: tl.constexpr, PREC: tl.constexpr):
    """Merge stage 2 on W (n, L, L): columns [tile * B, +B) of T = A21 N11 (H x H, stored in A21's
    place) <- the same columns of N22 T = N21.  Output row chunks [i0, i0 + B) descending: N22 lower
    triangular, chunk i0 sums N22[i0.., k] T[k, :] over k < i0 + B only, so reads rows of T that no
    earlier chunk overwrote."""
    wp, d0, tile = _merge_pair(w_ptr, L, H, B)
    ar = tl.arange(0, B)
    cols = d0 + tile * B + ar
    for i in range(0, H, B):
        i0 = H - B - i
        acc = tl.zeros((B, B), dtype=w_ptr.dtype.element_ty)
        for k0 in range(0, i0 + B, B):
            n22 = tl.load(wp + (d0 + H + i0 + ar)[:, None] * L + (d0 + H + k0 + ar)[None, :])
            t = tl.load(wp + (d0 + H + k0 + ar)[:, None] * L + cols[None, :])
            acc += _dot(n22, t, PREC)
        tl.store(wp + (d0 + H + i0 + ar)[:, None] * L + cols[None, :], acc)


@triton.jit(do_not_specialize=['T', 'TP', 'a0'])
def leaf_kernel(w_ptr, x_ptr, o_ptr, o2_ptr, s_ptr, f_ptr, dl_ptr, T, H, Dv, sx_b, sx_t, sf_b, sf_t, TP, a0, L,
                BML: tl.constexpr, BNL: tl.constexpr, BV: tl.constexpr,
                REV: tl.constexpr, COPY: tl.constexpr, DELTA: tl.constexpr, PREC: tl.constexpr):
    """Leaf [a0, a0 + L) with its inverse N = W[a0:a0+L] (lower triangular): O = N X
    (REV: O = N^T X, the transposed system of the backward) in O's dtype, rows < T; COPY: also
    O2 in its dtype.  DELTA (one Dv tile, BV >= Dv): delta[t] = O_t . (S_t - F_t) in ACC
    (the softmax-backward row term; O is lam here, S the forward solution, F = f).
    X, O, O2, S share the strides (sx_b, sx_t); F has (sf_b, sf_t)."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    xp = x_ptr + b * sx_b + h * Dv
    wp = w_ptr + bh * TP * L
    li = pid_m * BML + tl.arange(0, BML)
    rows = a0 + li
    rmask = rows < T
    vv = pid_v * BV + tl.arange(0, BV)
    vm = vv < Dv
    ACC = x_ptr.dtype.element_ty
    acc = tl.zeros((BML, BV), dtype=ACC)
    if REV:
        lo = pid_m * BML
        hi = L
    else:
        lo = 0
        hi = pid_m * BML + BML
    for n0 in range(lo, hi, BNL):
        ln = n0 + tl.arange(0, BNL)
        if REV:  # N[n, i] as an (i, n) tile, loaded along W's rows
            w = tl.trans(tl.load(wp + (a0 + ln)[:, None] * L + li[None, :]))
        else:
            w = tl.load(wp + rows[:, None] * L + ln[None, :])
        xs = tl.load(xp + (a0 + ln)[:, None] * sx_t + vv[None, :], mask=((a0 + ln) < T)[:, None] & vm[None, :],
                     other=0.0)
        acc += _dot(w, xs, PREC)
    off = b * sx_b + h * Dv + rows[:, None] * sx_t + vv[None, :]
    m2 = rmask[:, None] & vm[None, :]
    tl.store(o_ptr + off, acc.to(o_ptr.dtype.element_ty), mask=m2)
    if COPY:
        tl.store(o2_ptr + off, acc.to(o2_ptr.dtype.element_ty), mask=m2)
    if DELTA:
        sv = tl.load(s_ptr + off, mask=m2, other=0.0).to(ACC)
        fv = tl.load(f_ptr + b * sf_b + h * Dv + rows[:, None] * sf_t + vv[None, :], mask=m2, other=0.0).to(ACC)
        tl.store(dl_ptr + bh * T + rows, tl.sum(acc * (sv - fv), 1), mask=rmask)


# ----------------------------------------------------------------------------- fused path: forward


@triton.jit(do_not_specialize=['T'])
def lse_kernel(q_ptr, k_ptr, lse_ptr, T, H, Dk, qk_scale, sq_b, sq_t, sk_b, sk_t,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """lse[bh, t] = log2 sum_{j<t} 2^(qk_scale q_t.k_j); 0 for row 0.  BM % BN == 0."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qp = q_ptr + b * sq_b + h * Dk
    kp = k_ptr + b * sk_b + h * Dk
    row0 = pid_m * BM
    rows = row0 + tl.arange(0, BM)
    rmask = rows < T
    ACC = lse_ptr.dtype.element_ty
    m = tl.full((BM,), -1e30, dtype=ACC)
    l = tl.zeros((BM,), dtype=ACC)
    q = _tile(qp, rows, rmask, sq_t, 0, Dk, BK)
    for n0 in range(0, row0, BN):  # keys before the block's first row: no causal mask
        cols = n0 + tl.arange(0, BN)
        s = _dot(q, tl.trans(_tile(kp, cols, cols < T, sk_t, 0, Dk, BK)), PREC) * qk_scale
        m, l = _online(m, l, s)
    for n0 in range(row0, tl.minimum(row0 + BM, T), BN):  # the diagonal tiles
        cols = n0 + tl.arange(0, BN)
        s = _dot(q, tl.trans(_tile(kp, cols, cols < T, sk_t, 0, Dk, BK)), PREC) * qk_scale
        s = tl.where((cols[None, :] < rows[:, None]) & rmask[:, None], s, float("-inf"))
        m, l = _online(m, l, s)
    tl.store(lse_ptr + bh * T + rows, _lse_final(m, l), mask=rmask)


@triton.jit(do_not_specialize=['T', 'r0', 'r1', 'c0', 'c1', 'sg_b', 'sg_t'])
def fwd_apply_kernel(q_ptr, k_ptr, g_ptr, lse_ptr, s_ptr, x_ptr, T, H, Dk, Dv, qk_scale,
                     sq_b, sq_t, sk_b, sk_t, sg_b, sg_t, sx_b, sx_t, r0, r1, c0, c1,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """X[r0:r1] += gamma * P[r0:r1, c0:c1] @ S[c0:c1]  (c1 <= r0: solved rows into unsolved ones,
    so no causal mask inside the block)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qp = q_ptr + b * sq_b + h * Dk
    kp = k_ptr + b * sk_b + h * Dk
    sp = s_ptr + b * sx_b + h * Dv
    rows = r0 + pid_m * BM + tl.arange(0, BM)
    rmask = rows < r1
    vv = tl.arange(0, BV)
    ACC = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BV), dtype=ACC)
    q = _tile(qp, rows, rmask, sq_t, 0, Dk, BK)
    lse = tl.load(lse_ptr + bh * T + rows, mask=rmask, other=0.0)
    for n0 in range(c0, c1, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < c1
        s = _dot(q, tl.trans(_tile(kp, cols, cmask, sk_t, 0, Dk, BK)), PREC) * qk_scale
        p = tl.where(cmask[None, :], tl.exp2(s - lse[:, None]), 0.0)
        sv = _tile(sp, cols, cmask, sx_t, 0, Dv, BV)
        acc += _dot(p.to(s_ptr.dtype.element_ty), sv, PREC).to(ACC)
    g = tl.load(g_ptr + b * sg_b + h + rows * sg_t, mask=rmask, other=0.0).to(ACC)
    ptrs = x_ptr + b * sx_b + h * Dv + rows[:, None] * sx_t + vv[None, :]
    m2 = rmask[:, None] & (vv < Dv)[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=m2, other=0.0) + g[:, None] * acc, mask=m2)


# ----------------------------------------------------------------------------- fused path: backward


@triton.jit
def _dk_acc(pT, sj, qt, lam, g, dl, dk, DT: tl.constexpr, PREC: tl.constexpr):
    """dk += dS^T qt for keys j x queries t, dS^T = P^T (gamma_t s_j . lam_t - delta_t)."""
    dsT = pT * (g[None, :] * _dot(sj, tl.trans(lam), PREC).to(dk.dtype) - dl[None, :])
    return dk + _dot(dsT.to(DT), qt, PREC).to(dk.dtype)


@triton.jit(do_not_specialize=['T', 'r0', 'r1', 'c0', 'c1', 'sg_b', 'sg_t'])
def bwd_apply_kernel(q_ptr, k_ptr, g_ptr, lse_ptr, lam_ptr, y_ptr, s_ptr, dl_ptr, dk_ptr,
                     T, H, Dk, Dv, qk_scale, sq_b, sq_t, sk_b, sk_t, sg_b, sg_t, sx_b, sx_t, sd_b, sd_t,
                     r0, r1, c0, c1,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     DK: tl.constexpr, PREC: tl.constexpr):
    """Y[j] += sum_{t in [c0, c1)} P[t, j] gamma_t Lam[t] for j in [r0, r1) (r1 <= c0: solved later
    rows into unsolved earlier ones).  DK: also dk_acc[j] += sum_t dS[t, j] q_t (unscaled) with
    dS[t, j] = P[t, j] (gamma_t lam_t . s_j - delta_t)  (s_ptr: the forward solution S, dl_ptr:
    delta, dk_ptr: an ACC (B, T, H, Dk) buffer with strides (sd_b, sd_t))."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qp = q_ptr + b * sq_b + h * Dk
    kp = k_ptr + b * sk_b + h * Dk
    lp = lam_ptr + b * sx_b + h * Dv
    js = r0 + pid_m * BM + tl.arange(0, BM)
    jmask = js < r1
    vv = tl.arange(0, BV)
    ACC = y_ptr.dtype.element_ty
    DT = lam_ptr.dtype.element_ty
    acc = tl.zeros((BM, BV), dtype=ACC)
    kj = _tile(kp, js, jmask, sk_t, 0, Dk, BK)
    if DK:
        sj = _tile(s_ptr + b * sx_b + h * Dv, js, jmask, sx_t, 0, Dv, BV)
        dk = tl.zeros((BM, BK), dtype=ACC)
    # t outside [c0, c1) load as zeros: their lam, gamma and delta are 0, so they add nothing.
    for n0 in range(c0, c1, BN):
        ts = n0 + tl.arange(0, BN)
        tmask = ts < c1
        qt = _tile(qp, ts, tmask, sq_t, 0, Dk, BK)
        lse = tl.load(lse_ptr + bh * T + ts, mask=tmask, other=0.0)
        g = tl.load(g_ptr + b * sg_b + h + ts * sg_t, mask=tmask, other=0.0).to(ACC)
        pT = tl.exp2(_dot(kj, tl.trans(qt), PREC) * qk_scale - lse[None, :])
        lam = _tile(lp, ts, tmask, sx_t, 0, Dv, BV)
        acc += _dot(pT.to(DT), (g[:, None] * lam.to(ACC)).to(DT), PREC).to(ACC)
        if DK:
            dk = _dk_acc(pT, sj, qt, lam, g, tl.load(dl_ptr + bh * T + ts, mask=tmask, other=0.0), dk, DT, PREC)
    ptrs = y_ptr + b * sx_b + h * Dv + js[:, None] * sx_t + vv[None, :]
    m2 = jmask[:, None] & (vv < Dv)[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=m2, other=0.0) + acc, mask=m2)
    if DK:
        kk = tl.arange(0, BK)
        dptrs = dk_ptr + b * sd_b + h * Dk + js[:, None] * sd_t + kk[None, :]
        mk = jmask[:, None] & (kk < Dk)[None, :]
        tl.store(dptrs, tl.load(dptrs, mask=mk, other=0.0) + dk, mask=mk)


@triton.jit
def _dq_step(q, lam, lse, g, dl, dq, dg, kp, sp, cols, cmask, sk_t, sx_t, Dk, Dv, ok, qk_scale,
             MASK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """One key tile `cols` of dq_kernel: dq += dS k, dg += sum_j P lam.s_j; MASK: P where ok (else ok
    is unused)."""
    kt = _tile(kp, cols, cmask, sk_t, 0, Dk, BK)
    p = tl.exp2(_dot(q, tl.trans(kt), PREC) * qk_scale - lse[:, None])
    if MASK:
        p = tl.where(ok, p, 0.0)
    D = _dot(lam, tl.trans(_tile(sp, cols, cmask, sx_t, 0, Dv, BV)), PREC).to(dq.dtype)
    dg += tl.sum(p * D, 1)
    dq += _dot((p * (g[:, None] * D - dl[:, None])).to(DT), kt, PREC).to(dq.dtype)
    return dq, dg


@triton.jit(do_not_specialize=['T', 'sg_b', 'sg_t', 'sdg_b', 'sdg_t'])
def dq_kernel(q_ptr, k_ptr, g_ptr, lse_ptr, lam_ptr, s_ptr, dl_ptr, dq_ptr, dg_ptr,
              T, H, Dk, Dv, qk_scale, scale, sq_b, sq_t, sk_b, sk_t, sg_b, sg_t, sx_b, sx_t,
              sdq_b, sdq_t, sdg_b, sdg_t,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Rows t of the softmax backward, all keys j < t:  dq_t = scale sum_j dS[t, j] k_j (in dq's
    dtype) and dgamma_t = sum_j P[t, j] lam_t . s_j (in dg's dtype, at (b, t, h) with strides
    (sdg_b, sdg_t)).  BM % BN == 0."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qp = q_ptr + b * sq_b + h * Dk
    kp = k_ptr + b * sk_b + h * Dk
    sp = s_ptr + b * sx_b + h * Dv
    row0 = pid_m * BM
    rows = row0 + tl.arange(0, BM)
    rmask = rows < T
    ACC = lse_ptr.dtype.element_ty
    DT = lam_ptr.dtype.element_ty
    q = _tile(qp, rows, rmask, sq_t, 0, Dk, BK)
    lam = _tile(lam_ptr + b * sx_b + h * Dv, rows, rmask, sx_t, 0, Dv, BV)
    lse = tl.load(lse_ptr + bh * T + rows, mask=rmask, other=0.0)
    dl = tl.load(dl_ptr + bh * T + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + b * sg_b + h + rows * sg_t, mask=rmask, other=0.0).to(ACC)
    dq = tl.zeros((BM, BK), dtype=ACC)
    dg = tl.zeros((BM,), dtype=ACC)
    for n0 in range(0, row0, BN):  # keys before the block's first row: no causal mask
        cols = n0 + tl.arange(0, BN)
        dq, dg = _dq_step(q, lam, lse, g, dl, dq, dg, kp, sp, cols, cols < T, sk_t, sx_t, Dk, Dv, rmask[:, None],
                          qk_scale, False, BK, BV, DT, PREC)
    for n0 in range(row0, tl.minimum(row0 + BM, T), BN):  # the diagonal tiles
        cols = n0 + tl.arange(0, BN)
        ok = (cols[None, :] < rows[:, None]) & rmask[:, None]
        dq, dg = _dq_step(q, lam, lse, g, dl, dq, dg, kp, sp, cols, cols < T, sk_t, sx_t, Dk, Dv, ok,
                          qk_scale, True, BK, BV, DT, PREC)
    kk = tl.arange(0, BK)
    tl.store(dq_ptr + b * sdq_b + h * Dk + rows[:, None] * sdq_t + kk[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=rmask[:, None] & (kk < Dk)[None, :])
    tl.store(dg_ptr + b * sdg_b + h + rows * sdg_t, dg.to(dg_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _dk_step(kj, sj, dk, qp, lp, lse_ptr, gp, dl_ptr, ts, tmask, sq_t, sx_t, sg_t, Dk, Dv, ok, qk_scale,
             MASK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """One query tile `ts` of dk_kernel: dk += dS^T q (lse_ptr, gp, dl_ptr offset to the head's rows);
    MASK: P where ok (else ok is unused).  Queries outside tmask load as zeros and add nothing."""
    qt = _tile(qp, ts, tmask, sq_t, 0, Dk, BK)
    pT = tl.exp2(_dot(kj, tl.trans(qt), PREC) * qk_scale - tl.load(lse_ptr + ts, mask=tmask, other=0.0)[None, :])
    if MASK:
        pT = tl.where(ok, pT, 0.0)
    g = tl.load(gp + ts * sg_t, mask=tmask, other=0.0).to(dk.dtype)
    return _dk_acc(pT, sj, qt, _tile(lp, ts, tmask, sx_t, 0, Dv, BV), g, tl.load(dl_ptr + ts, mask=tmask, other=0.0),
                   dk, DT, PREC)


@triton.jit(do_not_specialize=['T', 'sg_b', 'sg_t'])
def dk_kernel(q_ptr, k_ptr, g_ptr, lse_ptr, lam_ptr, s_ptr, dl_ptr, acc_ptr, dk_ptr,
              T, H, Dk, Dv, qk_scale, scale, sq_b, sq_t, sk_b, sk_t, sg_b, sg_t, sx_b, sx_t,
              sa_b, sa_t, sdk_b, sdk_t, L,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              DIAG: tl.constexpr, ACC_IN: tl.constexpr, PREC: tl.constexpr):
    """Keys j, queries t > j:  dk_j = scale (sum_t dS[t, j] q_t [+ acc_j]) in dk's dtype.
    DIAG: only queries t in j's own leaf of L rows (the pairs the applies of the schedule do not
    cover; their sums arrive in acc (ACC_IN), an ACC (B, T, H, Dk) buffer with strides
    (sa_b, sa_t)).  BM % BN == 0 and, with DIAG, L % BM == 0."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qp = q_ptr + b * sq_b + h * Dk
    lp = lam_ptr + b * sx_b + h * Dv
    j0 = pid_m * BM
    js = j0 + tl.arange(0, BM)
    jmask = js < T
    ACC = lse_ptr.dtype.element_ty
    DT = lam_ptr.dtype.element_ty
    kj = _tile(k_ptr + b * sk_b + h * Dk, js, jmask, sk_t, 0, Dk, BK)
    sj = _tile(s_ptr + b * sx_b + h * Dv, js, jmask, sx_t, 0, Dv, BV)
    hi = T
    if DIAG:
        hi = tl.minimum((j0 // L + 1) * L, T)
    dk = tl.zeros((BM, BK), dtype=ACC)
    gp = g_ptr + b * sg_b + h
    for n0 in range(j0, tl.minimum(j0 + BM, hi), BN):  # the diagonal tiles: t > j only
        ts = n0 + tl.arange(0, BN)
        ok = (js[:, None] < ts[None, :]) & (ts < hi)[None, :]
        dk = _dk_step(kj, sj, dk, qp, lp, lse_ptr + bh * T, gp, dl_ptr + bh * T, ts, ts < hi, sq_t, sx_t, sg_t,
                      Dk, Dv, ok, qk_scale, True, BK, BV, DT, PREC)
    for n0 in range(j0 + BM, hi, BN):  # later queries: no causal mask
        ts = n0 + tl.arange(0, BN)
        dk = _dk_step(kj, sj, dk, qp, lp, lse_ptr + bh * T, gp, dl_ptr + bh * T, ts, ts < hi, sq_t, sx_t, sg_t,
                      Dk, Dv, jmask[:, None], qk_scale, False, BK, BV, DT, PREC)
    kk = tl.arange(0, BK)
    mk = jmask[:, None] & (kk < Dk)[None, :]
    if ACC_IN:
        dk += tl.load(acc_ptr + b * sa_b + h * Dk + js[:, None] * sa_t + kk[None, :], mask=mk, other=0.0)
    tl.store(dk_ptr + b * sdk_b + h * Dk + js[:, None] * sdk_t + kk[None, :], (dk * scale).to(dk_ptr.dtype.element_ty),
             mask=mk)


@triton.jit(do_not_specialize=['T'])
def widen_kernel(src_ptr, dst_ptr, T, H, Dv, ss_b, ss_t, ss_h, sd_b, sd_t, sd_h, BM: tl.constexpr, BV: tl.constexpr):
    """dst = src in dst's dtype (the accumulators X / Y from f / ds: half to ACC) for one (batch, head)
    per program column, BM rows per program; both (B, T, H, Dv) with the given strides, unit last stride
    (int64 offsets)."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    for v0 in range(0, Dv, BV):
        vv = v0 + tl.arange(0, BV)
        mask = (t < T)[:, None] & (vv < Dv)[None, :]
        x = tl.load(src_ptr + b * ss_b + h * ss_h + t[:, None] * ss_t + vv[None, :], mask=mask)
        tl.store(dst_ptr + b * sd_b + h * sd_h + t[:, None] * sd_t + vv[None, :], x.to(dst_ptr.dtype.element_ty),
                 mask=mask)
