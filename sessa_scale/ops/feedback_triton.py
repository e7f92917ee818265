"""Triton feedback solve: autograd wrapper around the kernels in ``kernels/feedback.py``.

Registered as ``FEEDBACK_SOLVE_IMPLS["triton"]`` (selected by ``impl="auto"`` on CUDA).
Same contract as the dense oracle (``feedback_reference.feedback_solve_dense``):

    q, k: (B, T, H, Dk); gamma: (B, T, H); f: (B, T, H, Dv) -> s: (B, T, H, Dv) in f's dtype,
    s[t] = f[t] + gamma[t] * sum_{j<t} softmax_{j<t}(scale * q[t].k[j]) s[j].

Schedule (see kernels/feedback.py): lse pass, per-leaf inverses N of (I - gamma*P) over
leaves of L rows (C x C diagonal inverses on chip, merged by blocked products here), then a
recursive solve: the first half of a range, one apply of its block of gamma*P onto the
second half, the second half; a leaf is the product N x.  The backward solves the transposed
system with the same schedule backwards in time, then dq, dk (and dgamma) from row chunks of
dS written to a scratch.  Single heads multiply their leaves with cuBLAS.
Memory per (batch, head): O(T * (Dk + Dv)) plus O(T) row statistics plus the leaf inverses
(T x L, L <= 1024 by default), plus one scratch of at most ``scratch_mib`` MiB per call.

CUDA graphs: a call issues tens to hundreds of kernels, and at small sizes their CPU launch
cost, not the GPU, sets the time.  On CUDA, sizes up to ``SolveConfig.graph_max_elements`` are
captured on the second call of a shape (forward and backward separately) and replayed: inputs are copied into the graph's static buffers and its outputs cloned, so every
call's results (and the tensors saved for its backward) stay its own, whatever runs in
between.  Costs: those copies, and the static buffers of each cached shape (``clear_graphs``
frees them).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from contextlib import contextmanager
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
    C: int = 32  # diagonal block inverted on chip (64 spills in fp32 "ieee")
    L: int = 512  # leaf: rows solved by one product with the leaf inverse (C * 2^k), at most
    min_leaves: int = 16  # ... and, with one-pass applies, at most T / min_leaves rows (a power of two >= C):
    # short sequences take small leaves (H100, 6x128: L = 128 / 256 / 512 fastest at T = 2k / 8k / 16k)
    L_two_pass: int = 1024  # leaf size when the applies are two-pass (wide heads: fewer launches)
    BM: int = 64  # row tile of the flash-style kernels
    BN: int = 64  # column tile
    BK: int = 128  # contraction tile over Dk (logits)
    BV: int = 128  # Dv tile (one-pass applies, and the lam.s contraction of dS)
    BML: int = 64  # leaf product: row tile
    BNL: int = 32  # leaf product: contraction tile
    BV_LEAF: int = 64  # leaf product: Dv tile
    MM_BM: int = 64  # second-pass products: row tile
    MM_BN: int = 64  # second-pass products: contraction tile
    MM_BV: int = 128  # second-pass products: output-width tile
    two_pass: int = -1  # applies: 1 = gamma*P via scratch, 0 = recompute per Dv tile, -1 = auto (Dv > BV)
    scratch_mib: int = 128  # bound on the scratch of the two-pass products (chunked to fit)
    cublas_min: int = 1 << 24  # second-pass products of at least this many A elements per (b, h)
    # go through torch.bmm (cuBLAS) when H == 1 (0: never); smaller ones (or H > 1) use mm_kernel
    num_warps: int = 4  # flash-style kernels
    num_warps_leaf: int = 4  # leaf products and the leaf-matrix prep
    num_warps_mm: int = 4  # second-pass products
    num_stages: int = 2
    num_stages_mm: int = 3
    leaf_cublas: int = 1  # single heads (H == 1): leaf products through torch.bmm (cuBLAS) instead of leaf_kernel
    graphs: int = 1  # CUDA: replay each forward / backward of a shape seen before as one CUDA graph (0: launch eagerly)
    graph_max_elements: int = 1 << 25  # ... only where B*T*H*(Dk+Dv) <= this: launch-bound sizes (larger ones hide
    # their launches behind the GPU work, and a graph's static buffers cost memory)


# Small blocks for the CPU interpreter (tests exercise several leaves, diagonal blocks and
# scratch chunks).
INTERPRET_CONFIG = SolveConfig(C=16, L=32, L_two_pass=32, BM=16, BN=16, BK=16, BV=16, BML=16, BNL=16, BV_LEAF=16,
                               MM_BM=16, MM_BN=16, MM_BV=16, scratch_mib=0, num_warps=1, num_warps_leaf=1,
                               num_warps_mm=1, num_stages=1, num_stages_mm=1, min_leaves=1, graphs=0)
_MIN_SCRATCH = 4096  # elements (scratch_mib = 0: the smallest chunks, for the interpreter tests)


def _p2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def _fit(cfg: SolveConfig, T: int, Dk: int, Dv: int) -> SolveConfig:
    """Clamp tiles to the problem (powers of two >= 16), resolve two_pass, L = C * 2^k."""
    C = cfg.C
    two_pass = int(cfg.two_pass == 1 or (cfg.two_pass == -1 and Dv > cfg.BV))
    L = cfg.L_two_pass if two_pass else cfg.L
    if L % C or triton.next_power_of_2(L // C) != L // C:
        raise ValueError(f"SolveConfig.L / L_two_pass must be C * 2^k (C={C}); got {L}")
    if not two_pass:
        L = min(L, triton.next_power_of_2(triton.cdiv(T, cfg.min_leaves)))
    L = max(C, min(L, C * triton.next_power_of_2(triton.cdiv(T, C))))
    return replace(
        cfg, L=L, two_pass=two_pass, BML=min(cfg.BML, L),
        BK=min(cfg.BK, _p2(Dk)), BV=min(cfg.BV, _p2(Dv)), BV_LEAF=min(cfg.BV_LEAF, _p2(Dv)),
    )


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
       torch.float64: tl.float64}


def _acc_dtype(*tensors) -> torch.dtype:
    """The compute dtype ACC: float64 if any input is, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _prep(q, k, gamma, f):
    """q, k in the input dtype of the products (float64 if anything is; else q's half or fp32
    dtype), contiguous; gamma contiguous."""
    acc = _acc_dtype(q, k, gamma, f)
    in_dt = acc if acc == torch.float64 else q.dtype
    if in_dt not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        in_dt = torch.float32
    return q.to(in_dt).contiguous(), k.to(in_dt).contiguous(), gamma.contiguous()


def _kw(cfg: SolveConfig, kind: str = "flash") -> dict:
    if INTERPRET:
        return {}
    if kind == "mm":
        return {"num_warps": cfg.num_warps_mm, "num_stages": cfg.num_stages_mm}
    return {"num_warps": cfg.num_warps_leaf if kind == "leaf" else cfg.num_warps, "num_stages": cfg.num_stages}


@contextmanager
def _fp32_matmul(prec: str = "ieee"):
    """torch fp32 matmuls in full fp32 (prec "ieee") or TF32 ("tf32"), whatever the caller's setting."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _merge_leaf_inverses(W: torch.Tensor, L: int, C: int, prec: str) -> None:
    """In place: W (B*H, NL*L, L) holds, per leaf, the blocks of A = gamma*P below the
    diagonal, the inverses of the C x C diagonal blocks of (I - A) and zeros above; doubling
    the block size h, N21 = N22 A21 N11 turns it into the full inverse of (I - A).
    prec: "tf32" for half-precision inputs (as the leaf products), else "ieee"."""
    Wl = W.view(-1, L, L)
    base = Wl.storage_offset()
    n = Wl.shape[0]
    h = C
    with _fp32_matmul(prec):
        while h < L:
            size, stride = (n, L // (2 * h), h, h), (L * L, 2 * h * L + 2 * h, L, 1)
            n11 = Wl.as_strided(size, stride, base)
            a21 = Wl.as_strided(size, stride, base + h * L)
            n22 = Wl.as_strided(size, stride, base + h * L + h)
            a21.copy_(torch.matmul(n22, torch.matmul(a21, n11)))
            h *= 2


def _schedule(T: int, L: int, leaf, apply, reverse: bool, a: int, n: int) -> None:
    """Recursive solve over the n leaves [a, a + n * L): first half, apply(l0, l1, e0, e1) of the
    block gamma*P[l0:l1, e0:e1] (later rows x earlier columns), second half; reverse (the
    transposed system of the backward) runs the later half first.  A plain function, not a
    self-referencing closure: such a cycle would keep the call's buffers (held by leaf and apply)
    alive until Python's cyclic garbage collector ran."""
    if n == 1:
        leaf(a)
        return
    mid = a + (n // 2) * L
    first, second = ((mid, n - n // 2), (a, n // 2)) if reverse else ((a, n // 2), (mid, n - n // 2))
    _schedule(T, L, leaf, apply, reverse, *first)
    apply(mid, min(a + n * L, T), a, mid)
    _schedule(T, L, leaf, apply, reverse, *second)


class _Ctx:
    """What every kernel launch of one call shares: inputs, strides, tiles, the scratch."""

    def __init__(self, q, k, gamma, lse, Dv, acc, scale, cfg):
        self.q, self.k, self.gamma, self.lse, self.scale, self.cfg = q, k, gamma, lse, scale, cfg
        self.B, self.T, self.H, self.Dk = q.shape
        self.Dv, self.acc, self.BH = Dv, acc, self.B * self.H
        self.sq = (q.stride(0), q.stride(1))
        self.sg = (gamma.stride(0), gamma.stride(1))
        self.nk, self.nv = triton.cdiv(self.Dk, cfg.BK), triton.cdiv(Dv, cfg.BV)
        self.prec = "ieee"
        self.leaf_prec = "tf32" if q.dtype in (torch.float16, torch.bfloat16) else "ieee"
        self.sdt = acc if q.dtype == torch.float32 or acc == torch.float64 else q.dtype
        self.budget = max(_MIN_SCRATCH, cfg.scratch_mib * 2**20 // torch.finfo(self.sdt).bits * 8)
        self._scratch = None

    def scratch(self, rows: int, cols: int) -> torch.Tensor:
        """A (B*H, rows, cols) view of the scratch (grown past the budget only when one row
        tile of `cols` columns does not fit)."""
        need = self.BH * rows * cols
        if self._scratch is None or self._scratch.numel() < need:
            self._scratch = _new((max(self.budget, need),), self.sdt, self.q.device)
        return self._scratch[:need].view(self.BH, rows, cols)

    def chunk_rows(self, cols: int) -> int:
        """Rows per scratch chunk of `cols` columns (a multiple of BM)."""
        bm = self.cfg.BM
        return max(bm, self.budget // (self.BH * cols) // bm * bm)

    def block_side(self) -> int:
        """Side of the square dS blocks that fit the scratch (a multiple of every row tile)."""
        c = self.cfg
        unit = max(c.BM, c.BN, c.MM_BM)
        return max(unit, math.isqrt(self.budget // self.BH) // unit * unit)

    def tiles(self, out, r0, R, c0, NC, ds=None):
        """tile_kernel over rows [r0, r0+R) x cols [c0, c0+NC): gamma*P, or dS when
        ds = (delta, s, lam, dgp)."""
        c = self.cfg
        dl, s, lam, dgp = ds if ds is not None else (self.lse, out, out, out)
        sx = (s.stride(0), s.stride(1))
        K.tile_kernel[(triton.cdiv(R, c.BM), triton.cdiv(NC, c.BN), self.BH)](
            self.q, self.k, self.gamma, self.lse, dl, s, lam, out, dgp, self.T, self.H, self.Dk, self.Dv,
            self.scale, *self.sq, *self.sq, *self.sg, *sx, r0, R, c0, NC, dgp.shape[1] if ds else 1,
            BM=c.BM, BN=c.BN, BK=c.BK, BV=c.BV, NK=self.nk, NV=self.nv, DS=ds is not None, PREC=self.prec,
            **_kw(c))

    def mm(self, A, transpose, v, v_off, o, o_off, limit=0, lim_off=0, alpha=1.0):
        """O[o_off + m] += alpha * sum_n A[m, n] V[v_off + n] with A = scratch (or its transpose);
        limit / lim_off: the causal bounds of mm_kernel (cuBLAS multiplies the zeros instead)."""
        c = self.cfg
        _, R, NC = A.shape
        M, N, sa = (NC, R, (1, NC)) if transpose else (R, NC, (NC, 1))
        DV = v.shape[-1]
        if self.H == 1 and 0 < c.cublas_min <= M * N and not INTERPRET:
            a = A.transpose(1, 2) if transpose else A
            if a.dtype == self.acc:
                with _fp32_matmul():
                    prod = torch.bmm(a, v[:, v_off:v_off + N, 0])
            else:  # half-precision operands, fp32 output
                prod = torch.bmm(a, v[:, v_off:v_off + N, 0], out_dtype=self.acc)
            o[:, o_off:o_off + M, 0].add_(prod, alpha=alpha)
            return
        bv = min(c.MM_BV, _p2(DV))
        K.mm_kernel[(triton.cdiv(M, c.MM_BM), triton.cdiv(DV, bv), self.BH)](
            A, *sa, v, v.stride(0), v.stride(1), o, o.stride(0), o.stride(1), self.H, M, N, DV,
            v_off, o_off, lim_off, alpha, BM=c.MM_BM, BN=c.MM_BN, BV=bv, LIMIT=limit,
            ACC=_TL[self.acc], PREC=self.prec, **_kw(c, "mm"))

    def apply(self, l0, l1, e0, e1, src, dst, rev):
        """dst[l] += gamma*P[l, e] src[e] (forward), or dst[e] += (gamma*P[l, e])^T src[l] (rev:
        the backward), for later rows l in [l0, l1) and earlier rows e in [e0, e1)."""
        c = self.cfg
        if not c.two_pass:
            kern, r, n = (K.bwd_apply_kernel, (e0, e1), (l0, l1)) if rev else (K.fwd_apply_kernel, (l0, l1), (e0, e1))
            kern[(triton.cdiv(r[1] - r[0], c.BM), triton.cdiv(self.Dv, c.BV), self.BH)](
                self.q, self.k, self.gamma, self.lse, src, dst, self.T, self.H, self.Dk, self.Dv, self.scale,
                *self.sq, *self.sq, *self.sg, dst.stride(0), dst.stride(1), *r, *n,
                BM=c.BM, BN=c.BN, BK=c.BK, BV=c.BV, NK=self.nk, PREC=self.prec, **_kw(c))
            return
        step = self.chunk_rows(e1 - e0)
        for r0 in range(l0, l1, step):
            R = min(step, l1 - r0)
            A = self.scratch(R, e1 - e0)
            self.tiles(A, r0, R, e0, e1 - e0)
            if rev:
                self.mm(A, True, src, r0, dst, e0)
            else:
                self.mm(A, False, src, e0, dst, r0)

    def leaf(self, W, x, s, sl, a, rev):
        """s = N x over the leaf [a, a + L) (rev: N^T x), and its copy sl in the input dtype."""
        c = self.cfg
        if self.H == 1 and c.leaf_cublas:  # (B, rows, Dv) slabs: one batched product over the leaf
            rows = min(c.L, self.T - a)
            N = W[:, a:a + rows, :rows]
            with _fp32_matmul(self.leaf_prec):
                prod = torch.bmm(N.transpose(1, 2) if rev else N, x[:, a:a + rows, 0])
            s[:, a:a + rows, 0] = prod
            if sl is not s:
                sl[:, a:a + rows, 0] = prod
            return
        K.leaf_kernel[(c.L // c.BML, triton.cdiv(self.Dv, c.BV_LEAF), self.BH)](
            W, x, s, sl, self.T, self.H, self.Dv, x.stride(0), x.stride(1), W.shape[1], a, c.L,
            BML=c.BML, BNL=c.BNL, BV=c.BV_LEAF, REV=rev, COPY=sl is not s, PREC=self.leaf_prec, **_kw(c, "leaf"))


def _pair(shape, acc, in_dt, device):
    """A work buffer in ACC and its copy in the input dtype (the same buffer when equal)."""
    full = _new(shape, acc, device)
    return full, (full if in_dt == acc else _new(shape, in_dt, device))


def _forward(q, k, gamma, f, scale, cfg):
    """q, k, gamma as prepared by _prep, cfg by _fit -> S (acc), Sl (input dtype; S itself when
    equal), lse, W: the solution and what the backward needs."""
    B, T, H, Dk = q.shape
    Dv = f.shape[-1]
    acc = _acc_dtype(q, k, gamma, f)
    C, L = cfg.C, cfg.L
    NL = triton.cdiv(T, L)
    lse = _new((B * H, T), acc, q.device)
    ctx = _Ctx(q, k, gamma, lse, Dv, acc, scale, cfg)
    X = torch.empty((B, T, H, Dv), dtype=acc, device=q.device)
    X.copy_(f)
    S, Sl = _pair((B, T, H, Dv), acc, q.dtype, q.device)
    W = _new((ctx.BH, NL * L, L), acc, q.device)
    sq, sg = ctx.sq, ctx.sg
    K.lse_kernel[(triton.cdiv(T, cfg.BM), ctx.BH)](
        q, k, lse, T, H, Dk, scale, *sq, *sq, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, NK=ctx.nk, PREC=ctx.prec,
        **_kw(cfg))
    K.leaf_prep_kernel[(NL * L // C, ctx.BH)](
        q, k, gamma, lse, W, T, H, Dk, scale, *sq, *sq, *sg, NL * L, L,
        C=C, BK=cfg.BK, NK=ctx.nk, LOG2C=int(math.log2(C)), PREC=ctx.prec, **_kw(cfg, "leaf"))
    _merge_leaf_inverses(W, L, C, ctx.leaf_prec)
    _schedule(T, L, lambda a: ctx.leaf(W, X, S, Sl, a, rev=False),
              lambda *blk: ctx.apply(*blk, Sl, X, rev=False), False, 0, NL)
    return S, Sl, lse, W


def _backward(ds, q, k, gamma, f, S, Sl, lse, W, scale, cfg, dtypes):
    """-> dq, dk, dgamma, df in `dtypes` (df is the solution lam of the transposed system)."""
    B, T, H, Dk = q.shape
    Dv = S.shape[-1]
    acc = S.dtype
    NL = triton.cdiv(T, cfg.L)
    ctx = _Ctx(q, k, gamma, lse, Dv, acc, scale, cfg)
    Y = torch.empty_like(S)
    Y.copy_(ds)
    Lam, Ll = _pair(S.shape, acc, Sl.dtype, q.device)
    _schedule(T, cfg.L, lambda a: ctx.leaf(W, Y, Lam, Ll, a, rev=True),
              lambda *blk: ctx.apply(*blk, Ll, Y, rev=True), True, 0, NL)
    del Y
    # delta_t = gamma_t lam_t . c_t = lam_t . (s_t - f_t)   (no division by gamma)
    delta = torch.empty((B, H, T), dtype=acc, device=q.device)
    torch.sum(Lam * (S - f), dim=-1, out=delta.transpose(1, 2))
    delta = delta.view(ctx.BH, T)
    # dq = scale dS k, dk = scale dS^T q, dgamma_t = sum_j P_tj lam_t.s_j, over square blocks of
    # dS (causal ones only) written to the scratch; fp32 accumulators across blocks.
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dgp = torch.zeros((ctx.BH, triton.cdiv(T, cfg.BN), T), dtype=acc, device=q.device)
    step = ctx.block_side()
    for r0 in range(0, T, step):
        R = min(step, T - r0)
        for c0 in range(0, r0 + R, step):
            NC = min(step, r0 + R - c0)
            A = ctx.scratch(R, NC)
            ctx.tiles(A, r0, R, c0, NC, ds=(delta, Sl, Ll, dgp))
            ctx.mm(A, False, k, c0, dq, r0, limit=1, lim_off=r0 - c0, alpha=scale)
            ctx.mm(A, True, q, r0, dk, c0, limit=2, lim_off=c0 - r0, alpha=scale)
    dgamma = dgp.sum(1).view(B, H, T).transpose(1, 2)
    tq, tk, tg, tf = dtypes
    df = Ll if Ll.dtype == tf else Lam.to(tf)
    return dq.to(tq), dk.to(tk), dgamma.to(tg), df


# ----------------------------------------------------------------------------- CUDA graphs

_GRAPHS: OrderedDict = OrderedDict()  # (direction, config, shapes, dtypes, device) -> _Graph, least recent first
_SEEN: OrderedDict = OrderedDict()  # keys called once so far (a shape is captured on its second call)
GRAPH_CACHE_SIZE = 8  # captured calls kept (a forward and a backward per shape)


class _Graph:
    """One captured call of fn: static copies of its inputs, the CUDA graph, its static outputs."""

    def __init__(self, fn, inputs):
        self.inputs = [t.detach().clone(memory_format=torch.contiguous_format) for t in inputs]
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # on a side stream, into a private memory pool
            self.outputs = fn(*self.inputs)

    def __call__(self, inputs):
        for static, t in zip(self.inputs, inputs):
            static.copy_(t)
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)  # later replays overwrite the static outputs


def _graph_eligible(q: torch.Tensor, f: torch.Tensor, cfg: SolveConfig) -> bool:
    B, T, H, Dk = q.shape
    return cfg.graphs == 1 and q.is_cuda and not INTERPRET and B * T * H * (Dk + f.shape[-1]) <= cfg.graph_max_elements


def _call(direction: str, fn, inputs, key: tuple, graphed: bool):
    """fn(*inputs), or a replay of the CUDA graph cached under (direction, key, input shapes): the
    first call of a shape runs eagerly (compiling its kernels; one-off shapes such as prompt lengths
    are never captured), the second captures it.  Inside a caller's own CUDA-graph capture fn runs
    as it is, into that graph."""
    if not graphed or torch.cuda.is_current_stream_capturing():
        return fn(*inputs)
    key = (direction, key, tuple((t.shape, t.dtype) for t in inputs), inputs[0].device)
    entry = _GRAPHS.get(key)
    if entry is None:
        if key not in _SEEN:
            _SEEN[key] = None
            while len(_SEEN) > 8 * GRAPH_CACHE_SIZE:
                _SEEN.popitem(last=False)
            return fn(*inputs)
        entry = _GRAPHS[key] = _Graph(fn, inputs)
        while len(_GRAPHS) > GRAPH_CACHE_SIZE:
            _GRAPHS.popitem(last=False)
    _GRAPHS.move_to_end(key)
    return entry(inputs)


def clear_graphs() -> None:
    """Drop every captured CUDA graph and its static buffers (benchmarks measure memory with a cold cache)."""
    _GRAPHS.clear()
    _SEEN.clear()


class _TritonFeedbackSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, gamma, f, scale, cfg):
        B, T, H, Dk = q.shape
        with torch.autocast(q.device.type, enabled=False):
            qc, kc, gc = _prep(q, k, gamma, f)
            cfg = _fit(cfg, T, Dk, f.shape[-1])
            ctx.graphed = _graph_eligible(q, f, cfg)
            S, Sl, lse, W = _call("fwd", lambda *a: _forward(*a, scale, cfg), (qc, kc, gc, f), (scale, cfg),
                                  ctx.graphed)
        ctx.save_for_backward(qc, kc, gc, f, S, Sl, lse, W)
        ctx.scale, ctx.cfg = scale, cfg
        ctx.dtypes = (q.dtype, k.dtype, gamma.dtype, f.dtype)
        for out in (Sl, S):  # the solution in f's dtype without a copy where one exists (saved, not modified)
            if out.dtype == f.dtype:
                return out
        return S.to(f.dtype)

    @staticmethod
    def backward(ctx, ds):
        qc, kc, gc, f, S, Sl, lse, W = ctx.saved_tensors
        with torch.autocast(qc.device.type, enabled=False):
            grads = _call("bwd", lambda *a: _backward(*a, ctx.scale, ctx.cfg, ctx.dtypes),
                          (ds, qc, kc, gc, f, S, Sl, lse, W), (ctx.scale, ctx.cfg, ctx.dtypes), ctx.graphed)
        return (*grads, None, None)


def config_from_env(base: SolveConfig) -> SolveConfig:
    """SESSA_TRITON_CFG="L=256,BV_LEAF=32" overrides fields (for tuning sweeps)."""
    text = os.environ.get("SESSA_TRITON_CFG", "")
    if not text:
        return base
    return replace(base, **{k: int(v) for k, v in (item.split("=") for item in text.split(","))})


@torch.compiler.disable  # torch.compile runs the model around it; the kernels launch (or replay) as they are
def feedback_solve_triton(q, k, gamma, f, scale: float, config: SolveConfig | None = None):
    """Triton feedback solve (see module docstring). ``config`` overrides the tile sizes and
    the CUDA-graph policy (``graphs``, ``graph_max_elements``)."""
    if config is None:
        config = config_from_env(INTERPRET_CONFIG if INTERPRET else SolveConfig())
    if q.device.type == "cuda" and any(t.dtype == torch.float64 for t in (q, k, gamma, f)):
        # fp64 is for the CPU interpreter tests; on GPU use the torch blocked path.
        from sessa_scale.ops.feedback_chunked import feedback_solve_chunked

        return feedback_solve_chunked(q, k, gamma, f, scale)
    return _TritonFeedbackSolve.apply(q, k, gamma, f, float(scale), config)
