"""Triton kernels for the Sessa feedback solve (forward and backward).

Problem, per (batch, head):  s[t] = f[t] + gamma[t] * sum_{j<t} P[t, j] s[j],
P[t, :] = softmax_{j<t}(scale * q[t].k[j]) (strictly causal; row 0 is all zero).
Plain references: ``sessa_scale/ops/feedback_reference.py`` (dense, sequential) and
``sessa_scale/ops/feedback_chunked.py`` (blocked torch with hand backward).

Layouts: q, k (B, T, H, Dk); gamma (B, T, H); f (B, T, H, Dv), arbitrary strides passed in.
Work buffers are in the compute dtype ACC (float32, or float64 for float64 inputs):
  lse  (B*H, T)         row log-sum-exp of the strictly causal logits (0 for row 0)
  W    (B*H, NL*L, L)   per leaf of L rows (NL leaves, the last padded with identity rows):
                        ``leaf_prep_kernel`` writes the C x C blocks A_ij = gamma_i P_ij (j < i),
                        the inverses of the diagonal systems (I - gamma_i P_ii) and zeros above;
                        the wrapper then merges them into the full inverse of (I - A_leaf).
  X / S (B, T, H, Dv)   right-hand side accumulator (starts as f) / solution (+ a copy of S
                        in the input dtype that the tensor-core products read)
Schedule (``sessa_scale/ops/feedback_triton.py``): lse pass -> leaf inverses (both fully
parallel) -> recursive solve over leaves: solve the first half, apply its block of gamma*P to
the second half, recurse; a leaf is one product S = N X with its inverse N.  An apply either
recomputes P inside the product (``fwd_apply_kernel`` / ``bwd_apply_kernel``, one Dv tile) or
runs in two passes: ``tile_kernel`` writes the gamma*P block (input dtype) to a bounded
scratch, ``mm_kernel`` multiplies it (wide heads: P is computed once, not once per Dv tile;
large single-head products go through cuBLAS instead, see ``SolveConfig.cublas_min``).
The backward solves the transposed system backwards in time with the same schedule, then
``tile_kernel`` writes dS row chunks (and partial dgamma sums) and ``mm_kernel`` forms
dq = dS k and dk = dS^T q from them.

Numerics: logits, lse, accumulators and the leaf inverses in ACC ("ieee" dots, "tf32" for
the leaf products when inputs are half precision); P, dS and s enter the large products in
the input dtype (bf16/fp16 tensor cores, fp32 accumulation) when the inputs are half
precision, ACC otherwise.  No atomics: results are deterministic.
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
    """a[rows] . b[cols]^T over Dk (NK chunks of BK; a0 = chunk 0 of a[rows] in a's dtype,
    preloaded outside the caller's loop so that the column loop is the innermost, pipelined one;
    b is cast to a0's dtype)."""
    DT = a0.dtype
    acc = _dot(a0, tl.trans(_tile(b_ptr, cols, cmask, sb_t, 0, Dk, BK).to(DT)), PREC)
    if NK > 1:  # wide heads: a runtime loop (an unrolled one would pipeline every chunk in smem)
        for c in range(1, NK):
            at = _tile(a_ptr, rows, rmask, sa_t, c * BK, Dk, BK).to(DT)
            bt = _tile(b_ptr, cols, cmask, sb_t, c * BK, Dk, BK).to(DT)
            acc += _dot(at, tl.trans(bt), PREC)
    return acc


@triton.jit
def _probs(q0, q_ptr, k_ptr, lse, rows, cols, rmask, cmask, sq_t, sk_t, Dk, scale,
           BK: tl.constexpr, NK: tl.constexpr, PREC: tl.constexpr):
    """P[rows, cols] (strictly causal, zero outside), in ACC; lse = lse[rows] (preloaded)."""
    s = _qk(q0, q_ptr, k_ptr, rows, cols, rmask, cmask, sq_t, sk_t, Dk, BK, NK, PREC) * scale
    ok = (cols[None, :] < rows[:, None]) & rmask[:, None] & cmask[None, :]
    return tl.where(ok, tl.exp(s - lse[:, None]), 0.0)


# ----------------------------------------------------------------------------- row statistics, leaves


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


@triton.jit(do_not_specialize=['T', 'TP'])
def leaf_prep_kernel(q_ptr, k_ptr, g_ptr, lse_ptr, w_ptr, T, H, Dk, scale,
                     sq_b, sq_t, sk_b, sk_t, sg_b, sg_t, TP,
                     L, C: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr, LOG2C: tl.constexpr,
                     PREC: tl.constexpr):
    """One C-row block i of its leaf: W[i, j] = gamma_i P_ij for earlier blocks j, W[i, i] =
    (I - gamma_i P_ii)^-1 (product of (I + A^(2^k)), A nilpotent), zeros for later blocks.
    Rows >= T get A = 0 (identity padding)."""
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
    for c0 in range(r0 + C, a0 + L, C):
        tl.store(wrow + (c0 - a0) + cl[None, :], tl.zeros((C, C), dtype=A.dtype))


@triton.jit(do_not_specialize=['T', 'TP', 'a0'])
def leaf_kernel(w_ptr, x_ptr, s_ptr, sl_ptr, T, H, Dv, sx_b, sx_t, TP, a0, L,
                BML: tl.constexpr, BNL: tl.constexpr, BV: tl.constexpr,
                REV: tl.constexpr, COPY: tl.constexpr, PREC: tl.constexpr):
    """Leaf [a0, a0 + L) with its inverse N = W[a0:a0+L] (lower triangular):
    S = N X (REV: S = N^T X, the transposed system of the backward), rows < T; COPY: also
    write S in sl's dtype."""
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
    acc = tl.zeros((BML, BV), dtype=s_ptr.dtype.element_ty)
    if REV:
        lo = pid_m * BML
        hi = L
    else:
        lo = 0
        hi = pid_m * BML + BML
    for n0 in range(lo, hi, BNL):
        ln = n0 + tl.arange(0, BNL)
        if REV:
            w = tl.load(wp + (a0 + ln)[None, :] * L + li[:, None])  # N[n, i] as an (i, n) tile
        else:
            w = tl.load(wp + rows[:, None] * L + ln[None, :])
        xs = tl.load(xp + (a0 + ln)[:, None] * sx_t + vv[None, :], mask=((a0 + ln) < T)[:, None] & vm[None, :],
                     other=0.0)
        acc += _dot(w, xs, PREC)
    off = b * sx_b + h * Dv + rows[:, None] * sx_t + vv[None, :]
    m2 = rmask[:, None] & vm[None, :]
    tl.store(s_ptr + off, acc, mask=m2)
    if COPY:
        tl.store(sl_ptr + off, acc.to(sl_ptr.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------- one-pass applies


@triton.jit(do_not_specialize=['T', 'r0', 'r1', 'c0', 'c1'])
def fwd_apply_kernel(q_ptr, k_ptr, g_ptr, lse_ptr, s_ptr, x_ptr, T, H, Dk, Dv, scale,
                     sq_b, sq_t, sk_b, sk_t, sg_b, sg_t, sx_b, sx_t,
                     r0, r1, c0, c1,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     NK: tl.constexpr, PREC: tl.constexpr):
    """X[r0:r1] += gamma * P[r0:r1, c0:c1] @ S[c0:c1]  (c1 <= r0: solved rows into unsolved)."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    qp = q_ptr + b * sq_b + h * Dk
    kp = k_ptr + b * sk_b + h * Dk
    xp = x_ptr + b * sx_b + h * Dv
    sp = s_ptr + b * sx_b + h * Dv
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
        xs = tl.load(sp + cols[:, None] * sx_t + vv[None, :], mask=cmask[:, None] & vm[None, :], other=0.0)
        acc += _dot(p.to(q_ptr.dtype.element_ty), xs.to(q_ptr.dtype.element_ty), PREC).to(acc.dtype)
    g = tl.load(g_ptr + b * sg_b + h + rows * sg_t, mask=rmask, other=0.0).to(acc.dtype)
    ptrs = xp + rows[:, None] * sx_t + vv[None, :]
    m2 = rmask[:, None] & vm[None, :]
    x = tl.load(ptrs, mask=m2, other=0.0)
    tl.store(ptrs, x + g[:, None] * acc, mask=m2)


@triton.jit(do_not_specialize=['T', 'r0', 'r1', 'c0', 'c1'])
def bwd_apply_kernel(q_ptr, k_ptr, g_ptr, lse_ptr, s_ptr, y_ptr, T, H, Dk, Dv, scale,
                     sq_b, sq_t, sk_b, sk_t, sg_b, sg_t, sy_b, sy_t,
                     r0, r1, c0, c1,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     NK: tl.constexpr, PREC: tl.constexpr):
    """Y[j in r0:r1] += sum_{t in c0:c1} P[t, j] gamma_t Lam[t]  (r1 <= c0: solved later rows;
    s_ptr holds Lam)."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    qp = q_ptr + b * sq_b + h * Dk
    kp = k_ptr + b * sk_b + h * Dk
    yp = y_ptr + b * sy_b + h * Dv
    sp = s_ptr + b * sy_b + h * Dv
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
        ys = tl.load(sp + ts[:, None] * sy_t + vv[None, :], mask=tmask[:, None] & vm[None, :], other=0.0)
        mu = g[:, None] * ys
        acc += _dot(pT.to(q_ptr.dtype.element_ty), mu.to(q_ptr.dtype.element_ty), PREC).to(acc.dtype)
    ptrs = yp + js[:, None] * sy_t + vv[None, :]
    m2 = jmask[:, None] & vm[None, :]
    y = tl.load(ptrs, mask=m2, other=0.0)
    tl.store(ptrs, y + acc, mask=m2)


# ----------------------------------------------------------------------------- two-pass products


@triton.jit
def _ls(a0, a_ptr, b_ptr, rows, cols, rmask, cmask, sa_t, sb_t, Dv,
        BV: tl.constexpr, NV: tl.constexpr, PREC: tl.constexpr):
    """a[rows] . b[cols]^T over Dv (lam . s; a0 = chunk 0 of a[rows], preloaded)."""
    return _qk(a0, a_ptr, b_ptr, rows, cols, rmask, cmask, sa_t, sb_t, Dv, BV, NV, PREC)


@triton.jit(do_not_specialize=['T', 'r0', 'R', 'c0', 'NC', 'NCT'])
def tile_kernel(q_ptr, k_ptr, g_ptr, lse_ptr, dl_ptr, s_ptr, y_ptr, out_ptr, dgp_ptr,
                T, H, Dk, Dv, scale,
                sq_b, sq_t, sk_b, sk_t, sg_b, sg_t, sx_b, sx_t,
                r0, R, c0, NC, NCT,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                NK: tl.constexpr, NV: tl.constexpr, DS: tl.constexpr, PREC: tl.constexpr):
    """First pass, one (BM, BN) tile per program of the block rows [r0, r0 + R) x cols
    [c0, c0 + NC), written to out (B*H, R, NC) in out's dtype:
      DS=False: gamma_t P[t, j]                                  (the block an apply multiplies)
      DS=True:  dS[t, j] = P[t, j] (gamma_t lam_t . s_j - delta_t), and the partial dgamma
                dgp[bh, c0 / BN + pid_n, t] = sum_{j in tile} P[t, j] lam_t . s_j  (dgp: (B*H, NCT, T),
                c0 a multiple of BN);
                y_ptr / s_ptr hold lam / s, dl_ptr delta (B*H, T).
    Tiles with no j < t are written as zeros without computing anything."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    qp = q_ptr + b * sq_b + h * Dk
    kp = k_ptr + b * sk_b + h * Dk
    ACC = lse_ptr.dtype.element_ty
    lr = pid_m * BM + tl.arange(0, BM)
    lc = pid_n * BN + tl.arange(0, BN)
    rows = r0 + lr
    cols = c0 + lc
    rmask = (lr < R) & (rows < T)
    cmask = (lc < NC) & (cols < T)
    out = tl.zeros((BM, BN), dtype=ACC)
    dg = tl.zeros((BM,), dtype=ACC)
    if c0 + pid_n * BN < tl.minimum(r0 + pid_m * BM + BM, T):
        g = tl.load(g_ptr + b * sg_b + h + rows * sg_t, mask=rmask, other=0.0).to(ACC)
        lse = tl.load(lse_ptr + bh * T + rows, mask=rmask, other=0.0)
        q0 = _tile(qp, rows, rmask, sq_t, 0, Dk, BK)
        p = _probs(q0, qp, kp, lse, rows, cols, rmask, cmask, sq_t, sk_t, Dk, scale, BK, NK, PREC)
        if DS:
            yp = y_ptr + b * sx_b + h * Dv
            sp = s_ptr + b * sx_b + h * Dv
            y0 = _tile(yp, rows, rmask, sx_t, 0, Dv, BV)
            D = _ls(y0, yp, sp, rows, cols, rmask, cmask, sx_t, sx_t, Dv, BV, NV, PREC)
            dl = tl.load(dl_ptr + bh * T + rows, mask=rmask, other=0.0)
            out = p * (g[:, None] * D - dl[:, None])
            dg = tl.sum(p * D, 1)
        else:
            out = g[:, None] * p
    tl.store(out_ptr + bh * R * NC + lr[:, None] * NC + lc[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(lr < R)[:, None] & (lc < NC)[None, :])
    if DS:
        tl.store(dgp_ptr + (bh * NCT + c0 // BN + pid_n) * T + rows, dg, mask=rmask)


@triton.jit(do_not_specialize=['M', 'N', 'v_off', 'o_off', 'lim_off'])
def mm_kernel(a_ptr, sa_m, sa_n, v_ptr, sv_b, sv_t, o_ptr, so_b, so_t,
              H, M, N, DV, v_off, o_off, lim_off, alpha,
              BM: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, LIMIT: tl.constexpr,
              ACC: tl.constexpr, PREC: tl.constexpr):
    """Second pass: O[o_off + m, :] += alpha * sum_n A[bh, m, n] V[v_off + n, :] per (b, h),
    A = a scratch written by tile_kernel ((B*H, M, N) elements, strides sa_m / sa_n: either
    orientation), V and O (B, T, H, DV)-strided slabs (V cast to A's dtype).  Causal limits per
    row tile [m0, m0 + BM): LIMIT 1: n < m0 + BM + lim_off; LIMIT 2: n >= m0 + lim_off."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    ap = a_ptr + bh * M * N
    vp = v_ptr + b * sv_b + h * DV + v_off * sv_t
    op = o_ptr + b * so_b + h * DV + o_off * so_t
    m = pid_m * BM + tl.arange(0, BM)
    mmask = m < M
    vv = pid_v * BV + tl.arange(0, BV)
    vm = vv < DV
    lo = 0
    hi = N
    if LIMIT == 1:
        hi = tl.minimum(N, pid_m * BM + BM + lim_off)
    if LIMIT == 2:
        lo = tl.maximum(0, pid_m * BM + lim_off)
    acc = tl.zeros((BM, BV), dtype=ACC)
    for n0 in range(lo, hi, BN):
        n = n0 + tl.arange(0, BN)
        nmask = n < hi
        a = tl.load(ap + m[:, None] * sa_m + n[None, :] * sa_n, mask=mmask[:, None] & nmask[None, :], other=0.0)
        v = tl.load(vp + n[:, None] * sv_t + vv[None, :], mask=nmask[:, None] & vm[None, :], other=0.0)
        acc += _dot(a, v.to(a.dtype), PREC).to(ACC)
    ptrs = op + m[:, None] * so_t + vv[None, :]
    m2 = mmask[:, None] & vm[None, :]
    res = alpha * acc + tl.load(ptrs, mask=m2, other=0.0).to(ACC)
    tl.store(ptrs, res.to(o_ptr.dtype.element_ty), mask=m2)
