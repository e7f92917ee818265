"""Fused path of the Triton feedback solve (head widths Dk <= 256, Dv <= 128): every product is
a flash-attention-style kernel that recomputes P from q, k and the row statistics, so nothing of
size T x T is ever written (``kernels/feedback.py``).

Layouts as the op (``sessa_scale/ops/feedback_triton.py``): q, k (B, T, H, Dk) in the product
dtype with head stride Dk and unit last stride, gamma (B, T, H) contiguous, f (B, T, H, Dv) with
head stride Dv and unit last stride.  Work buffers (B, T, H, Dv) contiguous.  Memory per call:
forward X (ACC) + S (product dtype) + W (B*H*T*L ACC, freed on return), backward Y (ACC) + Lam +
W again (recomputed, not kept between the passes) + an ACC dk accumulator with ``fuse_dk``.
"""

from __future__ import annotations

import torch
import triton

from sessa_scale.kernels import feedback as K
from sessa_scale.ops.feedback_leaves import (
    LOG2E, SideStream, launch_options, leaf_inverses, leaf_precision, new_leaf_inverses, schedule,
)
from sessa_scale.ops.feedback_reference import acc_dtype
from sessa_scale.ops.work_buffers import new_buffer


def _rows(x: torch.Tensor) -> tuple[int, int]:
    """(batch stride, row stride) of a (B, T, H, D) tensor."""
    return x.stride(0), x.stride(1)


def _leaf(W, x, out, out2, a: int, cfg, rev: bool, S=None, f=None, delta=None) -> None:
    """out (and out2, when not None, in its dtype) = N x over the leaf [a, a + L) with its inverse N
    (rev: N^T x); with delta: also delta_t = out_t . (S_t - f_t) (the backward's lam)."""
    B, T, H, Dv = x.shape
    K.leaf_kernel[(cfg.L // cfg.BML, 1, B * H)](
        W, x, out, out if out2 is None else out2, out if S is None else S, x if f is None else f,
        W if delta is None else delta, T, H, Dv, *_rows(x), *_rows(x if f is None else f), W.shape[1], a, cfg.L,
        BML=cfg.BML, BNL=cfg.BNL, BV=cfg.BV, REV=rev, COPY=out2 is not None, DELTA=delta is not None,
        PREC=leaf_precision(out.dtype), **launch_options(cfg.LEAF_WARPS, cfg.LEAF_STAGES))


def solution_view(S: torch.Tensor, shape) -> torch.Tensor:
    """The solution buffer as the op's (B, T, H, Dv) output (it already is)."""
    return S


def split_rows(T: int, cfg) -> int:
    """Rows of the schedule's first half (its n // 2 leaves of n) when the other half's preparation
    (forward) or gradients (backward) run beside the leaf chain on a side stream: with
    ``cfg.overlap``, two leaves or more and the row tiles aligned to that row; else 0 (no split)."""
    n = triton.cdiv(T, cfg.L)
    mid = (n // 2) * cfg.L
    return mid if cfg.overlap and n >= 2 and mid % max(cfg.FWD_BN, cfg.DQ_BN, cfg.BWD_BM) == 0 else 0


def forward(q, k, gamma, f, scale: float, cfg, s_dtype: torch.dtype):
    """-> (S, lse) or (S, lse, S2): the solution S in q's (product) dtype, what the backward reads,
    the row statistics lse (B*H, T) in base 2, and S2, the solution in s_dtype when that differs.
    With a split (``split_rows``) the later half's lse and leaf inverses are formed on a side
    stream while the chain solves the first half."""
    B, T, H, Dk = q.shape
    Dv = f.shape[-1]
    acc, pdt, BH = acc_dtype(q, k, gamma, f), q.dtype, B * H
    qk_scale = scale * LOG2E
    L, n, mid = cfg.L, triton.cdiv(T, cfg.L), split_rows(T, cfg)
    side = SideStream(q.device, mid > 0)
    lse = new_buffer((BH, T), acc, q.device)
    W = new_leaf_inverses(q, lse, cfg)

    def prepare(r0, r1):  # lse and leaf inverses of the leaves in rows [r0, r1)
        K.lse_kernel[(triton.cdiv(r1 - r0, cfg.FWD_BM), BH)](
            q, k, lse, T, H, Dk, qk_scale, *_rows(q), *_rows(k), r0, min(r1, T),
            BM=cfg.FWD_BM, BN=cfg.FWD_BN, BK=cfg.BK, PREC="ieee", **launch_options(cfg.FWD_WARPS, cfg.STAGES))
        leaf_inverses(q, k, gamma, lse, cfg, qk_scale, W, (r0 // L, triton.cdiv(r1, L)))

    prepare(0, mid or T)
    X = torch.empty((B, T, H, Dv), dtype=acc, device=q.device)
    X.copy_(f)
    S = new_buffer((B, T, H, Dv), pdt, q.device)
    S2 = None if s_dtype == pdt else new_buffer((B, T, H, Dv), s_dtype, q.device)
    sx = _rows(X)
    if mid:
        with side:
            prepare(mid, T)
    later_half_ready = side.done()

    def apply(l0, l1, e0, e1):
        K.fwd_apply_kernel[(triton.cdiv(l1 - l0, cfg.FWD_BM), BH)](
            q, k, gamma, lse, S, X, T, H, Dk, Dv, qk_scale, *_rows(q), *_rows(k), *_rows(gamma), *sx,
            l0, l1, e0, e1, BM=cfg.FWD_BM, BN=cfg.FWD_BN, BK=cfg.BK, BV=cfg.BV, PREC="ieee",
            **launch_options(cfg.FWD_WARPS, cfg.STAGES))

    schedule(T, L, lambda a: _leaf(W, X, S, S2, a, cfg, False), apply, False, 0, n,
             between=lambda: side.wait(later_half_ready))
    return (S, lse) if S2 is None else (S, lse, S2)


def backward(ds, q, k, gamma, f, S, lse, scale: float, cfg, dtypes):
    """-> dq, dk, dgamma, df in `dtypes` (df is lam, the solution of the transposed system).
    With a split (``split_rows``) the chain solves the later half first; then the later half's dq,
    dgamma and dk (final from there on) are formed on a side stream while the chain solves the
    first half, and the first half's leaf inverses are formed there before."""
    B, T, H, Dk = q.shape
    Dv = S.shape[-1]
    acc, pdt, BH = lse.dtype, S.dtype, B * H
    qk_scale = scale * LOG2E
    tq, tk, tg, tf = dtypes
    L, n, mid = cfg.L, triton.cdiv(T, cfg.L), split_rows(T, cfg)
    side = SideStream(q.device, mid > 0)
    W = new_leaf_inverses(q, lse, cfg)  # recomputed: cheaper than keeping it
    leaf_inverses(q, k, gamma, lse, cfg, qk_scale, W, (mid // L, n))
    Y = torch.empty((B, T, H, Dv), dtype=acc, device=q.device)
    Y.copy_(ds)
    Lam = new_buffer((B, T, H, Dv), pdt, q.device)
    Lam2 = None if tf == pdt else new_buffer((B, T, H, Dv), tf, q.device)
    delta = new_buffer((BH, T), acc, q.device)  # delta_t = lam_t . (s_t - f_t), from each leaf product
    dk_acc = torch.zeros((B, T, H, Dk), dtype=acc, device=q.device) if cfg.fuse_dk else None
    dq = new_buffer(q.shape, tq, q.device)
    dgamma = new_buffer(gamma.shape, tg, q.device)
    dk = new_buffer(k.shape, tk, q.device)
    sx = _rows(Y)
    bwd = dict(BK=cfg.BK, BV=cfg.BV, PREC="ieee", **launch_options(cfg.BWD_WARPS, cfg.STAGES))
    if mid:
        with side:
            leaf_inverses(q, k, gamma, lse, cfg, qk_scale, W, (0, mid // L))
    first_half_ready = side.done()

    def apply(l0, l1, e0, e1):
        acc_out = Y if dk_acc is None else dk_acc
        K.bwd_apply_kernel[(triton.cdiv(e1 - e0, cfg.BWD_BM), BH)](
            q, k, gamma, lse, Lam, Y, S, delta, acc_out, T, H, Dk, Dv, qk_scale, *_rows(q), *_rows(k),
            *_rows(gamma), *sx, *_rows(acc_out), e0, e1, l0, l1, BM=cfg.BWD_BM, BN=cfg.BWD_BN,
            DK=dk_acc is not None, **bwd)

    def gradients(r0, r1):  # dq, dgamma of rows [r0, r1) and dk of keys [r0, r1): their lam is final
        K.dq_kernel[(triton.cdiv(r1 - r0, cfg.DQ_BM), BH)](
            q, k, gamma, lse, Lam, S, delta, dq, dgamma, T, H, Dk, Dv, qk_scale, scale, *_rows(q), *_rows(k),
            *_rows(gamma), *sx, *_rows(dq), *_rows(dgamma), r0, r1, BM=cfg.DQ_BM, BN=cfg.DQ_BN, BK=cfg.BK,
            BV=cfg.BV, PREC="ieee", **launch_options(cfg.DQ_WARPS, cfg.STAGES))
        acc_in = dk if dk_acc is None else dk_acc
        K.dk_kernel[(triton.cdiv(r1 - r0, cfg.BWD_BM), BH)](
            q, k, gamma, lse, Lam, S, delta, acc_in, dk, T, H, Dk, Dv, qk_scale, scale, *_rows(q), *_rows(k),
            *_rows(gamma), *sx, *_rows(acc_in), *_rows(dk), L, r0, r1, BM=cfg.BWD_BM, BN=cfg.BWD_BN,
            DIAG=dk_acc is not None, ACC_IN=dk_acc is not None, **bwd)

    def between():  # the later half is solved
        with side:
            gradients(mid, T)
        side.wait(first_half_ready)

    schedule(T, L, lambda a: _leaf(W, Y, Lam, Lam2, a, cfg, True, S, f, delta), apply, True, 0, n,
             between=between if mid else None)
    gradients(0, mid or T)
    side.wait(side.done())  # the side stream's work joins before its buffers can be freed or returned
    return dq, dk, dgamma, Lam if Lam2 is None else Lam2
