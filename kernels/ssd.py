"""Triton kernels for Mamba-2's SSD scan with a scalar decay per head (forward and backward).

Problem, per batch element b and head h (group g = h // (H / G) for B and C):

    S_t = exp(dt_t A_h) S_{t-1} + B_t (dt_t x_t)^T   (N x P),   y_t = S_t^T C_t   (P,)

Plain references: ``sessa_scale/ops/ssd_reference.py`` (sequential recurrence, PyTorch chunked).
The autograd wrapper and the launch schedule live in ``sessa_scale/ops/ssd_triton.py``.

Chunks of L positions (a power of two; the last chunk masked past T). Within chunk c, with
a_i = sum_{k <= i} dt_k A_h (cumulative log decay from the chunk start, inclusive) and S_c the
state entering the chunk:

    y_i         = sum_{j <= i} (C_i . B_j) exp(a_i - a_j) dt_j x_j + exp(a_i) C_i^T S_c
    S_{c+1}     = exp(a_L) S_c + sum_j exp(a_L - a_j) dt_j B_j x_j^T

Kernels (ACC = float32, or float64 for float64 inputs; DOT = the operand dtype of tl.dot: the
inputs' half-precision dtype, else ACC):
  cb_kernel          CB[b, g, c] = C_c B_c^T (L x L, ACC), once per group, reused by every head
  state_scan_kernel  sequential over chunks per (b, h, N-tile, P-tile), the state in ACC in
                     registers, a chunk's contribution one tl.dot. Forward: writes S_c in DOT for
                     every chunk (what the products read; half the traffic of ACC for bf16) and the
                     final state in ACC. Backward: the adjoint recursion over chunks last to first,
                     dS_c = exp(a_L) dS_{c+1} + sum_i exp(a_i) C_i dy_i^T; writes dS_{c+1} (the
                     gradient of the state leaving chunk c) per chunk and the initial state's gradient
  chunk_local_state_kernel, state_pass_kernel: the same pass split in two (SSDConfig.state_schedule):
                     every chunk's term sum_j w_j k_j v_j^T in parallel (one dot per chunk and N x P tile),
                     stored in st itself one slot ahead in pass order, then the recursion alone,
                     elementwise over the N * P state in ACC, overwriting each term with a state
  out_fwd_kernel     y per (chunk, P-tile, b, h): the masked quadratic form from CB, plus C S_c
                     (and the skip D[h] x when given: one pass over x instead of three)
  dx_kernel          du_j = sum_{i >= j} (C_i . B_j) exp(a_i - a_j) dy_i + exp(a_L - a_j) dS_{c+1}^T B_j;
                     dx = dt du (+ D[h] dy), and per (chunk, head, P-tile) the P-tile's part of dg,
                     the gradient of the per-step log decay g_t = dt_t A_h (dt's and A's gradients
                     through the decay), with dt's gradient x . du + A dg and A's sum dg dt.
                     (its own P-tile and register cap: SSDConfig.BP_DX, maxnreg_dx)
  dbc_kernel         per (chunk, N-tile, b, g, head split), looping over the split's heads: dC, dB
                     summed over the heads in registers; the intra-chunk part as one L x L sum over
                     the heads multiplied by B and C after the loop

dg_t collects every (i, j) pair whose decay exp(sum_{j < k <= i} g_k) contains g_t (j < t <= i),
split by where i and j lie relative to t's chunk: both inside (with f[i, j] the L x L products,
sum_{i >= t} (sum_j f[i, j] - sum_i' f[i', i]): row minus column sums, a reverse cumulative sum
over the chunk), i inside and j before the chunk (the C_i S_c read-out, a reverse cumulative
sum), j inside and i after it (dS_{c+1} against B_j x_j^T, a cumulative sum), both outside
(exp(a_L) <S_c, dS_{c+1}>). Each part is a sum within one chunk: no cancellation across the
sequence (the shortcut C.dC - B.dB followed by a global reverse cumulative sum would cancel large
terms in low precision).

No atomics: partial results over P-tiles (dg, ddt, dA, dD) and head splits (dB, dC) go to
separate slices that the wrapper sums, so results are deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(ptr, r, c, rmask, cmask, sr, sc):
    """(len(r), len(c)) tile at ptr + r * sr + c * sc, zero outside the masks."""
    return tl.load(ptr + r[:, None] * sr + c[None, :] * sc, mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _chunk_decay(dt_ptr, A_ptr, h, t, tmask, sdt_t, L: tl.constexpr, ACC: tl.constexpr):
    """dt over the chunk (0 past T), the cumulative log decay a (L,) and its last entry a_L."""
    dtv = tl.load(dt_ptr + t * sdt_t, mask=tmask, other=0.0).to(ACC)
    a = tl.cumsum(dtv * tl.load(A_ptr + h).to(ACC), axis=0)
    a_last = tl.sum(tl.where(tl.arange(0, L) == L - 1, a, 0.0), axis=0)
    return dtv, a, a_last


@triton.jit
def _causal_decay(a, L: tl.constexpr):
    """exp(a_i - a_j) for j <= i, else 0 (L x L, rows i)."""
    i = tl.arange(0, L)
    causal = i[None, :] <= i[:, None]
    return tl.exp(tl.where(causal, a[:, None] - a[None, :], float("-inf")))


@triton.jit
def _load_cb(CB_ptr, bg, c, NC, L: tl.constexpr):
    """CB[bg, c] (L x L) of the (B * G, NC, L, L) buffer."""
    i = tl.arange(0, L)
    return tl.load(CB_ptr + (bg * NC + c) * L * L + i[:, None] * L + i[None, :])


@triton.jit
def _read_state(k_ptr, st_ptr, t, tm, p, pm, N, P, sk_t, sk_n, L: tl.constexpr, BN: tl.constexpr,
                BP: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """sum_n k[t, n] st[n, p] over the chunk's rows t (L x BP, ACC); st: one (N, P) state, contiguous."""
    acc = tl.zeros((L, BP), dtype=ACC)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        nm = n < N
        k = _tile(k_ptr, t, n, tm, nm, sk_t, sk_n).to(DOT)
        S = _tile(st_ptr, n, p, nm, pm, P, 1).to(DOT)
        acc += tl.dot(k, S, input_precision=PREC)
    return acc


@triton.jit(do_not_specialize=["T"])
def cb_kernel(C_ptr, B_ptr, CB_ptr, T, G, N, NC,
              sC_b, sC_t, sC_g, sC_n, sB_b, sB_t, sB_g, sB_n,
              L: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """CB[b, g, c] = C_c B_c^T, rows and columns past T zero. Grid (NC, B * G)."""
    c = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // G).to(tl.int64)
    g = bg % G
    t = c * L + tl.arange(0, L)
    tm = t < T
    Cp = C_ptr + b * sC_b + g * sC_g
    Bp = B_ptr + b * sB_b + g * sB_g
    acc = tl.zeros((L, L), dtype=ACC)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        nm = n < N
        Cc = _tile(Cp, t, n, tm, nm, sC_t, sC_n).to(DOT)
        Bt = _tile(Bp, n, t, nm, tm, sB_n, sB_t).to(DOT)  # (BN, L)
        acc += tl.dot(Cc, Bt, input_precision=PREC)
    i = tl.arange(0, L)
    tl.store(CB_ptr + (bg.to(tl.int64) * NC + c) * L * L + i[:, None] * L + i[None, :], acc)  # as _load_cb reads


@triton.jit
def _chunk_contribution(vp, dtp, A_ptr, kp, h, c, n, nm, p, pm, T, sv_t, sv_p, sdt_t, sk_t, sk_n,
                        REVERSE: tl.constexpr, L: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                        PREC: tl.constexpr):
    """Chunk c's term of the state recursion on the tile (n, p): sum_j w_j k_j v_j^T over the chunk
    (BN x BP, ACC; one tl.dot of DOT operands), w = exp(a_L - a) dt forward, exp(a) with REVERSE;
    and the chunk's total decay exp(a_L) (ACC). vp / dtp / kp: (b, h)'s v, dt and (b, g)'s k."""
    t = c * L + tl.arange(0, L)
    tm = t < T
    dtv, a, a_last = _chunk_decay(dtp, A_ptr, h, t, tm, sdt_t, L, ACC)
    w = tl.exp(a) if REVERSE else tl.exp(a_last - a) * dtv
    Kt = _tile(kp, n, t, nm, tm, sk_n, sk_t).to(ACC)  # (BN, L)
    V = _tile(vp, t, p, tm, pm, sv_t, sv_p).to(DOT)  # (L, BP)
    return tl.dot((Kt * w[None, :]).to(DOT), V, input_precision=PREC), tl.exp(a_last)


@triton.jit(do_not_specialize=["T"])
def state_scan_kernel(v_ptr, dt_ptr, A_ptr, k_ptr, start_ptr, st_ptr, end_ptr, T, H, G, N, P, NC, NPB,
                      sv_b, sv_t, sv_h, sv_p, sdt_b, sdt_t, sdt_h, sk_b, sk_t, sk_g, sk_n,
                      REVERSE: tl.constexpr, HAS_START: tl.constexpr, WRITE_END: tl.constexpr, L: tl.constexpr,
                      BN: tl.constexpr, BP: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """The sequential pass over chunks for one (b, h, N-tile, P-tile), the state in ACC in registers:
    store it for chunk c, then S = exp(a_L) S + sum_j w_j k_j v_j^T over the chunk. Forward
    (REVERSE=0; k = B, v = x, w = exp(a_L - a) dt, start = the initial state): st[b, h, c] = S_c,
    the state entering chunk c, and end = the final state. Backward (REVERSE=1, chunks last to
    first; k = C, v = dy, w = exp(a), start = the final state's gradient): st[b, h, c] = dS_{c+1},
    the gradient of the state leaving chunk c, and end = the initial state's gradient (WRITE_END).
    st (B, H, NC, N, P; DOT), start / end (B, H, N, P; ACC) contiguous; k is per group (B, T, G, N),
    v per head (B, T, H, P). Grid (N-tiles * NPB, B * H)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    g = h // (H // G)
    n = (pid // NPB) * BN + tl.arange(0, BN)
    p = (pid % NPB) * BP + tl.arange(0, BP)
    nm, pm = n < N, p < P
    tile = n[:, None] * P + p[None, :]
    smask = nm[:, None] & pm[None, :]
    if HAS_START:
        S = tl.load(start_ptr + bh.to(tl.int64) * N * P + tile, mask=smask, other=0.0).to(ACC)
    else:
        S = tl.zeros((BN, BP), dtype=ACC)
    vp = v_ptr + b * sv_b + h * sv_h
    dtp = dt_ptr + b * sdt_b + h * sdt_h
    kp = k_ptr + b * sk_b + g * sk_g
    sp = st_ptr + bh.to(tl.int64) * NC * N * P
    for i in range(NC):
        c = NC - 1 - i if REVERSE else i
        tl.store(sp + c * N * P + tile, S.to(st_ptr.dtype.element_ty), mask=smask)
        local, decay = _chunk_contribution(vp, dtp, A_ptr, kp, h, c, n, nm, p, pm, T, sv_t, sv_p, sdt_t, sk_t, sk_n,
                                           REVERSE, L, ACC, DOT, PREC)
        S = S * decay + local
    if WRITE_END:
        tl.store(end_ptr + bh.to(tl.int64) * N * P + tile, S, mask=smask)


@triton.jit(do_not_specialize=["T"])
def chunk_local_state_kernel(v_ptr, dt_ptr, A_ptr, k_ptr, st_ptr, end_ptr, decay_ptr, T, H, G, N, P, NC, NNB, NPB,
                             sv_b, sv_t, sv_h, sv_p, sdt_b, sdt_t, sdt_h, sk_b, sk_t, sk_g, sk_n,
                             REVERSE: tl.constexpr, WRITE_END: tl.constexpr, L: tl.constexpr, BN: tl.constexpr,
                             BP: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """The split schedule's first half, parallel over chunks: chunk c's term of state_scan_kernel's
    recursion (_chunk_contribution, same k, v, w) on one (N-tile, P-tile) of (b, h), stored where
    state_pass_kernel reads it: in the st slot of the state that follows c in the pass order
    (st[b, h, c + 1] forward, st[b, h, c - 1] with REVERSE; rounded to st's dtype, DOT), or, for the
    pass's last chunk (c = NC - 1 forward, 0 with REVERSE), in end[b, h] (ACC; with WRITE_END, else
    not stored). The N-tile 0, P-tile 0 program also stores exp(a_L) to decay[b, h, c].
    st (B, H, NC, N, P), end (B, H, N, P), decay (B, H, NC): contiguous. Grid (NC * NNB * NPB, B * H)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    c = pid // (NNB * NPB)
    nb = pid % (NNB * NPB) // NPB
    pb = pid % NPB
    b = (bh // H).to(tl.int64)
    h = bh % H
    n = nb * BN + tl.arange(0, BN)
    p = pb * BP + tl.arange(0, BP)
    nm, pm = n < N, p < P
    local, decay = _chunk_contribution(v_ptr + b * sv_b + h * sv_h, dt_ptr + b * sdt_b + h * sdt_h, A_ptr,
                                       k_ptr + b * sk_b + (h // (H // G)) * sk_g, h, c, n, nm, p, pm, T,
                                       sv_t, sv_p, sdt_t, sk_t, sk_n, REVERSE, L, ACC, DOT, PREC)
    if nb + pb == 0:
        tl.store(decay_ptr + bh.to(tl.int64) * NC + c, decay)
    tile = n[:, None] * P + p[None, :]
    smask = nm[:, None] & pm[None, :]
    slot = c - 1 if REVERSE else c + 1
    if (slot >= 0) & (slot < NC):
        tl.store(st_ptr + (bh.to(tl.int64) * NC + slot) * N * P + tile, local.to(st_ptr.dtype.element_ty), mask=smask)
    elif WRITE_END:
        tl.store(end_ptr + bh.to(tl.int64) * N * P + tile, local, mask=smask)


@triton.jit
def state_pass_kernel(st_ptr, decay_ptr, start_ptr, end_ptr, N, P, NC,
                      REVERSE: tl.constexpr, HAS_START: tl.constexpr, WRITE_END: tl.constexpr, BE: tl.constexpr,
                      CH: tl.constexpr, ACC: tl.constexpr):
    """The split schedule's second half: state_scan_kernel's recursion alone, elementwise over BE
    elements of (b, h)'s N * P state, in ACC, on the terms chunk_local_state_kernel left in st / end.
    In pass order (chunks 0 .. NC-1 forward, NC-1 .. 0 with REVERSE) with s_k the k-th chunk:
    S_0 = start (0 without HAS_START), S_k = exp(a_L(s_{k-1})) S_{k-1} + term(s_{k-1}); S_k replaces
    the term in st slot s_k (term(s_{k-1}) is read there, so every slot is read before it is
    written, and the write depends on the read), and with WRITE_END the term in end is replaced by
    exp(a_L(s_{NC-1})) S_{NC-1} + term(s_{NC-1}). st thus ends as state_scan_kernel leaves it. CH
    chunks per step: one (CH, BE) load and store, the CH steps of the recursion in registers.
    Grid (cdiv(N * P, BE), B * H)."""
    e = tl.program_id(0) * BE + tl.arange(0, BE)
    em = e < N * P
    bh = tl.program_id(1).to(tl.int64)
    if HAS_START:
        S = tl.load(start_ptr + bh * N * P + e, mask=em, other=0.0).to(ACC)
    else:
        S = tl.zeros((BE,), dtype=ACC)
    sp = st_ptr + bh * NC * N * P
    dp = decay_ptr + bh * NC
    rows = tl.arange(0, CH)
    for k0 in range(0, NC, CH):
        k = k0 + rows  # positions in pass order; slot s_k holds term(s_{k-1}) for k >= 1
        slot = NC - 1 - k if REVERSE else k
        addr = sp + slot[:, None].to(tl.int64) * N * P + e[None, :]
        terms = tl.load(addr, mask=((k >= 1) & (k < NC))[:, None] & em[None, :], other=0.0).to(ACC)  # (CH, BE)
        states = tl.zeros((CH, BE), dtype=ACC)
        for r in tl.static_range(CH):
            prev = NC - k0 - r if REVERSE else k0 + r - 1  # s_{k-1}
            decay = tl.load(dp + prev, mask=(k0 + r >= 1) & (k0 + r < NC), other=1.0)
            row = rows[:, None] == r  # within a thread: the launch gives each thread whole columns
            S = S * decay + tl.sum(tl.where(row, terms, -0.0), axis=0)
            states = tl.where(row, S[None, :], states)
        tl.store(addr, states.to(st_ptr.dtype.element_ty), mask=(k < NC)[:, None] & em[None, :])
    if WRITE_END:
        ep = end_ptr + bh * N * P + e
        S = S * tl.load(dp + (0 if REVERSE else NC - 1)) + tl.load(ep, mask=em, other=0.0)
        tl.store(ep, S, mask=em)


@triton.jit(do_not_specialize=["T"])
def out_fwd_kernel(x_ptr, dt_ptr, A_ptr, C_ptr, CB_ptr, st_ptr, D_ptr, y_ptr, T, H, G, N, P, NC, NPB,
                   sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sC_b, sC_t, sC_g, sC_n,
                   sy_b, sy_t, sy_h, sy_p,
                   HAS_D: tl.constexpr, L: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
                   ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """y for one chunk and P-tile of (b, h): the masked quadratic form plus exp(a) C S_c, plus
    D[h] x with HAS_D. Grid (NC * NPB, B * H)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    c = pid // NPB
    b = (bh // H).to(tl.int64)
    h = bh % H
    g = h // (H // G)
    t = c * L + tl.arange(0, L)
    tm = t < T
    p = (pid % NPB) * BP + tl.arange(0, BP)
    pm = p < P
    dtv, a, a_last = _chunk_decay(dt_ptr + b * sdt_b + h * sdt_h, A_ptr, h, t, tm, sdt_t, L, ACC)
    cb = _load_cb(CB_ptr, b * G + g, c, NC, L)
    scores = (cb * _causal_decay(a, L) * dtv[None, :]).to(DOT)
    X = _tile(x_ptr + b * sx_b + h * sx_h, t, p, tm, pm, sx_t, sx_p).to(DOT)
    y = tl.dot(scores, X, input_precision=PREC)
    inter = _read_state(C_ptr + b * sC_b + g * sC_g, st_ptr + (bh.to(tl.int64) * NC + c) * N * P, t, tm, p, pm,
                        N, P, sC_t, sC_n, L, BN, BP, ACC, DOT, PREC)
    y += tl.exp(a)[:, None] * inter
    if HAS_D:
        y += tl.load(D_ptr + h).to(ACC) * X.to(ACC)
    yp = y_ptr + b * sy_b + h * sy_h
    tl.store(yp + t[:, None] * sy_t + p[None, :] * sy_p, y.to(y_ptr.dtype.element_ty), mask=tm[:, None] & pm[None, :])


@triton.jit
def _read_states(B_ptr, C_ptr, st_ptr, dst_ptr, t, tm, p, pm, N, P, sB_t, sB_n, sC_t, sC_n, L: tl.constexpr,
                 BN: tl.constexpr, BP: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """Over the chunk's rows t and P-tile p, with S = S_c and dS = dS_{c+1} (each one (N, P) state,
    contiguous): B dS and C S (L x BP, ACC) and sum_{n, p} S * dS (scalar, ACC)."""
    BdS = tl.zeros((L, BP), dtype=ACC)
    CS = tl.zeros((L, BP), dtype=ACC)
    SdS = tl.zeros((BP,), dtype=ACC)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        nm = n < N
        S = _tile(st_ptr, n, p, nm, pm, P, 1)
        dS = _tile(dst_ptr, n, p, nm, pm, P, 1)
        BdS += tl.dot(_tile(B_ptr, t, n, tm, nm, sB_t, sB_n).to(DOT), dS.to(DOT), input_precision=PREC)
        CS += tl.dot(_tile(C_ptr, t, n, tm, nm, sC_t, sC_n).to(DOT), S.to(DOT), input_precision=PREC)
        SdS += tl.sum(S.to(ACC) * dS.to(ACC), axis=0)
    return BdS, CS, tl.sum(SdS, axis=0)


@triton.jit(do_not_specialize=["T"])
def dx_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, CB_ptr, st_ptr, dst_ptr, dy_ptr, D_ptr, dx_ptr, ddt_ptr, dA_ptr,
              dD_ptr, T, H, G, N, P, NC, NPB, BATCH,
              sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sB_b, sB_t, sB_g, sB_n, sC_b, sC_t, sC_g, sC_n,
              sdy_b, sdy_t, sdy_h, sdy_p, sdx_b, sdx_t, sdx_h, sdx_p,
              HAS_D: tl.constexpr, L: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
              ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """For one chunk and P-tile of (b, h): du, dx = dt du (+ D[h] dy), and this P-tile's parts of
    dg (the gradient of the log decay g_t = dt_t A_h, every part linear in the P-sums) and of
    ddt = x . du + A[h] dg, written to ddt[pb, b, t, h] ((NPB, B, T, H) contiguous, ACC), with
    dA[b, c, pb, h] = sum_t dg dt and with HAS_D dD[b, c, pb, h] = sum x . dy ((B, NC, NPB, H)
    contiguous, ACC). Grid (NC * NPB, B * H)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    c = pid // NPB
    pb = pid % NPB
    b = (bh // H).to(tl.int64)
    h = bh % H
    g = h // (H // G)
    t = c * L + tl.arange(0, L)
    tm = t < T
    p = pb * BP + tl.arange(0, BP)
    pm = p < P
    dtv, a, a_last = _chunk_decay(dt_ptr + b * sdt_b + h * sdt_h, A_ptr, h, t, tm, sdt_t, L, ACC)
    W = _load_cb(CB_ptr, b * G + g, c, NC, L) * _causal_decay(a, L)  # [i, j] = (C_i . B_j) exp(a_i - a_j), j <= i
    dY = _tile(dy_ptr + b * sdy_b + h * sdy_h, t, p, tm, pm, sdy_t, sdy_p).to(DOT)
    Xd = _tile(x_ptr + b * sx_b + h * sx_h, t, p, tm, pm, sx_t, sx_p).to(DOT)
    du = tl.dot(tl.trans(W.to(DOT)), dY, input_precision=PREC)
    # dg_t = sum over the pairs (i, j) with j < t <= i, by where they lie. Both inside the chunk: with
    # f[i, j] = dy_i . x_j W[i, j] dt_j (0 above the diagonal), sum_{i >= t} (rowsum_i - colsum_i) (a
    # reverse cumulative sum over the chunk below; no L x L cumulative sum)
    f = tl.dot(dY, tl.trans(Xd), input_precision=PREC) * W * dtv[None, :]
    inside = tl.sum(f, axis=1) - tl.sum(f, axis=0)
    state = (bh.to(tl.int64) * NC + c) * N * P
    BdS, CS, SdS = _read_states(B_ptr + b * sB_b + g * sB_g, C_ptr + b * sC_b + g * sC_g, st_ptr + state,
                                dst_ptr + state, t, tm, p, pm, N, P, sB_t, sB_n, sC_t, sC_n, L, BN, BP, ACC, DOT, PREC)
    w_end = tl.exp(a_last - a)
    du += w_end[:, None] * BdS
    X, dYa = Xd.to(ACC), dY.to(ACC)
    dx = du * dtv[:, None]
    if HAS_D:
        dx += tl.load(D_ptr + h).to(ACC) * dYa
        tl.store(dD_ptr + ((b * NC + c) * NPB + pb) * H + h, tl.sum(tl.sum(X * dYa, axis=1), axis=0))
    dxp = dx_ptr + b * sdx_b + h * sdx_h
    tl.store(dxp + t[:, None] * sdx_t + p[None, :] * sdx_p, dx.to(dx_ptr.dtype.element_ty), mask=tm[:, None] & pm[None, :])
    # i >= t inside with j before the chunk (the C_i S_c read-out); j < t inside with i after it
    # (dS_{c+1} against B_j x_j^T); both outside (exp(a_L) <S_c, dS_{c+1}>)
    readout = tl.exp(a) * tl.sum(dYa * CS, axis=1)
    into = w_end * dtv * tl.sum(X * BdS, axis=1)
    dg = tl.cumsum(inside + readout, axis=0, reverse=True) + (tl.cumsum(into, axis=0) - into)
    dg += tl.exp(a_last) * SdS
    dg = tl.where(tm, dg, 0.0)
    tl.store(ddt_ptr + ((pb * BATCH + b) * T + t) * H + h, tl.sum(X * du, axis=1) + tl.load(A_ptr + h).to(ACC) * dg,
             mask=tm)
    tl.store(dA_ptr + ((b * NC + c) * NPB + pb) * H + h, tl.sum(dg * dtv, axis=0))


@triton.jit(do_not_specialize=["T"])
def dbc_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, st_ptr, dst_ptr, dy_ptr, dB_ptr, dC_ptr,
               T, H, G, N, P, NC, NNB, HS,
               sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sB_b, sB_t, sB_g, sB_n, sC_b, sC_t, sC_g, sC_n,
               sdy_b, sdy_t, sdy_h, sdy_p, sd_s, sd_b, sd_t, sd_g, sd_n,
               L: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
               ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """For one chunk, N-tile, (b, g) and head split: dB and dC over the split's heads, written to
    dB / dC[hs, b, t, g, n] ((HS, B, T, G, N), both with the strides sd_*: e.g. slices of the
    gradient of a packed [x | B | C]; ACC, or any dtype with HS = 1). BP >= P: one tile per head, so the
    loop over heads is the only loop (its loads pipeline). The intra-chunk part goes through
    Gsum = sum_h d(loss)/d(C_i . B_j) (L x L), multiplied by B and C once after the loop; the
    state parts are exp(a_i) dy_i S_c^T and exp(a_L - a_j) dt_j x_j dS_{c+1}^T per head.
    Grid (NC * NNB, B * G * HS)."""
    pid = tl.program_id(0)
    prog = tl.program_id(1)
    c = pid // NNB
    nb = pid % NNB
    hs = prog % HS
    bg = prog // HS
    b = (bg // G).to(tl.int64)
    g = bg % G
    HPS = H // G // HS  # heads per split
    t = c * L + tl.arange(0, L)
    tm = t < T
    n = nb * BN + tl.arange(0, BN)
    nm = n < N
    p = tl.arange(0, BP)
    pm = p < P
    Gsum = tl.zeros((L, L), dtype=ACC)
    dC = tl.zeros((L, BN), dtype=ACC)
    dB = tl.zeros((L, BN), dtype=ACC)
    for k in range(HPS):
        h = g * (H // G) + hs * HPS + k
        dtv, a, a_last = _chunk_decay(dt_ptr + b * sdt_b + h * sdt_h, A_ptr, h, t, tm, sdt_t, L, ACC)
        state = ((b * H + h) * NC + c) * N * P
        dY = _tile(dy_ptr + b * sdy_b + h * sdy_h, t, p, tm, pm, sdy_t, sdy_p).to(DOT)
        X = _tile(x_ptr + b * sx_b + h * sx_h, t, p, tm, pm, sx_t, sx_p).to(DOT)
        S = _tile(st_ptr + state, p, n, pm, nm, 1, P).to(DOT)  # (BP, BN): S_c^T
        dS = _tile(dst_ptr + state, p, n, pm, nm, 1, P).to(DOT)
        dyx = tl.dot(dY, tl.trans(X), input_precision=PREC)  # dy_i . x_j
        Gsum += dyx * _causal_decay(a, L) * dtv[None, :]
        dC += tl.exp(a)[:, None] * tl.dot(dY, S, input_precision=PREC)
        dB += (tl.exp(a_last - a) * dtv)[:, None] * tl.dot(X, dS, input_precision=PREC)
    Cc = _tile(C_ptr + b * sC_b + g * sC_g, t, n, tm, nm, sC_t, sC_n).to(DOT)
    Bc = _tile(B_ptr + b * sB_b + g * sB_g, t, n, tm, nm, sB_t, sB_n).to(DOT)
    dC += tl.dot(Gsum.to(DOT), Bc, input_precision=PREC)
    dB += tl.dot(tl.trans(Gsum).to(DOT), Cc, input_precision=PREC)
    out = hs.to(tl.int64) * sd_s + b * sd_b + t[:, None].to(tl.int64) * sd_t + g * sd_g + n[None, :] * sd_n
    omask = tm[:, None] & nm[None, :]
    tl.store(dB_ptr + out, dB.to(dB_ptr.dtype.element_ty), mask=omask)
    tl.store(dC_ptr + out, dC.to(dC_ptr.dtype.element_ty), mask=omask)
