"""Triton feedback solve: the autograd op around the kernels of ``kernels/feedback.py`` and
``kernels/feedback_gemm.py``.

Registered as ``FEEDBACK_SOLVE_IMPLS["triton"]`` (selected by ``impl="auto"`` on CUDA).
Same contract as the dense oracle (``feedback_reference.feedback_solve_dense``):

    q, k: (B, T, H, Dk); gamma: (B, T, H); f: (B, T, H, Dv) -> s: (B, T, H, Dv) in f's dtype,
    s[t] = f[t] + gamma[t] * sum_{j<t} softmax_{j<t}(scale * q[t].k[j]) s[j].

Schedule (``feedback_leaves.py``): row statistics lse, per-leaf inverses N of (I - gamma*P) over
leaves of L rows, then a recursive solve: the first half of a range, one apply of its block of
gamma*P onto the second half, the second half; a leaf is the product N x.  The backward solves
the transposed system with the same schedule backwards in time, then forms dq, dk, dgamma.
Two paths compute the products:

* fused (``feedback_fused.py``; Dk <= 256 and Dv <= 128): flash-attention-style kernels that
  recompute P from q, k and lse; no T x T memory.
* GEMM (``feedback_gemm.py``; wider heads): cuBLAS for the logits and products of row blocks,
  memory-bound Triton epilogues for the softmax parts; a bounded scratch (``scratch_mib``).

Memory per call: O(B*H*T*(Dk + Dv)) work buffers plus the leaf inverses W (B*H*T*L: ACC on the fused
path, the product dtype on the GEMM path);
between forward and backward the solution, the row statistics, (``keep_leaf_inverses``, the
default) W and, on the GEMM path, P of the largest blocks between the backward's bands (at most
``keep_probs_mib``) are kept; with keep_leaf_inverses = 0 the backward recomputes W instead, with
keep_probs_mib = 0 it forms P from q and k again.

CUDA graphs: a call issues tens to hundreds of kernels, and at short sequences their CPU launch
cost, not the GPU, sets the time; on the GEMM path (a sequential chain of leaf products and small
applies, ~5 launches per leaf, ~30-70 us of CPU each) also up to T = 32k.  On CUDA, calls with T <=
``graph_max_T`` (fused path) or ``graph_max_T_gemm`` (GEMM path), and B*T*H*(Dk+Dv) at most
``graph_max_elements`` (``_gemm``), are captured from the second call of a shape on (forward and backward separately)
and replayed (``graph_cache.GRAPHS``): the op allocates its results for every call and a graph
writes them; a graph captured for the call's own tensor addresses (the steady state of a training
loop) reads and writes them in place, other calls of the shape copy in and out of a graph's static
buffers.

Configuration: ``SolveConfig``, passed as ``config``; calls without one use ``DEFAULT_CONFIG``
(which the SESSA_TRITON_CFG debug hook can change at import).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
import triton

from sessa_scale.ops import feedback_fused, feedback_gemm
from sessa_scale.ops.feedback_leaves import leaf_inverse_shape
from sessa_scale.ops.work_buffers import INTERPRET, new_buffer
from sessa_scale.ops.feedback_reference import acc_dtype
from sessa_scale.ops.graph_cache import GRAPHS

FUSED_MAX_DK, FUSED_MAX_DV = 256, 128  # the fused kernels hold a whole head row of q/k and of s in one tile


@dataclass(frozen=True)
class SolveConfig:
    C: int = 32  # diagonal block inverted on chip (64 spills in fp32 "ieee")
    L: int = 512  # fused path: rows per leaf (C * 2^k), at most ...
    min_leaves: int = 8  # ... and at most T / min_leaves rows (a power of two >= C)
    L_gemm: int = 1024  # GEMM path: rows per leaf
    gemm: int = -1  # 1: GEMM path, 0: fused path, -1: GEMM when Dk > 256 or Dv > 128
    fuse_dk: int = 1  # fused path: the backward applies also form dk of their pairs (0: one dk pass over all)
    # Fused-path tiles (a whole head row per tile: BK = Dk, BV = Dv rounded up to powers of two).
    FWD_BM: int = 128  # lse_kernel, fwd_apply_kernel: rows per program
    FWD_BN: int = 64  # ... keys per step
    FWD_WARPS: int = 8
    BWD_BM: int = 128  # bwd_apply_kernel, dk_kernel: keys per program (at most L)
    BWD_BN: int = 64  # ... queries per step
    BWD_WARPS: int = 8  # two accumulators (Y and dk) of BWD_BM x 128 fp32
    DQ_BM: int = 128  # dq_kernel: rows per program
    DQ_BN: int = 64  # ... keys per step
    DQ_WARPS: int = 8
    STAGES: int = 3  # software-pipelining stages of the fused kernels
    BML: int = 32  # leaf products (leaf_kernel): row tile
    BNL: int = 32  # ... contraction tile (a leaf's last row tile takes L / BNL steps: the chain's latency)
    LEAF_WARPS: int = 4  # leaf_kernel and leaf_prep_kernel
    LEAF_STAGES: int = 3  # leaf_kernel's software-pipelining stages
    MERGE_TILE: int = 32  # leaf-inverse merges: B x B chunks, B = min(MERGE_TILE, block size), per program
    MERGE_GEMM_MIN: int = 256  # ... GEMM path: levels of blocks this large or larger through cuBLAS instead (0: none)
    # GEMM path.
    LOGIT_BM: int = 128  # logit kernels (lse partials, gamma*P, dS): rows per program
    LOGIT_BN: int = 256  # ... keys per program (lse partials, gamma*P)
    DS_BN: int = 128  # ... keys per program of the dS kernel (q k^T and lam s^T: one loop where Dk == Dv)
    DS_KEPT_BN: int = 256  # ... where it reads the kept P (one product, lam s^T): a multiple of DS_BN
    LOGIT_BK: int = 64  # ... head-width chunk per step (halved for fp32 inputs)
    LOGIT_WARPS: int = 8
    LOGIT_STAGES: int = 3  # ... software-pipelining stages (at most 2 for fp32 inputs)
    # gamma*P of blocks whose (LOGIT_BM, LOGIT_BN) grid has fewer programs than SMALL_GRID (-1: half the
    # device's SMs) in smaller tiles: the leaf chain's 1024 x 1024 blocks at B*H = 1 fill 32 of 132 SMs
    SMALL_BM: int = 64  # ... rows per program
    SMALL_BN: int = 128  # ... keys per program
    SMALL_WARPS: int = 4
    SMALL_GRID: int = -1  # ... (0: the large tiles everywhere)
    EPI_BM: int = 32  # row reductions (lse, dgamma, delta): rows per program
    EPI_BN: int = 128  # ... columns per step
    EPI_WARPS: int = 4
    # bound on the GEMM path's scratch (P or dS of row blocks, product dtype; SessaLayer 1x768 at 16k on an H200:
    # 128 MiB ran ~0.1 ms faster, but beside the kept P (keep_probs_mib) took 1.56x the Transformer block's memory)
    scratch_mib: int = 64
    # GEMM backward: the transposed solve's applies between ranges of the recursion of at most bwd_band rows
    # (a power-of-two number of leaves whose dS fits the scratch) form dS together with gamma*P in one logit
    # pass; the pairs inside those ranges get dS after the chain, in batched launches
    bwd_band: int = 4096
    # the forward's leaf inverses W are saved for the backward (1) or recomputed there (0): the backward
    # skips their products and merges (6x128 at 2k: ~10% of a call) for B*H*T*L*4 bytes held between the
    # passes (per token and layer: H*L*4 bytes on the fused path, 12 KiB for 6x128 at L = 512; H*L*2 on the GEMM
    # path with half inputs, 2 KiB for 1x768 at L_gemm = 1024)
    keep_leaf_inverses: int = 1
    # GEMM path: P of the applies between the backward's bands (largest first) is kept from the forward for the
    # backward within this many MiB per call, so that there dS takes one logit product (lam s^T) instead of two
    # (1x768 at 16k: the three blocks of 8192 and 4096 rows, 192 MiB, 101M of the 134M causal pairs; 0: none kept,
    # P formed from q and k again)
    keep_probs_mib: int = 192
    # ... the forward forms the kept P right after the row statistics, on a second CUDA stream beside the leaf
    # inverses and the leaf chain (1), or on the caller's stream (0)
    kept_side_stream: int = 1
    graphs: int = 1  # CUDA: replay the forward / backward of a shape seen before as a CUDA graph (0: eager)
    graph_max_T: int = 16384  # ... fused path: up to this length (141 launches per call at 16k, tens of us of host each)
    graph_max_T_gemm: int = 32768  # ... GEMM path: up to this length (its leaf chain's launches, ~360 at 32k, cost the
    # host more than the GPU needs for them: 1x768 at 32k 19.7 ms eager, 16.2 ms replayed, +64 MiB)
    graph_max_elements: int = 1 << 25  # ... fused path: and B*T*H*(Dk+Dv) at most this (a graph's buffers cost memory)
    graph_max_elements_gemm: int = 1 << 26  # ... GEMM path: the same bound (1x768 at 32k: 2^25.6)
    # Resolved by _fit from the shapes (not settings): Dk, Dv and the leaf-prep Dk chunk as tile widths.
    BK: int = 0
    BV: int = 0
    BK_PREP: int = 0


# Small blocks for the CPU interpreter (tests exercise several leaves, diagonal blocks and
# scratch chunks).
INTERPRET_CONFIG = SolveConfig(C=16, L=32, L_gemm=32, min_leaves=1, FWD_BM=16, FWD_BN=16, FWD_WARPS=1, BWD_BM=16,
                               BWD_BN=16, BWD_WARPS=1, DQ_BM=16, DQ_BN=16, DQ_WARPS=1, STAGES=1, BML=16, BNL=16,
                               LEAF_WARPS=1, MERGE_TILE=16, MERGE_GEMM_MIN=0, LOGIT_BM=16, LOGIT_BN=16, DS_BN=16,
                               DS_KEPT_BN=64, LOGIT_BK=16, LOGIT_WARPS=1, LOGIT_STAGES=1, SMALL_BM=16, SMALL_BN=16,
                               SMALL_WARPS=1, SMALL_GRID=0, EPI_BM=16, EPI_BN=16, EPI_WARPS=1, scratch_mib=0,
                               bwd_band=64, graphs=0)


def parse_config(text: str, base: SolveConfig) -> SolveConfig:
    """base with the fields of "L=256,FWD_BM=64" replaced ("" or "-": base itself)."""
    if text in ("", "-"):
        return base
    return replace(base, **{k: int(v) for k, v in (item.split("=") for item in text.split(","))})


# The config of calls that pass none (the model's): the defaults, or the interpreter's small tiles.
# Debug hook: SESSA_TRITON_CFG="L=256,FWD_BM=64" overrides its fields (tuning without code changes),
# read once, when this module is imported; callers that want another config pass it explicitly.
DEFAULT_CONFIG = parse_config(os.environ.get("SESSA_TRITON_CFG", ""), INTERPRET_CONFIG if INTERPRET else SolveConfig())


def _p2(x: int) -> int:
    return max(16, triton.next_power_of_2(int(x)))


@functools.lru_cache(maxsize=256)  # called on every forward: its dataclass rebuild is CPU time at short T
def _fit(cfg: SolveConfig, T: int, Dk: int, Dv: int, elem_bytes: int) -> SolveConfig:
    """Resolve the path and the leaf size (L = C * 2^k, no larger than T needs), clamp the tiles
    to the shapes and, for wide or fp32 rows, halve the row tiles (shared memory)."""
    C = cfg.C
    gemm = cfg.gemm == 1 or (cfg.gemm == -1 and (Dk > FUSED_MAX_DK or Dv > FUSED_MAX_DV))
    L = cfg.L_gemm if gemm else cfg.L
    if L % C or triton.next_power_of_2(L // C) != L // C:
        raise ValueError(f"SolveConfig.L / L_gemm must be C * 2^k (C={C}); got {L}")
    for bm, bn in ((cfg.FWD_BM, cfg.FWD_BN), (cfg.BWD_BM, cfg.BWD_BN), (cfg.DQ_BM, cfg.DQ_BN)):
        if bm % bn:
            raise ValueError(f"SolveConfig row tiles must be multiples of their column tiles; got {bm} and {bn}")
    if not gemm:
        L = min(L, triton.next_power_of_2(triton.cdiv(T, cfg.min_leaves)))
    L = max(C, min(L, C * triton.next_power_of_2(triton.cdiv(T, C))))
    BK, BV = _p2(Dk), _p2(Dv)
    narrow = lambda bn: bn if elem_bytes <= 2 else max(16, bn // 2)  # noqa: E731  (fp32 / fp64 key tiles)
    ds_bn = min(L, narrow(cfg.DS_BN))  # dgamma slots: L % DS_BN == 0
    h = 2 if elem_bytes * max(BK, BV) > 256 and not INTERPRET else 1  # wide rows: halve tiles (shared memory)
    fwd_bn, dq_bn = max(16, cfg.FWD_BN // h), max(16, cfg.DQ_BN // h)
    bwd_bm = max(16, min(cfg.BWD_BM // h, L))
    return replace(
        cfg, gemm=int(gemm), L=L, BK=BK, BV=BV, BK_PREP=min(BK, 128) if gemm else BK, BML=min(cfg.BML, L),
        BNL=min(cfg.BNL, cfg.BML, L),  # a leaf's contraction tiles must stay inside the leaf
        FWD_BM=max(fwd_bn, cfg.FWD_BM // h), FWD_BN=fwd_bn, DQ_BM=max(dq_bn, cfg.DQ_BM // h), DQ_BN=dq_bn,
        BWD_BM=bwd_bm, BWD_BN=max(16, min(cfg.BWD_BN // h, bwd_bm)),
        STAGES=cfg.STAGES if h == 1 else min(cfg.STAGES, 2),
        MERGE_GEMM_MIN=cfg.MERGE_GEMM_MIN if gemm else 0,  # fused path (L <= 512): cuBLAS levels measured no faster
        # fp32 / fp64 inputs (FMA dots): logit tiles of half the keys and head width, at most 2 stages
        LOGIT_BN=cfg.LOGIT_BN if elem_bytes <= 2 else max(16, cfg.LOGIT_BN // 2),
        DS_BN=ds_bn, DS_KEPT_BN=max(ds_bn, narrow(cfg.DS_KEPT_BN) // ds_bn * ds_bn),
        LOGIT_BK=cfg.LOGIT_BK if elem_bytes <= 2 else max(16, cfg.LOGIT_BK // 2),
        LOGIT_STAGES=cfg.LOGIT_STAGES if elem_bytes <= 2 else min(cfg.LOGIT_STAGES, 2),
        SMALL_BN=cfg.SMALL_BN if elem_bytes <= 2 else max(16, cfg.SMALL_BN // 2),
    )


def _prep(q, k, gamma, f):
    """q, k in the product dtype (float64 if anything is; else q's half or fp32 dtype) with head
    stride D and unit last stride (copied only when they are not), gamma contiguous, f with
    head stride Dv and unit last stride."""
    acc = acc_dtype(q, k, gamma, f)
    in_dt = acc if acc == torch.float64 else q.dtype
    if in_dt not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        in_dt = torch.float32

    def rows_ok(x, dtype):  # the kernels address head h at h * D from a row's start
        x = x.to(dtype)
        return x if x.stride(-1) == 1 and (x.shape[2] == 1 or x.stride(2) == x.shape[-1]) else x.contiguous()

    return rows_ok(q, in_dt), rows_ok(k, in_dt), gamma.contiguous(), rows_ok(f, f.dtype)


def graph_eligible(B: int, T: int, H: int, Dk: int, Dv: int, cfg: SolveConfig) -> bool:
    """Whether CUDA calls of shape (B, T, H, Dk|Dv) under cfg (resolved by _fit: cfg.gemm is the
    path) are captured as CUDA graphs: T and B*T*H*(Dk+Dv) within the path's limits."""
    max_T, max_elements = ((cfg.graph_max_T_gemm, cfg.graph_max_elements_gemm) if cfg.gemm
                           else (cfg.graph_max_T, cfg.graph_max_elements))
    return cfg.graphs == 1 and T <= max_T and B * T * H * (Dk + Dv) <= max_elements


def _backward_input_bytes(q, k, gamma, f, kept: list[torch.Tensor]) -> int:
    """An upper bound of the backward's input bytes (ds, q, k, gamma, f, the solution, lse and the
    kept leaf inverses), which the forward's graph reserves in the shared input arena."""
    B, T, H, _ = q.shape
    ds_and_solution = f.numel() * (f.element_size() + max(f.element_size(), q.element_size()))
    return sum(t.nbytes for t in (q, k, gamma, f, *kept)) + ds_and_solution + B * H * T * 8 + 9 * 256


def forward_outputs(path, q, k, gamma, f) -> tuple[torch.Tensor, ...]:
    """The buffers path.forward writes (in path.head_layout): the solution S in q's (product) dtype,
    which the backward reads, the row statistics lse (B*H, T) in ACC, and the solution in f's dtype
    when that differs.  q, k, gamma, f as _prep returns them."""
    B, T, H, _ = q.shape
    values = path.head_layout(B, T, H, f.shape[-1])
    S = new_buffer(values, q.dtype, q.device)
    lse = new_buffer((B * H, T), acc_dtype(q, k, gamma, f), q.device)
    return (S, lse) if f.dtype == q.dtype else (S, lse, new_buffer(values, f.dtype, q.device))


def backward_outputs(path, q, k, f, S, dtypes) -> list[torch.Tensor]:
    """The buffers path.backward writes: dq, dk (path.head_layout), dgamma (B, T, H), Lam (df in the
    product dtype, path.head_layout) and, when f's dtype differs, df in it; dtypes: those of q, k,
    gamma, f as the caller passed them."""
    B, T, H, Dk = q.shape
    tq, tk, tg, tf = dtypes
    keys, values = path.head_layout(B, T, H, Dk), path.head_layout(B, T, H, f.shape[-1])
    outs = [new_buffer(keys, tq, q.device), new_buffer(keys, tk, q.device), new_buffer((B, T, H), tg, q.device),
            new_buffer(values, S.dtype, q.device)]
    if tf != S.dtype:
        outs.append(new_buffer(values, tf, q.device))
    return outs


def kept_buffers(path, q, lse, cfg: SolveConfig) -> dict[str, torch.Tensor]:
    """What the forward writes for the backward besides its results (cfg resolved by _fit), by the name of
    path.forward's / path.backward's argument: "W", the leaf inverses (in path.leaf_inverse_dtype; not with
    keep_leaf_inverses = 0: the backward recomputes them), and on the GEMM path "P", the kept blocks of P
    (``feedback_gemm.kept_probs_plan``, in q's dtype; not when none fits keep_probs_mib)."""
    B, T, H, _ = q.shape
    kept = {}
    if cfg.keep_leaf_inverses:
        kept["W"] = new_buffer(leaf_inverse_shape(B, T, H, cfg.L), path.leaf_inverse_dtype(q.dtype, lse.dtype),
                               q.device)
    entries = feedback_gemm.kept_probs_entries(B * H, T, q.element_size(), cfg) if cfg.gemm else 0
    if entries:
        kept["P"] = new_buffer((entries,), q.dtype, q.device)
    return kept


class _TritonFeedbackSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, gamma, f, scale, cfg):
        B, T, H, Dk = q.shape
        Dv = f.shape[-1]
        with torch.autocast(q.device.type, enabled=False):
            qc, kc, gc, fc = _prep(q, k, gamma, f)
            cfg = _fit(cfg, T, Dk, Dv, qc.element_size())
            path = feedback_gemm if cfg.gemm else feedback_fused
            ctx.graphed = q.is_cuda and not INTERPRET and graph_eligible(B, T, H, Dk, Dv, cfg)
            outs = forward_outputs(path, qc, kc, gc, fc)
            S, lse = outs[:2]
            kept = kept_buffers(path, qc, lse, cfg)  # outputs of the forward's graph, inputs of the backward's
            names, n = tuple(kept), len(outs)
            GRAPHS(("fwd", scale, cfg),
                   lambda *a: path.forward(*a[:4], a[4:4 + n], scale, cfg, **dict(zip(names, a[4 + n:]))),
                   (qc, kc, gc, fc), (*outs, *kept.values()), ctx.graphed,
                   _backward_input_bytes(qc, kc, gc, fc, list(kept.values())))
        ctx.save_for_backward(qc, kc, gc, fc, S, lse, *kept.values())
        ctx.scale, ctx.cfg, ctx.path, ctx.kept_names = scale, cfg, path, names
        ctx.dtypes = (q.dtype, k.dtype, gamma.dtype, f.dtype)
        # the solution in f's dtype: S itself where the dtypes agree (saved, not modified)
        return path.solution_view(outs[-1] if len(outs) == 3 else S, f.shape)

    @staticmethod
    def backward(ctx, ds):
        qc, kc, gc, fc, S, lse, *kept = ctx.saved_tensors
        path, names = ctx.path, ctx.kept_names
        outs = backward_outputs(path, qc, kc, fc, S, ctx.dtypes)
        w = len(kept)
        with torch.autocast(qc.device.type, enabled=False):
            GRAPHS(("bwd", ctx.scale, ctx.cfg),
                   lambda *a: path.backward(*a[:7], a[7 + w:], ctx.scale, ctx.cfg, **dict(zip(names, a[7:7 + w]))),
                   (ds, qc, kc, gc, fc, S, lse, *kept), outs, ctx.graphed)
        dq, dk, dgamma = path.solution_view(outs[0], qc.shape), path.solution_view(outs[1], kc.shape), outs[2]
        return dq, dk, dgamma, path.solution_view(outs[-1], fc.shape), None, None


@torch.compiler.disable  # torch.compile runs the model around it; the kernels launch (or replay) as they are
def feedback_solve_triton(q, k, gamma, f, scale: float, config: SolveConfig | None = None):
    """Triton feedback solve (see module docstring). ``config`` (default DEFAULT_CONFIG) sets the
    tile sizes, the path and the CUDA-graph policy (``graphs``, ``graph_max_T``, ``graph_max_T_gemm``,
    ``graph_max_elements``, ``graph_max_elements_gemm``)."""
    if config is None:
        config = DEFAULT_CONFIG
    if q.device.type == "cuda" and any(t.dtype == torch.float64 for t in (q, k, gamma, f)):
        # fp64 is for the CPU interpreter tests; on GPU use the torch blocked path.
        from sessa_scale.ops.feedback_chunked import feedback_solve_chunked

        return feedback_solve_chunked(q, k, gamma, f, scale)
    return _TritonFeedbackSolve.apply(q, k, gamma, f, float(scale), config)
