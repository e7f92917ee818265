"""Fused path of the Triton feedback solve (head widths Dk <= 256, Dv <= 128): every product is
a flash-attention-style kernel that recomputes P from q, k and the row statistics, so nothing of
size T x T is ever written (``kernels/feedback.py``).

Layouts as the op (``sessa_scale/ops/feedback_triton.py``): q, k (B, T, H, Dk) in the product
dtype with head stride Dk and unit last stride, gamma (B, T, H) contiguous, f (B, T, H, Dv) with
head stride Dv and unit last stride.  Work buffers (B, T, H, Dv) contiguous.  Memory per call:
forward X (ACC) + S (product dtype) + W (B*H*T*L ACC: the caller's buffer when it keeps W for the
backward, else freed on return), backward Y (ACC) + Lam + W (the forward's, or recomputed) + an ACC dk
accumulator with ``fuse_dk``.
"""

from __future__ import annotations

import torch
import triton

from sessa_scale.kernels import feedback as K
from sessa_scale.ops.feedback_leaves import (
    LOG2E, launch_options, leaf_inverses, leaf_precision, schedule, widen,
)
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


def leaf_inverse_dtype(q_dtype: torch.dtype, acc: torch.dtype) -> torch.dtype:
    """dtype of the leaf inverses W: ACC (leaf_kernel reads them in fp32)."""
    return acc


def head_layout(B: int, T: int, H: int, D: int) -> tuple[int, ...]:
    """Shape of this path's (B, T, H, D) work and result buffers: the op's layout itself."""
    return B, T, H, D


def solution_view(S: torch.Tensor, shape) -> torch.Tensor:
    """A head_layout buffer as the op's (B, T, H, D) output (it already is)."""
    return S


def forward(q, k, gamma, f, outs, scale: float, cfg, W=None) -> None:
    """Writes outs = (S, lse) or (S, lse, S2): the solution S in q's (product) dtype, what the
    backward reads, the row statistics lse (B*H, T) in ACC, base 2, and S2, the solution in f's
    dtype when that differs (head_layout buffers); and the leaf inverses into W when given."""
    B, T, H, Dk = q.shape
    Dv = f.shape[-1]
    S, lse, S2 = outs if len(outs) == 3 else (*outs, None)
    acc, BH = lse.dtype, B * H
    qk_scale = scale * LOG2E
    K.lse_kernel[(triton.cdiv(T, cfg.FWD_BM), BH)](
        q, k, lse, T, H, Dk, qk_scale, *_rows(q), *_rows(k),
        BM=cfg.FWD_BM, BN=cfg.FWD_BN, BK=cfg.BK, PREC="ieee", **launch_options(cfg.FWD_WARPS, cfg.STAGES))
    W = leaf_inverses(q, k, gamma, lse, cfg, qk_scale, W=W)
    X = widen(torch.empty((B, T, H, Dv), dtype=acc, device=q.device), f)
    sx, L = _rows(X), cfg.L

    def apply(l0, l1, e0, e1):
        K.fwd_apply_kernel[(triton.cdiv(l1 - l0, cfg.FWD_BM), BH)](
            q, k, gamma, lse, S, X, T, H, Dk, Dv, qk_scale, *_rows(q), *_rows(k), *_rows(gamma), *sx,
            l0, l1, e0, e1, BM=cfg.FWD_BM, BN=cfg.FWD_BN, BK=cfg.BK, BV=cfg.BV, PREC="ieee",
            **launch_options(cfg.FWD_WARPS, cfg.STAGES))

    schedule(T, L, lambda a: _leaf(W, X, S, S2, a, cfg, False), apply, False, 0, triton.cdiv(T, L))


def backward(ds, q, k, gamma, f, S, lse, outs, scale: float, cfg, W=None) -> None:
    """Writes outs = (dq, dk, dgamma, Lam) or (..., Lam, Lam2) in their dtypes: Lam, the solution of
    the transposed system (df), in the product dtype, and Lam2, df in f's dtype when that differs.
    W: the forward's leaf inverses (None: recomputed here)."""
    B, T, H, Dk = q.shape
    Dv = S.shape[-1]
    dq, dk, dgamma, Lam, Lam2 = outs if len(outs) == 5 else (*outs, None)
    acc, BH = lse.dtype, B * H
    qk_scale = scale * LOG2E
    if W is None:
        W = leaf_inverses(q, k, gamma, lse, cfg, qk_scale)
    Y = widen(torch.empty((B, T, H, Dv), dtype=acc, device=q.device), ds)
    delta = new_buffer((BH, T), acc, q.device)  # delta_t = lam_t . (s_t - f_t), from each leaf product
    dk_acc = torch.zeros((B, T, H, Dk), dtype=acc, device=q.device) if cfg.fuse_dk else None
    sx, L = _rows(Y), cfg.L
    bwd = dict(BK=cfg.BK, BV=cfg.BV, PREC="ieee", **launch_options(cfg.BWD_WARPS, cfg.STAGES))

    def apply(l0, l1, e0, e1):
        dk_out = Y if dk_acc is None else dk_acc
        K.bwd_apply_kernel[(triton.cdiv(e1 - e0, cfg.BWD_BM), BH)](
            q, k, gamma, lse, Lam, Y, S, delta, dk_out, T, H, Dk, Dv, qk_scale, *_rows(q), *_rows(k), *_rows(gamma),
            *sx, *_rows(dk_out), e0, e1, l0, l1, BM=cfg.BWD_BM, BN=cfg.BWD_BN, DK=dk_acc is not None, **bwd)

    schedule(T, L, lambda a: _leaf(W, Y, Lam, Lam2, a, cfg, True, S, f, delta), apply, True, 0, triton.cdiv(T, L))
    del W, Y
    K.dq_kernel[(triton.cdiv(T, cfg.DQ_BM), BH)](
        q, k, gamma, lse, Lam, S, delta, dq, dgamma, T, H, Dk, Dv, qk_scale, scale, *_rows(q), *_rows(k),
        *_rows(gamma), *sx, *_rows(dq), *_rows(dgamma), BM=cfg.DQ_BM, BN=cfg.DQ_BN, BK=cfg.BK, BV=cfg.BV,
        PREC="ieee", **launch_options(cfg.DQ_WARPS, cfg.STAGES))
    acc_in = dk if dk_acc is None else dk_acc
    K.dk_kernel[(triton.cdiv(T, cfg.BWD_BM), BH)](
        q, k, gamma, lse, Lam, S, delta, acc_in, dk, T, H, Dk, Dv, qk_scale, scale, *_rows(q), *_rows(k),
        *_rows(gamma), *sx, *_rows(acc_in), *_rows(dk), L, BM=cfg.BWD_BM, BN=cfg.BWD_BN,
        DIAG=dk_acc is not None, ACC_IN=dk_acc is not None, **bwd)
