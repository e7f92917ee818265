"""Triton feedback solve: autograd wrapper around the kernels in ``kernels/feedback.py``.

Registered as ``FEEDBACK_SOLVE_IMPLS["triton"]`` (selected by ``impl="auto"`` on CUDA).
Same contract as the dense oracle (``feedback_reference.feedback_solve_dense``):

    q, k: (B, T, H, Dk); gamma: (B, T, H); f: (B, T, H, Dv) -> s: (B, T, H, Dv) in f's dtype,
    s[t] = f[t] + gamma[t] * sum_{j<t} softmax_{j<t}(scale * q[t].k[j]) s[j].

Schedule (see kernels/feedback.py): lse pass, per-leaf matrices W (off-diagonal blocks of
gamma*P inside a leaf of L rows and the inverses of the C x C diagonal systems), then a
recursive solve: the first half of a range, one flash-style apply of its block of P onto the
second half, the second half.  The backward solves the transposed system with the same
schedule backwards in time, then computes dq, dk (and dgamma) flash-style.
Memory per (batch, head): O(T * (Dk + Dv)) plus O(T) row statistics plus the leaf matrices
W (T x L, L <= 512 by default, i.e. a constant number of rows' worth).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from kernels import feedback as K

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tests set this: buffers the kernels must fill start as NaN, so unwritten tiles show.
POISON = False


def _new(shape, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class SolveConfig:
    C: int = 32  # diagonal block (rows solved together on chip; 64 spills in fp32 "ieee")
    L: int = 512  # leaf: rows solved sequentially inside one kernel launch
    BM: int = 64  # row tile of the flash-style kernels
    BN: int = 64  # column tile
    BK: int = 128  # contraction tile over Dk (logits)
    BV: int = 128  # Dv tile (apply kernels, and the lam.s contraction in dq/dk)
    BV_LEAF: int = 64  # Dv tile of the sequential leaf kernels (more programs)
    BKO: int = 128  # output Dk tile of dq / dk
    num_warps: int = 4  # flash-style kernels
    num_warps_leaf: int = 4  # sequential leaves and the leaf-matrix prep
    num_stages: int = 2


# Small blocks for the CPU interpreter (tests exercise several leaves and diagonal blocks).
INTERPRET_CONFIG = SolveConfig(C=16, L=32, BM=16, BN=16, BK=16, BV=16, BV_LEAF=16, BKO=16,
                               num_warps=1, num_warps_leaf=1, num_stages=1)


def _p2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def _fit(cfg: SolveConfig, T: int, Dk: int, Dv: int) -> SolveConfig:
    """Clamp tiles to the problem (powers of two >= 16)."""
    C = cfg.C
    Tc = triton.cdiv(T, C) * C
    L = max(C, min(cfg.L, Tc))
    return replace(
        cfg, L=L,
        BK=min(cfg.BK, _p2(Dk)), BKO=min(cfg.BKO, _p2(Dk)),
        BV=min(cfg.BV, _p2(Dv)), BV_LEAF=min(cfg.BV_LEAF, _p2(Dv)),
    )


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
       torch.float64: tl.float64}


def _prep(q, k, gamma, f):
    acc = torch.float64 if any(t.dtype == torch.float64 for t in (q, k, gamma, f)) else torch.float32
    in_dt = acc if acc == torch.float64 else q.dtype
    if in_dt not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        in_dt = torch.float32
    q = q.to(in_dt).contiguous()
    k = k.to(in_dt).contiguous()
    gamma = gamma.contiguous()
    return q, k, gamma, acc, in_dt


def _kw(cfg: SolveConfig, leaf: bool = False) -> dict:
    if INTERPRET:
        return {}
    return {"num_warps": cfg.num_warps_leaf if leaf else cfg.num_warps, "num_stages": cfg.num_stages}


def _forward(q, k, gamma, f, scale, cfg):
    B, T, H, Dk = q.shape
    Dv = f.shape[-1]
    q, k, gamma, acc, in_dt = _prep(q, k, gamma, f)
    cfg = _fit(cfg, T, Dk, Dv)
    prec = "ieee"
    is64 = acc == torch.float64
    BH = B * H
    C, L = cfg.C, cfg.L
    Tc = triton.cdiv(T, C) * C
    X = torch.empty((B, T, H, Dv), dtype=acc, device=q.device)
    X.copy_(f)
    lse = _new((BH, T), acc, q.device)
    W = _new((BH, Tc, L), acc, q.device)
    sq = (q.stride(0), q.stride(1))
    sg = (gamma.stride(0), gamma.stride(1))
    sx = (X.stride(0), X.stride(1))
    kw, kw_leaf = _kw(cfg), _kw(cfg, leaf=True)
    nk, nv = triton.cdiv(Dk, cfg.BK), triton.cdiv(Dv, cfg.BV)
    K.lse_kernel[(triton.cdiv(T, cfg.BM), BH)](
        q, k, lse, T, H, Dk, scale, *sq, *sq, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, NK=nk, PREC=prec, **kw)
    K.leaf_prep_kernel[(Tc // C, BH)](
        q, k, gamma, lse, W, T, H, Dk, scale, *sq, *sq, *sg, Tc, L,
        C=C, BK=cfg.BK, NK=nk, LOG2C=int(math.log2(C)), PREC=prec, **kw_leaf)
    lowp = _TL[in_dt]

    def leaf(a, b):
        K.fwd_leaf_kernel[(triton.cdiv(Dv, cfg.BV_LEAF), BH)](
            W, X, T, H, Dv, *sx, Tc, a, b, L, C=C, BV=cfg.BV_LEAF, PREC=prec, LOWP=lowp, **kw_leaf)

    def apply(r0, r1, c0, c1):
        K.fwd_apply_kernel[(triton.cdiv(r1 - r0, cfg.BM), triton.cdiv(Dv, cfg.BV), BH)](
            q, k, gamma, lse, X, T, H, Dk, Dv, scale, *sq, *sq, *sg, *sx, r0, r1, c0, c1,
            BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BV=cfg.BV, NK=nk, PREC=prec, **kw)

    def solve(a, b):
        n = triton.cdiv(b - a, L)
        if n <= 1:
            leaf(a, b)
            return
        mid = a + (n // 2) * L
        solve(a, mid)
        apply(mid, min(b, T), a, mid)
        solve(mid, b)

    solve(0, Tc)
    return X, lse, W, cfg, (q, k, gamma)


def _backward(ds, q, k, gamma, f, X, lse, W, scale, cfg):
    B, T, H, Dk = q.shape
    Dv = X.shape[-1]
    acc = X.dtype
    is64 = acc == torch.float64
    prec = "ieee"
    BH = B * H
    C, L = cfg.C, cfg.L
    Tc = triton.cdiv(T, C) * C
    Y = torch.empty_like(X)
    Y.copy_(ds)
    sq = (q.stride(0), q.stride(1))
    sg = (gamma.stride(0), gamma.stride(1))
    sx = (X.stride(0), X.stride(1))
    kw, kw_leaf = _kw(cfg), _kw(cfg, leaf=True)
    nk, nv = triton.cdiv(Dk, cfg.BK), triton.cdiv(Dv, cfg.BV)
    lowp = _TL[q.dtype]

    def leaf(a, b):
        K.bwd_leaf_kernel[(triton.cdiv(Dv, cfg.BV_LEAF), BH)](
            W, Y, T, H, Dv, *sx, Tc, a, b, (b - a) // C, L, C=C, BV=cfg.BV_LEAF, PREC=prec, LOWP=lowp, **kw_leaf)

    def apply(r0, r1, c0, c1):
        K.bwd_apply_kernel[(triton.cdiv(r1 - r0, cfg.BM), triton.cdiv(Dv, cfg.BV), BH)](
            q, k, gamma, lse, Y, T, H, Dk, Dv, scale, *sq, *sq, *sg, *sx, r0, r1, c0, c1,
            BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BV=cfg.BV, NK=nk, PREC=prec, **kw)

    def solve(a, b):
        n = triton.cdiv(b - a, L)
        if n <= 1:
            leaf(a, b)
            return
        mid = a + (n // 2) * L
        solve(mid, b)
        apply(a, mid, mid, min(b, T))
        solve(a, mid)

    solve(0, Tc)
    # delta_t = gamma_t lam_t . c_t = lam_t . (s_t - f_t)   (no division by gamma)
    delta = torch.empty((B, H, T), dtype=acc, device=q.device)
    torch.sum(Y * (X - f.to(acc)), dim=-1, out=delta.transpose(1, 2))
    delta = delta.view(BH, T)
    dq = _new(q.shape, q.dtype, q.device)
    dk = _new(k.shape, k.dtype, k.device)
    dg = _new((BH, T), acc, q.device)
    K.bwd_dq_kernel[(triton.cdiv(T, cfg.BM), triton.cdiv(Dk, cfg.BKO), BH)](
        q, k, gamma, lse, delta, X, Y, dq, dg, T, H, Dk, Dv, scale, *sq, *sq, *sg, *sx,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BV=cfg.BV, BKO=cfg.BKO, NK=nk, NV=nv, PREC=prec, **kw)
    K.bwd_dk_kernel[(triton.cdiv(T, cfg.BN), triton.cdiv(Dk, cfg.BKO), BH)](
        q, k, gamma, lse, delta, X, Y, dk, T, H, Dk, Dv, scale, *sq, *sq, *sg, *sx,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BV=cfg.BV, BKO=cfg.BKO, NK=nk, NV=nv, PREC=prec, **kw)
    dgamma = dg.view(B, H, T).transpose(1, 2)
    return dq, dk, dgamma, Y


class _TritonFeedbackSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, gamma, f, scale, cfg):
        with torch.autocast(q.device.type, enabled=False):
            X, lse, W, cfg_fit, (qc, kc, gc) = _forward(q, k, gamma, f, scale, cfg)
        ctx.save_for_backward(qc, kc, gc, f, X, lse, W)
        ctx.scale = scale
        ctx.cfg = cfg_fit
        ctx.dtypes = (q.dtype, k.dtype, gamma.dtype, f.dtype)
        return X if X.dtype == f.dtype else X.to(f.dtype)

    @staticmethod
    def backward(ctx, ds):
        qc, kc, gc, f, X, lse, W = ctx.saved_tensors
        with torch.autocast(qc.device.type, enabled=False):
            dq, dk, dg, lam = _backward(ds, qc, kc, gc, f, X, lse, W, ctx.scale, ctx.cfg)
        tq, tk, tg, tf = ctx.dtypes
        return dq.to(tq), dk.to(tk), dg.to(tg), lam.to(tf), None, None


def config_from_env(base: SolveConfig) -> SolveConfig:
    """SESSA_TRITON_CFG="L=256,BV_LEAF=32" overrides fields (for tuning sweeps)."""
    text = os.environ.get("SESSA_TRITON_CFG", "")
    if not text:
        return base
    return replace(base, **{k: int(v) for k, v in (item.split("=") for item in text.split(","))})


def feedback_solve_triton(q, k, gamma, f, scale: float, config: SolveConfig | None = None):
    """Triton feedback solve (see module docstring). ``config`` overrides the tile sizes."""
    if config is None:
        config = config_from_env(INTERPRET_CONFIG if INTERPRET else SolveConfig())
    if q.device.type == "cuda" and any(t.dtype == torch.float64 for t in (q, k, gamma, f)):
        # fp64 is for the CPU interpreter tests; on GPU use the torch blocked path.
        from sessa_scale.ops.feedback_chunked import feedback_solve_chunked

        return feedback_solve_chunked(q, k, gamma, f, scale)
    return _TritonFeedbackSolve.apply(q, k, gamma, f, float(scale), config)
