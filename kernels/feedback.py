"""Triton kernels for the Sessa feedback solve (forward and backward).

Problem, per (batch, head):  s[t] = f[t] + gamma[t] * sum_{j<t} P[t, j] s[j],
P[t, :] = softmax_{j<t}(scale * q[t].k[j]) (strictly causal; row 0 is all zero).
Plain references: ``sessa_scale/ops/feedback_reference.py`` (dense, sequential) and
``sessa_scale/ops/feedback_chunked.py`` (blocked torch with hand backward).

Layouts: q, k (B, T, H, Dk); gamma (B, T, H); f (B, T, H, Dv), arbitrary strides passed in.
Work buffers are in the compute dtype ACC (float32, or float64 for float64 inputs):
  lse  (B*H, T)           row log-sum-exp of the strictly causal logits (0 for row 0)
  X    (B, T, H, Dv)      starts as f, accumulates off-diagonal contributions, ends as s
  W    (B*H, NL*L, L)     per leaf of L rows: strictly-lower blocks A_ij = gamma_i P_ij
                          (j < i, C x C sub-blocks) and, on the diagonal, the inverse of
                          (I - gamma_i P_ii) (a C x C unit-lower-triangular system)
Schedule (driven from ``sessa_scale/ops/feedback_triton.py``): lse pass -> W prep (both fully
parallel) -> recursive solve over leaves of L rows: solve the first half, apply its block of
P to the second half in one flash-style kernel, recurse.  Only the leaves (L / C small steps
each, inside one kernel) are sequential.  The backward runs the same schedule on the
transposed system backwards in time, then dq / dk flash-style and dgamma as a by-product.

Numerics: logits, lse, accumulators and diagonal inverses in ACC ("ieee" dots); off-diagonal
products use the input dtype (bf16/fp16 tensor cores with fp32 accumulation) when the inputs
are half precision, ACC otherwise.  No atomics: results are deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    # fp32 / fp64 operands: "ieee" (no tf32); half-precision operands: tensor cores, fp32 acc.
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
    """a[rows] . b[cols]^T over Dk (NK static chunks of BK; a0 = chunk 0 of a[rows], preloaded
    outside the caller's loop so that the column loop is the innermost, pipelined loop)."""
    acc = _dot(a0, tl.trans(_tile(b_ptr, cols, cmask, sb_t, 0, Dk, BK)), PREC)
    if NK > 1:  # wide heads: a runtime loop (an unrolled one would pipeline every chunk in smem)
        for c in range(1, NK):
            at = _tile(a_ptr, rows, rmask, sa_t, c * BK, Dk, BK)
            bt = _tile(b_ptr, cols, cmask, sb_t, c * BK, Dk, BK)
            acc += _dot(at, tl.trans(bt), PREC)
    return acc


# ----------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=['T'])
def lse_kernel(q_ptr, k_ptr, lse_ptr, T, H, Dk, scale,
               sq_b, sq_t, sk_b, sk_t,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
               PREC: tl.constexpr):
    """lse[bh, t] = logsumexp_{j<t}(scale q_t.k_j); 0 for rows with no admissible key."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qp = q_ptr + b * sq_b + h * Dk
    kp = k_ptr + b * sk_b + h * Dk
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < T
    lse_dt = lse_ptr.dtype.element_ty
    m_i = tl.full((BM,), -1e30, dtype=lse_dt)
    l_i = tl.zeros((BM,), dtype=lse_dt)
    hi = tl.minimum(pid_m * BM + BM, T)  # keys j < t <= hi - 1
    q0 = _tile(qp, rows, rmask, sq_t, 0, Dk, BK)
    for n0 in range(0, hi, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < T
        s = _qk(q0, qp, kp, rows, cols, rmask, cmask, sq_t, sk_t, Dk, BK, NK, PREC) * scale
        ok = (cols[None, :] < rows[:, None]) & rmask[:, None]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), 0.0)
    tl.store(lse_ptr + bh * T + rows, lse, mask=rmask)


@triton.jit
def _probs(q0, q_ptr, k_ptr, lse, rows, cols, rmask, cmask, sq_t, sk_t, Dk, scale,
           BK: tl.constexpr, NK: tl.constexpr, PREC: tl.constexpr):
    """P[rows, cols] (strictly causal, zero outside), in ACC; lse = lse[rows] (preloaded)."""
    s = _qk(q0, q_ptr, k_ptr, rows, cols, rmask, cmask, sq_t, sk_t, Dk, BK, NK, PREC) * scale
    ok = (cols[None, :] < rows[:, None]) & rmask[:, None] & cmask[None, :]
    return tl.where(ok, tl.exp(s - lse[:, None]), 0.0)


@triton.jit(do_not_specialize=['T', 'TP'])
def leaf_prep_kernel(q_ptr, k_ptr, g_ptr, lse_ptr, w_ptr, T, H, Dk, scale,
                     sq_b, sq_t, sk_b, sk_t, sg_b, sg_t, TP,
                     L, C: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr, LOG2C: tl.constexpr,
                     PREC: tl.constexpr):
    """One C-row block i: W[i, j] = gamma_i P_ij for earlier blocks j of its leaf, and
    W[i, i] = (I - gamma_i P_ii)^-1 (product of (I + A^(2^k)), A nilpotent)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qp = q_ptr + b * sq_b + h * Dk
    kp = k_ptr + b * sk_b + h * Dk
    lp = lse_ptr + bh * T
    r0 = pid * C
    a0 = (r0 // L) * L
    rows = r0 + tl.arange(0, C)
    rmask = rows < T
    g = tl.load(g_ptr + b * sg_b + h + rows * sg_t, mask=rmask, other=0.0).to(lse_ptr.dtype.element_ty)
    wrow = w_ptr + bh * TP * L + rows[:, None] * L
    cl = tl.arange(0, C)
    q0 = _tile(qp, rows, rmask, sq_t, 0, Dk, BK)
    lse = tl.load(lp + rows, mask=rmask, other=0.0)
    for c0 in range(a0, r0, C):
        cols = c0 + cl
        p = _probs(q0, qp, kp, lse, rows, cols, rmask, cols < T, sq_t, sk_t, Dk, scale, BK, NK, PREC)
        tl.store(wrow + (c0 - a0) + cl[None, :], g[:, None] * p)
    p = _probs(q0, qp, kp, lse, rows, rows, rmask, rmask, sq_t, sk_t, Dk, scale, BK, NK, PREC)
    A = g[:, None] * p
    eye = tl.where(cl[:, None] == cl[None, :], 1.0, 0.0).to(A.dtype)
    M = eye + A
    Ap = A
    for _ in range(LOG2C - 1):
        Ap = _dot(Ap, Ap, PREC)
        M = M + _dot(M, Ap, PREC)
    tl.store(wrow + (r0 - a0) + cl[None, :], M)


@triton.jit(do_not_specialize=['T', 'r0', 'r1', 'c0', 'c1'])
def fwd_apply_kernel(q_ptr, k_ptr, g_ptr, lse_ptr, x_ptr, T, H, Dk, Dv, scale,
                     sq_b, sq_t, sk_b, sk_t, sg_b, sg_t, sx_b, sx_t,
                     r0, r1, c0, c1,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     NK: tl.constexpr, PREC: tl.constexpr):
    """X[r0:r1] += gamma * P[r0:r1, c0:c1] @ X[c0:c1]  (c1 <= r0: solved rows into unsolved)."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    qp = q_ptr + b * sq_b + h * Dk
    kp = k_ptr + b * sk_b + h * Dk
    xp = x_ptr + b * sx_b + h * Dv
    lp = lse_ptr + bh * T
    rows = r0 + pid_m * BM + tl.arange(0, BM)
    rmask = rows < r1
    vv = pid_v * BV + tl.arange(0, BV)
    vm = vv < Dv
    acc = tl.zeros((BM, BV), dtype=x_ptr.dtype.element_ty)
    q0 = _tile(qp, rows, rmask, sq_t, 0, Dk, BK)
    lse = tl.load(lp + rows, mask=rmask, other=0.0)
    for n0 in range(c0, c1, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < c1
        p = _probs(q0, qp, kp, lse, rows, cols, rmask, cmask, sq_t, sk_t, Dk, scale, BK, NK, PREC)
        xs = tl.load(xp + cols[:, None] * sx_t + vv[None, :], mask=cmask[:, None] & vm[None, :], other=0.0)
        acc += _dot(p.to(q_ptr.dtype.element_ty), xs.to(q_ptr.dtype.element_ty), PREC).to(acc.dtype)
    g = tl.load(g_ptr + b * sg_b + h + rows * sg_t, mask=rmask, other=0.0).to(acc.dtype)
    ptrs = xp + rows[:, None] * sx_t + vv[None, :]
    m2 = rmask[:, None] & vm[None, :]
    x = tl.load(ptrs, mask=m2, other=0.0)
    tl.store(ptrs, x + g[:, None] * acc, mask=m2)


@triton.jit(do_not_specialize=['T', 'TP', 'a0', 'a1'])
def fwd_leaf_kernel(w_ptr, x_ptr, T, H, Dv, sx_b, sx_t, TP, a0, a1,
                    L, C: tl.constexpr, BV: tl.constexpr,
                    PREC: tl.constexpr, LOWP: tl.constexpr):
    """Sequential forward substitution over the C-row blocks of the leaf [a0, a1)."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    xp = x_ptr + b * sx_b + h * Dv
    wp = w_ptr + bh * TP * L
    vv = pid_v * BV + tl.arange(0, BV)
    vm = vv < Dv
    cl = tl.arange(0, C)
    for i0 in range(a0, a1, C):
        rows = i0 + cl
        rmask = rows < T
        m2 = rmask[:, None] & vm[None, :]
        acc = tl.load(xp + rows[:, None] * sx_t + vv[None, :], mask=m2, other=0.0)
        for j0 in range(a0, i0, C):
            cols = j0 + cl
            A = tl.load(wp + rows[:, None] * L + (j0 - a0) + cl[None, :])
            xs = tl.load(xp + cols[:, None] * sx_t + vv[None, :], mask=vm[None, :], other=0.0)
            acc += _dot(A.to(LOWP), xs.to(LOWP), PREC).to(acc.dtype)
        Minv = tl.load(wp + rows[:, None] * L + (i0 - a0) + cl[None, :])
        s = _dot(Minv, acc, PREC)
        tl.store(xp + rows[:, None] * sx_t + vv[None, :], s, mask=m2)
        tl.debug_barrier()


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=['T', 'r0', 'r1', 'c0', 'c1'])
def bwd_apply_kernel(q_ptr, k_ptr, g_ptr, lse_ptr, y_ptr, T, H, Dk, Dv, scale,
                     sq_b, sq_t, sk_b, sk_t, sg_b, sg_t, sy_b, sy_t,
                     r0, r1, c0, c1,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     NK: tl.constexpr, PREC: tl.constexpr):
    """Y[j in r0:r1] += sum_{t in c0:c1} P[t, j] gamma_t Y[t]  (r1 <= c0: solved later rows)."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    qp = q_ptr + b * sq_b + h * Dk
    kp = k_ptr + b * sk_b + h * Dk
    yp = y_ptr + b * sy_b + h * Dv
    lp = lse_ptr + bh * T
    js = r0 + pid_m * BM + tl.arange(0, BM)
    jmask = js < r1
    vv = pid_v * BV + tl.arange(0, BV)
    vm = vv < Dv
    acc = tl.zeros((BM, BV), dtype=y_ptr.dtype.element_ty)
    k0 = _tile(kp, js, jmask, sk_t, 0, Dk, BK)
    for n0 in range(c0, c1, BN):
        ts = n0 + tl.arange(0, BN)
        tmask = ts < c1
        pT = _qk(k0, kp, qp, js, ts, jmask, tmask, sk_t, sq_t, Dk, BK, NK, PREC) * scale
        lse = tl.load(lp + ts, mask=tmask, other=0.0)
        ok = (js[:, None] < ts[None, :]) & jmask[:, None] & tmask[None, :]
        pT = tl.where(ok, tl.exp(pT - lse[None, :]), 0.0)
        g = tl.load(g_ptr + b * sg_b + h + ts * sg_t, mask=tmask, other=0.0).to(acc.dtype)
        ys = tl.load(yp + ts[:, None] * sy_t + vv[None, :], mask=tmask[:, None] & vm[None, :], other=0.0)
        mu = g[:, None] * ys
        acc += _dot(pT.to(q_ptr.dtype.element_ty), mu.to(q_ptr.dtype.element_ty), PREC).to(acc.dtype)
    ptrs = yp + js[:, None] * sy_t + vv[None, :]
    m2 = jmask[:, None] & vm[None, :]
    y = tl.load(ptrs, mask=m2, other=0.0)
    tl.store(ptrs, y + acc, mask=m2)


@triton.jit(do_not_specialize=['T', 'TP', 'a0', 'a1', 'nblk'])
def bwd_leaf_kernel(w_ptr, y_ptr, T, H, Dv, sy_b, sy_t, TP, a0, a1, nblk,
                    L, C: tl.constexpr, BV: tl.constexpr,
                    PREC: tl.constexpr, LOWP: tl.constexpr):
    """Backward substitution (transposed system) over the C-row blocks of [a0, a1), last first:
    lam_i = Minv_i^T (Y_i + sum_{t > i in leaf} A_ti^T lam_t); W's A_ti already holds gamma_t."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    yp = y_ptr + b * sy_b + h * Dv
    wp = w_ptr + bh * TP * L
    vv = pid_v * BV + tl.arange(0, BV)
    vm = vv < Dv
    cl = tl.arange(0, C)
    for ii in range(0, nblk):
        i0 = a0 + (nblk - 1 - ii) * C
        rows = i0 + cl
        rmask = rows < T
        m2 = rmask[:, None] & vm[None, :]
        acc = tl.load(yp + rows[:, None] * sy_t + vv[None, :], mask=m2, other=0.0)
        for t0 in range(i0 + C, a1, C):
            ts = t0 + cl
            tmask = ts < T
            A = tl.load(wp + ts[:, None] * L + (i0 - a0) + cl[None, :])  # A_ti (rows t, cols i)
            ys = tl.load(yp + ts[:, None] * sy_t + vv[None, :], mask=tmask[:, None] & vm[None, :], other=0.0)
            acc += _dot(tl.trans(A).to(LOWP), ys.to(LOWP), PREC).to(acc.dtype)
        Minv = tl.load(wp + rows[:, None] * L + (i0 - a0) + cl[None, :])
        lam = _dot(tl.trans(Minv), acc, PREC)
        tl.store(yp + rows[:, None] * sy_t + vv[None, :], lam, mask=m2)
        tl.debug_barrier()


@triton.jit
def _ls(a0, a_ptr, b_ptr, rows, cols, rmask, cmask, sa_t, sb_t, Dv, dt_ptr,
        BV: tl.constexpr, NV: tl.constexpr, PREC: tl.constexpr):
    """a[rows] . b[cols]^T over Dv (a, b: ACC buffers lam / s, multiplied in the input dtype);
    a0 = chunk 0 of a[rows] already cast, preloaded by the caller."""
    DT = dt_ptr.dtype.element_ty
    acc = _dot(a0, tl.trans(_tile(b_ptr, cols, cmask, sb_t, 0, Dv, BV).to(DT)), PREC)
    if NV > 1:
        for c in range(1, NV):
            at = _tile(a_ptr, rows, rmask, sa_t, c * BV, Dv, BV).to(DT)
            bt = _tile(b_ptr, cols, cmask, sb_t, c * BV, Dv, BV).to(DT)
            acc += _dot(at, tl.trans(bt), PREC)
    return acc


@triton.jit(do_not_specialize=['T'])
def bwd_dq_kernel(q_ptr, k_ptr, g_ptr, lse_ptr, dl_ptr, x_ptr, y_ptr, dq_ptr, dg_ptr,
                  T, H, Dk, Dv, scale,
                  sq_b, sq_t, sk_b, sk_t, sg_b, sg_t, sx_b, sx_t,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  BKO: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, PREC: tl.constexpr):
    """dq[rows, ko-tile] = scale sum_j dS_tj k_j with dS = P (gamma_t D_tj - delta_t),
    D_tj = lam_t . s_j; program ko = 0 also writes dgamma_t = sum_j P_tj D_tj (ACC, (B*H, T))."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    qp = q_ptr + b * sq_b + h * Dk
    kp = k_ptr + b * sk_b + h * Dk
    xp = x_ptr + b * sx_b + h * Dv
    yp = y_ptr + b * sx_b + h * Dv
    lp = lse_ptr + bh * T
    DT = q_ptr.dtype.element_ty
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < T
    g = tl.load(g_ptr + b * sg_b + h + rows * sg_t, mask=rmask, other=0.0).to(lse_ptr.dtype.element_ty)
    dl = tl.load(dl_ptr + bh * T + rows, mask=rmask, other=0.0)
    ko = pid_k * BKO + tl.arange(0, BKO)
    kom = ko < Dk
    acc = tl.zeros((BM, BKO), dtype=lse_ptr.dtype.element_ty)
    dg = tl.zeros((BM,), dtype=lse_ptr.dtype.element_ty)
    hi = tl.minimum(pid_m * BM + BM, T)
    q0 = _tile(qp, rows, rmask, sq_t, 0, Dk, BK)
    y0 = _tile(yp, rows, rmask, sx_t, 0, Dv, BV).to(DT)
    lse = tl.load(lp + rows, mask=rmask, other=0.0)
    for n0 in range(0, hi, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < T
        p = _probs(q0, qp, kp, lse, rows, cols, rmask, cmask, sq_t, sk_t, Dk, scale, BK, NK, PREC)
        D = _ls(y0, yp, xp, rows, cols, rmask, cmask, sx_t, sx_t, Dv, q_ptr, BV, NV, PREC)
        dg += tl.sum(p * D, 1)
        ds = p * (g[:, None] * D - dl[:, None])
        kb = tl.load(kp + cols[:, None] * sk_t + ko[None, :], mask=cmask[:, None] & kom[None, :], other=0.0)
        acc += _dot(ds.to(DT), kb, PREC).to(acc.dtype)
    tl.store(dq_ptr + b * sq_b + h * Dk + rows[:, None] * sq_t + ko[None, :], (acc * scale).to(DT),
             mask=rmask[:, None] & kom[None, :])
    if pid_k == 0:
        tl.store(dg_ptr + bh * T + rows, dg, mask=rmask)


@triton.jit(do_not_specialize=['T'])
def bwd_dk_kernel(q_ptr, k_ptr, g_ptr, lse_ptr, dl_ptr, x_ptr, y_ptr, dk_ptr,
                  T, H, Dk, Dv, scale,
                  sq_b, sq_t, sk_b, sk_t, sg_b, sg_t, sx_b, sx_t,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  BKO: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, PREC: tl.constexpr):
    """dk[cols, ko-tile] = scale sum_{t > j} dS_tj q_t (key block of BN, loop over row blocks)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    qp = q_ptr + b * sq_b + h * Dk
    kp = k_ptr + b * sk_b + h * Dk
    xp = x_ptr + b * sx_b + h * Dv
    yp = y_ptr + b * sx_b + h * Dv
    lp = lse_ptr + bh * T
    DT = q_ptr.dtype.element_ty
    js = pid_n * BN + tl.arange(0, BN)
    jmask = js < T
    ko = pid_k * BKO + tl.arange(0, BKO)
    kom = ko < Dk
    acc = tl.zeros((BN, BKO), dtype=lse_ptr.dtype.element_ty)
    lo = (pid_n * BN // BM) * BM
    k0 = _tile(kp, js, jmask, sk_t, 0, Dk, BK)
    x0 = _tile(xp, js, jmask, sx_t, 0, Dv, BV).to(DT)
    for m0 in range(lo, T, BM):
        ts = m0 + tl.arange(0, BM)
        tmask = ts < T
        pT = _qk(k0, kp, qp, js, ts, jmask, tmask, sk_t, sq_t, Dk, BK, NK, PREC) * scale
        lse = tl.load(lp + ts, mask=tmask, other=0.0)
        ok = (js[:, None] < ts[None, :]) & jmask[:, None] & tmask[None, :]
        pT = tl.where(ok, tl.exp(pT - lse[None, :]), 0.0)
        DT_ = _ls(x0, xp, yp, js, ts, jmask, tmask, sx_t, sx_t, Dv, q_ptr, BV, NV, PREC)  # s_j . lam_t
        g = tl.load(g_ptr + b * sg_b + h + ts * sg_t, mask=tmask, other=0.0).to(acc.dtype)
        dl = tl.load(dl_ptr + bh * T + ts, mask=tmask, other=0.0)
        dsT = pT * (g[None, :] * DT_ - dl[None, :])
        qb = tl.load(qp + ts[:, None] * sq_t + ko[None, :], mask=tmask[:, None] & kom[None, :], other=0.0)
        acc += _dot(dsT.to(DT), qb, PREC).to(acc.dtype)
    tl.store(dk_ptr + b * sk_b + h * Dk + js[:, None] * sk_t + ko[None, :], (acc * scale).to(DT),
             mask=jmask[:, None] & kom[None, :])
