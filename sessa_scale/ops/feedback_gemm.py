"""GEMM path of the Triton feedback solve (wide heads: Dk > 256 or Dv > 128, e.g. the paper's
single 768-wide head): the products over T go through cuBLAS (torch.bmm), the logits and the
softmax parts through the logit kernels of ``kernels/feedback_gemm.py``.

A block of rows is handled in two steps: a logit kernel forms q k^T (and lam s^T) tile by tile
and writes P (the forward: U += P s, a leaf then solves for f + gamma U; the backward: gamma*P) or dS
and dgamma partials in the product dtype into a scratch, then cuBLAS takes its product with S / Lam /
k / q.  The row statistics need no scratch (per-tile partials).  Rows go in chunks that keep the
scratch within ``scratch_mib``.  The forward keeps P of the largest blocks between the backward's
bands (``kept_probs_plan``, within ``keep_probs_mib``): there the backward reads it and forms dS with
one logit product (lam s^T) instead of two.  Value-width buffers are head-major (B*H, T, Dv) so that
every product is one batched GEMM; the op's (B, T, H, .) results are views of them.  The logit kernels
read q, k, Lam, S through TMA descriptors (``tma_slab``: copies only for H > 1 or rows a descriptor
cannot address).  The leaf products run in the product dtype (half inputs: bf16 / fp16 leaf inverses
and right-hand sides, fp32 accumulation, the rounding of the off-diagonal products' operands).  Memory
per call: U or Y (ACC), S, Lam (product dtype), W (B*H*T*L in the product dtype: kept from the forward
by the caller, or freed after each pass and recomputed), the kept P (at most keep_probs_mib, held from
the forward to the backward), the scratch, P of the leaf pairs (``form_leaf_pairs``: B*H*T*L/2 in the
product dtype, during a pass), and in the backward ACC dq, dk accumulators and the dgamma partials
(B*H*T*T/DS_BN ACC).

CUDA context: Triton encodes a TMA descriptor at each launch with the CUDA driver, in the thread's
current context.  A thread that has made no CUDA runtime call yet has none (the autograd engine's
device thread when this op's backward is the first work there: "invalid device context"), so
forward and backward begin with a torch launch on the device, which makes its context current.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from sessa_scale.kernels import feedback_gemm as G
from sessa_scale.ops.feedback_leaves import (
    LOG2E, fp32_matmul, launch_options, leaf_inverses, row_tiles, schedule, widen,
)
from sessa_scale.ops.launch_math import sm_count
from sessa_scale.ops.work_buffers import buffers_poisoned, new_buffer

_MIN_SCRATCH_BYTES = 1 << 16  # scratch_mib = 0: the smallest chunks (interpreter tests)
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The device's second stream of form_kept (one per process and device, made on first use)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, D) -> (B*H, T, D): a view for one head, a copy otherwise."""
    B, T, H, D = x.shape
    return x[:, :, 0] if H == 1 else x.transpose(1, 2).reshape(B * H, T, D)


def tma_readable(x: torch.Tensor) -> bool:
    """Whether a TMA descriptor can read x (B*H, T, D) as the slab (B*H*T, D): unit last stride, heads
    T rows apart, rows and start 16-byte aligned."""
    BH, T, D = x.shape
    aligned = (x.stride(1) * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0
    return x.stride(2) == 1 and (BH == 1 or x.stride(0) == T * x.stride(1)) and aligned


def tma_slab(x: torch.Tensor) -> torch.Tensor:
    """x (B*H, T, D) itself where tma_readable, otherwise such a copy (rows padded)."""
    return x if tma_readable(x) else tma_buffer(x.shape, x.dtype, x.device).copy_(x)


def tma_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An empty (B*H, T, D) buffer that tma_slab takes as it is: rows padded to 16 bytes (a view)."""
    BH, T, D = shape
    per_16_bytes = 128 // torch.finfo(dtype).bits
    return torch.empty((BH, T, triton.cdiv(D, per_16_bytes) * per_16_bytes), dtype=dtype, device=device)[..., :D]


def slab_descriptor(x: torch.Tensor, block_rows: int, block_cols: int) -> TensorDescriptor:
    """TMA descriptor of x (B*H, T, D) (as tma_slab returns it) read as the slab (B*H*T, D) in
    (block_rows, block_cols) blocks; reads past the slab give zeros."""
    BH, T, D = x.shape
    return TensorDescriptor(x, [BH * T, D], [x.stride(1), 1], [block_rows, block_cols])


def head_layout(B: int, T: int, H: int, D: int) -> tuple[int, ...]:
    """Shape of this path's (B, T, H, D) work and result buffers: head-major (B*H, T, D)."""
    return B * H, T, D


def solution_view(S: torch.Tensor, shape) -> torch.Tensor:
    """A head-major (B*H, T, D) buffer as the op's (B, T, H, D) layout (a view)."""
    B, T, H, D = shape
    return S.view(B, H, T, D).transpose(1, 2)


_ACCUMULATES_OUT_DTYPE: dict = {}  # device -> whether baddbmm accumulates half x half into an fp32 view


def _accumulates_out_dtype(device: torch.device) -> bool:
    """Whether torch.baddbmm accumulates half x half into an fp32 strided view (torch >= 2.8 on
    CUDA), probed once per device (not inside a CUDA-graph capture, which cannot synchronize:
    there temporaries are used); where not, products go through temporaries."""
    if device in _ACCUMULATES_OUT_DTYPE:
        return _ACCUMULATES_OUT_DTYPE[device]
    if torch.cuda.is_current_stream_capturing():
        return False
    a = torch.ones((2, 16, 16), dtype=torch.bfloat16, device=device)
    full = torch.ones((2, 32, 16), device=device)
    try:
        view = full[:, 8:24]
        torch.baddbmm(view, a, a, out_dtype=torch.float32, out=view)
        accumulates = bool((view == 17).all() and (full[:, :8] == 1).all() and (full[:, 24:] == 1).all())
    except (RuntimeError, TypeError, NotImplementedError):
        accumulates = False
    _ACCUMULATES_OUT_DTYPE[device] = accumulates
    return accumulates


def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b (batched; out in ACC, possibly a strided view of a larger buffer)."""
    if a.dtype == out.dtype:
        with fp32_matmul("ieee"):
            out.baddbmm_(a, b)
    elif _accumulates_out_dtype(out.device):
        torch.baddbmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out.add_(torch.bmm(a, b, out_dtype=out.dtype))


def scratch_bytes(cfg) -> int:
    """The scratch's budget in bytes (scratch_mib; 0: the smallest chunks)."""
    return max(_MIN_SCRATCH_BYTES, cfg.scratch_mib << 20)


def band_rows(cfg, BH: int, pdt_bytes: int) -> int:
    """Rows of the backward's bands (``bands``): a power-of-two number of leaves, at most bwd_band rows,
    whose dS (B*H, band, band) in the product dtype fits the scratch."""
    bn = cfg.EPI_BN
    side = max(bn, math.isqrt(scratch_bytes(cfg) // (BH * pdt_bytes)) // bn * bn)
    band = cfg.L
    while band * 2 <= min(cfg.bwd_band, side):
        band *= 2
    return band


@functools.lru_cache(maxsize=256)
def kept_probs_plan(BH: int, T: int, pdt_bytes: int, cfg) -> tuple[tuple[tuple[int, int, int, int], int], ...]:
    """The blocks (l0, l1, e0, e1) whose P the forward keeps for the backward, with their offsets (entries)
    in the kept buffer: the schedule's applies between two of the backward's bands (where the backward
    forms dS in the chain: read P there, and one logit product, lam s^T, is left instead of two), largest
    first, each one whose (B*H, l1 - l0, e1 - e0) entries in the product dtype still fit keep_probs_mib."""
    band_of = bands(T, cfg.L, band_rows(cfg, BH, pdt_bytes))
    starts = [a for a, _ in band_of]
    between: list[tuple[int, int, int, int]] = []

    def record(l0, l1, e0, e1):
        if bisect.bisect_right(starts, l0) != bisect.bisect_right(starts, e0):
            between.append((l0, l1, e0, e1))

    schedule(T, cfg.L, lambda a: None, record, False, 0, triton.cdiv(T, cfg.L))
    left, offset, plan = cfg.keep_probs_mib << 20, 0, []
    for blk in sorted(between, key=lambda b: -(b[1] - b[0]) * (b[3] - b[2])):
        entries = BH * (blk[1] - blk[0]) * (blk[3] - blk[2])
        if entries * pdt_bytes <= left:
            plan.append((blk, offset))
            left, offset = left - entries * pdt_bytes, offset + entries
    return tuple(plan)


def kept_probs_entries(BH: int, T: int, pdt_bytes: int, cfg) -> int:
    """Entries of the kept buffer of kept_probs_plan (0: nothing kept)."""
    return sum(BH * (b[1] - b[0]) * (b[3] - b[2]) for b, _ in kept_probs_plan(BH, T, pdt_bytes, cfg))


def kept_probs_views(P: torch.Tensor | None, BH: int, T: int, pdt_bytes: int, cfg) -> dict:
    """{block: its (B*H, l1 - l0, e1 - e0) view of the kept buffer P} (P None: {})."""
    if P is None:
        return {}
    return {b: P[o:o + BH * (b[1] - b[0]) * (b[3] - b[2])].view(BH, b[1] - b[0], b[3] - b[2])
            for b, o in kept_probs_plan(BH, T, pdt_bytes, cfg)}


class _Blocks:
    """The pieces one call's blocks share: head-major q, k (and their TMA descriptors), the scratch,
    the epilogue launches."""

    def __init__(self, q, k, gamma, lse, scale: float, cfg, scaled: bool, kept=None):
        self.B, self.T, self.H, self.Dk = q.shape
        self.BH, self.gamma, self.lse, self.cfg = self.B * self.H, gamma, lse, cfg
        self.qh, self.kh = tma_slab(_heads_first(q)), tma_slab(_heads_first(k))
        self.q_rows = slab_descriptor(self.qh, cfg.LOGIT_BM, cfg.LOGIT_BK)  # rows of a logit tile
        self.k_keys = slab_descriptor(self.kh, cfg.LOGIT_BN, cfg.LOGIT_BK)  # keys of a LOGIT_BN-wide tile
        self.acc, self.pdt, self.scale, self.qk_scale = lse.dtype, q.dtype, scale, scale * LOG2E
        # bytes per entry of an ACC buffer and of a product-dtype one (the scratch holds P or dS)
        self.acc_bytes, self.pdt_bytes = (torch.finfo(dt).bits // 8 for dt in (self.acc, self.pdt))
        self.budget = scratch_bytes(cfg)
        self._scratch = None
        self.epi = dict(BM=cfg.EPI_BM, BN=cfg.EPI_BN, **launch_options(cfg.EPI_WARPS, 2))
        self.logit = dict(BM=cfg.LOGIT_BM, BK=cfg.LOGIT_BK, PREC="ieee",
                          **launch_options(cfg.LOGIT_WARPS, cfg.LOGIT_STAGES))
        self.small_grid = cfg.SMALL_GRID  # -1: half the SMs (the CPU interpreter: 0, never the small tiles)
        if self.small_grid < 0:
            self.small_grid = sm_count(q.device.index) // 2 if q.device.type == "cuda" else 0
        self._small_tiles = None  # (q, k descriptors, launch options) of the small gamma*P tiles, made on first use
        self.pairs: dict[tuple[int, int, int, int], torch.Tensor] = {}  # form_leaf_pairs' blocks by (r0, r1, e0, e1)
        self.scaled = scaled  # the blocks hold gamma*P (the backward's products) or P (the forward's: U += P s)
        self.kept = kept_probs_views(kept, self.BH, self.T, self.pdt_bytes, cfg)  # P kept for the backward, by block
        self.ready: dict[tuple[int, int, int, int], torch.cuda.Event] = {}  # form_kept's blocks not yet waited for

    def lines_per_chunk(self, length: int, bytes_per_entry: int, extra_bytes: int = 0) -> int:
        """Rows (or columns) of `length` entries whose buffers of bytes_per_entry fit the scratch
        (its budget plus extra_bytes)."""
        bm = self.cfg.EPI_BM
        return max(bm, (self.budget + extra_bytes) // (self.BH * length * bytes_per_entry) // bm * bm)

    def views(self, R: int, NC: int, *dtypes) -> list[torch.Tensor]:
        """(B*H, R, NC) buffers of the given dtypes carved from one scratch, which grows to the
        largest request (the budget, or past it only when a chunk of the smallest height does not
        fit)."""
        sizes = [self.BH * R * NC * torch.finfo(dt).bits // 8 for dt in dtypes]
        need = sum(sizes) + 256 * len(sizes)
        if self._scratch is None or self._scratch.numel() < need:
            self._scratch = None  # freed first (callers hold no views of it), never two at once
            self._scratch = torch.empty(need, dtype=torch.uint8, device=self.qh.device)
        if buffers_poisoned():  # bytes 0xFF are NaN in every float dtype: entries no kernel wrote show
            self._scratch[:need].fill_(255)
        out, off = [], 0
        for dt, size in zip(dtypes, sizes):
            out.append(self._scratch[off:off + size].view(dt).view(self.BH, R, NC))
            off += (size + 255) // 256 * 256
        return out

    def grid(self, R: int, NC: int, BN: int, n: int = 1) -> tuple[int, int, int]:
        """One logit-kernel program per (LOGIT_BM, BN) tile of n (B*H, R, NC) blocks."""
        return triton.cdiv(R, self.cfg.LOGIT_BM), triton.cdiv(NC, BN), self.BH * n

    def leaf_below(self, W: torch.Tensor) -> None:
        """Each leaf's gamma*P strictly below its diagonal into W (B*H, NL*L, L), zeros elsewhere: the
        products of leaf_inverses on the tensor cores (its diagonal inverses follow)."""
        L, NL, BN = self.cfg.L, W.shape[1] // self.cfg.L, self.cfg.LOGIT_BN
        G.leaf_probs_kernel[(triton.cdiv(L, self.cfg.LOGIT_BM), triton.cdiv(L, BN), self.BH * NL)](
            self.q_rows, self.k_keys, W, self.gamma, self.lse, self.T, self.H, L, NL, self.Dk,
            self.gamma.stride(0), self.gamma.stride(1), self.qk_scale, BN=BN, **self.logit)

    def probs_tiles(self, R: int, NC: int, n: int = 1):
        """(grid, q and k descriptors, launch options) of probs_kernel on n (R, NC) blocks per head: the
        (LOGIT_BM, LOGIT_BN) tiles, or the (SMALL_BM, SMALL_BN) ones where those give fewer than
        small_grid programs."""
        grid = self.grid(R, NC, self.cfg.LOGIT_BN, n)
        if grid[0] * grid[1] * grid[2] >= self.small_grid:
            return grid, self.q_rows, self.k_keys, dict(BN=self.cfg.LOGIT_BN, **self.logit)
        cfg = self.cfg
        if self._small_tiles is None:
            self._small_tiles = (slab_descriptor(self.qh, cfg.SMALL_BM, cfg.LOGIT_BK),
                                 slab_descriptor(self.kh, cfg.SMALL_BN, cfg.LOGIT_BK),
                                 dict(BM=cfg.SMALL_BM, BN=cfg.SMALL_BN, BK=cfg.LOGIT_BK, PREC="ieee",
                                      **launch_options(cfg.SMALL_WARPS, cfg.LOGIT_STAGES)))
        q_rows, k_keys, options = self._small_tiles
        return (triton.cdiv(R, cfg.SMALL_BM), triton.cdiv(NC, cfg.SMALL_BN), self.BH * n), q_rows, k_keys, options

    def probs(self, r0: int, r1: int, e0: int, e1: int) -> torch.Tensor:
        """P[r0:r1, e0:e1] (``scaled``: gamma*P; e1 <= r0) in the product dtype, (B*H, r1 - r0, e1 - e0): the
        block formed by form_leaf_pairs, or formed now, into its kept buffer (a kept block) or the scratch."""
        if (r0, r1, e0, e1) in self.pairs:
            return self.pairs[r0, r1, e0, e1]
        R, NC = r1 - r0, e1 - e0
        P = self.kept[r0, r1, e0, e1] if (r0, r1, e0, e1) in self.kept else self.views(R, NC, self.pdt)[0]
        grid, q_rows, k_keys, options = self.probs_tiles(R, NC)
        G.probs_kernel[grid](q_rows, k_keys, P, self.gamma, self.lse, self.T, self.H, r0, R, e0, NC, 1, 0, self.Dk,
                             self.gamma.stride(0), self.gamma.stride(1), self.qk_scale, GAMMA=self.scaled, **options)
        return P

    def form_leaf_pairs(self, starts: list[int]) -> None:
        """P (``scaled``: gamma*P) of the leaf pairs (rows [a + L, a + 2 L) against keys [a, a + L)) for the given
        a, in one launch (several blocks per head) into a buffer of their own (B*H * len(starts) * L * L in the
        product dtype), which probs() then hands out: the schedule's smallest applies, one leaf each,
        each of whose own launches fills a fraction of the GPU (1x768 at 16k: 1024 x 1024 blocks at ~190
        TFLOP/s, inside the chain).  starts: evenly spaced (a run of the schedule's pairs)."""
        L, n = self.cfg.L, len(starts)
        step = starts[1] - starts[0] if n > 1 else 0
        if n == 0 or any(b - a != step for a, b in zip(starts, starts[1:])) or starts[-1] + 2 * L > self.T:
            raise ValueError(f"leaf pairs must be evenly spaced and inside T = {self.T}; got starts {starts}")
        P = new_buffer((self.BH * n, L, L), self.pdt, self.qh.device)
        grid, q_rows, k_keys, options = self.probs_tiles(L, L, n)
        G.probs_kernel[grid](q_rows, k_keys, P, self.gamma, self.lse, self.T, self.H, starts[0] + L, L, starts[0], L,
                             n, step, self.Dk, self.gamma.stride(0), self.gamma.stride(1), self.qk_scale,
                             GAMMA=self.scaled, **options)
        blocks = P.view(self.BH, n, L, L)
        self.pairs.update({(a + L, a + 2 * L, a, a + L): blocks[:, j] for j, a in enumerate(starts)})

    def form_kept(self, side: bool) -> None:
        """P of every kept block into its buffer, now, in the order the forward applies them; side (CUDA): on a
        second stream, beside the leaf inverses and the leaf chain on the caller's (their short launches leave
        most of the GPU idle), each block's apply() waiting for its event.  Then probs() hands them out."""
        stream = _side_stream(self.qh.device) if side else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.qh.device))
        for blk in sorted(self.kept, key=lambda b: b[3]):  # by e1, the split point: the order of the applies
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self.pairs[blk] = self.probs(*blk)
                if stream is not None:
                    self.ready[blk] = torch.cuda.Event()
                    self.ready[blk].record(stream)

    def apply(self, l0: int, l1: int, e0: int, e1: int, src, dst) -> None:
        """dst[l] += P[l, e] src[e] (``scaled``: gamma*P) for later rows l in [l0, l1) and earlier rows e in
        [e0, e1) (src, dst head-major), in chunks of rows that fit the scratch (a block formed before, a leaf
        pair or a kept block: whole)."""
        step = l1 - l0 if (l0, l1, e0, e1) in self.pairs else self.lines_per_chunk(e1 - e0, self.pdt_bytes)
        if (l0, l1, e0, e1) in self.ready:
            torch.cuda.current_stream(self.qh.device).wait_event(self.ready.pop((l0, l1, e0, e1)))
        for r0 in range(l0, l1, step):
            r1 = min(r0 + step, l1)
            _accumulate(dst[:, r0:r1], self.probs(r0, r1, e0, e1), src[:, e0:e1])


def leaf_inverse_dtype(q_dtype: torch.dtype, acc: torch.dtype) -> torch.dtype:
    """dtype of the leaf inverses W the leaf products read: the inputs' half dtype (bf16 / fp16, as
    the off-diagonal products' operands; the inverses themselves are formed in ACC), else ACC."""
    return q_dtype if q_dtype in (torch.float16, torch.bfloat16) else acc


def _leaf_inverses(q, k, gamma, lse, cfg, blocks: _Blocks, W=None) -> torch.Tensor:
    """leaf_inverses in ACC, then (half inputs) rounded to leaf_inverse_dtype, into W when given."""
    dtype = leaf_inverse_dtype(q.dtype, lse.dtype)
    if dtype == lse.dtype:
        return leaf_inverses(q, k, gamma, lse, cfg, blocks.qk_scale, blocks.leaf_below, W)
    inverses = leaf_inverses(q, k, gamma, lse, cfg, blocks.qk_scale, blocks.leaf_below)
    return inverses.to(dtype) if W is None else W.copy_(inverses)


def _leaf(W, x, outs, a: int, rev: bool) -> None:
    """outs[i][:, a:a+R] = N x (rev: N^T x) with the inverse N of the leaf at row a and x (B*H, R, Dv) its
    right-hand side: one cuBLAS product in W's dtype, the product dtype of outs[0] (half inputs: x rounded
    to it, fp32 accumulation), into outs[0]; the others (f's dtype) copy it."""
    rows = x.shape[1]
    N = W[:, a:a + rows, :rows]
    first = outs[0][:, a:a + rows]
    with fp32_matmul("ieee"):  # fp32 leaves (fp32 inputs) in full fp32
        torch.bmm(N.transpose(1, 2) if rev else N, x.to(W.dtype), out=first)
    for out in outs[1:]:
        out[:, a:a + rows] = first


def scaled_rows(gamma, U, out, a: int, f=None) -> torch.Tensor:
    """out[:, :R] = gamma U (f given: f + gamma U) over rows a .. a + R of U (head-major (B*H, T, Dv)), R =
    min(out's rows, T - a), in out's dtype, in one pass (torch's broadcast multiply of mixed dtypes runs at a
    fraction of the bandwidth); gamma (B, T, H), f (B, T, H, Dv) (unit last stride, head stride Dv).
    Returns out[:, :R]."""
    B, T, H = gamma.shape
    Dv = U.shape[-1]
    rows = min(out.shape[1], T - a)
    BM, BV = row_tiles(Dv)
    G.scaled_rows_kernel[(triton.cdiv(rows, BM), B * H)](
        U if f is None else f, gamma, U, out, T, a, rows, H, Dv, 0 if f is None else f.stride(0),
        0 if f is None else f.stride(1), gamma.stride(0), gamma.stride(1), U.stride(0), U.stride(1), out.stride(0),
        out.stride(1), BM=BM, BV=BV, ADD_F=f is not None, **launch_options(4, 2))
    return out[:, :rows]


def _lse(blocks: _Blocks, later_bytes: int) -> None:
    """The row statistics, strip by strip of rows against every earlier key: per-tile partials
    (max and sum, ACC) within the scratch's budget, which may also take later_bytes (the buffers the
    forward allocates only after it: fewer, taller strips at the same peak memory)."""
    T, BH, cfg, BN = blocks.T, blocks.BH, blocks.cfg, blocks.cfg.LOGIT_BN
    step = blocks.lines_per_chunk(triton.cdiv(T, BN), 2 * blocks.acc_bytes, later_bytes)
    for r0 in range(0, T, step):
        r1 = min(r0 + step, T)
        R, NCB = r1 - r0, triton.cdiv(r1, BN)
        m, l = (new_buffer((BH, R, NCB), blocks.acc, blocks.qh.device) for _ in range(2))
        G.lse_partial_kernel[blocks.grid(R, r1, BN)](
            blocks.q_rows, blocks.k_keys, m, l, T, r0, R, r1, NCB, blocks.Dk, blocks.qk_scale, BN=BN, **blocks.logit)
        G.lse_reduce_kernel[(triton.cdiv(R, cfg.EPI_BM), BH)](m, l, blocks.lse, T, r0, R, NCB, **blocks.epi)


def leaf_pair_runs(T: int, L: int, keep=lambda a: True) -> list[list[int]]:
    """The starts a of the schedule's applies of one whole leaf onto the next (rows [a + L, a + 2 L),
    keys [a, a + L)) that keep(a) accepts, as runs of evenly spaced ones (two or more: each run is one
    form_leaf_pairs launch)."""
    starts: list[int] = []
    record = lambda l0, l1, e0, e1: starts.append(e0) if l1 - l0 == L == e1 - e0 and keep(e0) else None  # noqa: E731
    schedule(T, L, lambda a: None, record, False, 0, triton.cdiv(T, L))
    runs: list[list[int]] = []
    for a in sorted(starts):
        if runs and (len(runs[-1]) == 1 or a - runs[-1][-1] == runs[-1][1] - runs[-1][0]):
            runs[-1].append(a)
        else:
            runs.append([a])
    return [run for run in runs if len(run) > 1]


def forward(q, k, gamma, f, outs, scale: float, cfg, W=None, P=None) -> None:
    """Writes outs (and W, P) as ``feedback_fused.forward``, with S, S2 head-major (B*H, T, Dv).  The applies
    accumulate U = sum_j P s_j (ACC, P without gamma: what the backward reads of the blocks it keeps); a
    leaf solves for f + gamma U.  P: the kept buffer (kept_probs_plan), or None."""
    B, T, H, Dk = q.shape
    Dv = f.shape[-1]
    lse = outs[1]
    acc = lse.dtype
    lse.zero_()  # a torch launch first (see "CUDA context" in the module docstring); _lse writes every row
    blocks = _Blocks(q, k, gamma, lse, scale, cfg, scaled=False, kept=P)
    NL = triton.cdiv(T, cfg.L)
    U = torch.zeros((B * H, T, Dv), dtype=acc, device=q.device)
    _lse(blocks, 0 if W is not None else B * H * NL * cfg.L * cfg.L * blocks.acc_bytes)  # the memory of W
    blocks.form_kept(side=bool(cfg.kept_side_stream) and q.is_cuda)
    W = _leaf_inverses(q, k, gamma, lse, cfg, blocks, W)
    L = cfg.L
    for run in leaf_pair_runs(T, L, lambda a: (a + L, a + 2 * L, a, a + L) not in blocks.kept):
        blocks.form_leaf_pairs(run)
    rhs = torch.empty((B * H, min(L, T), Dv), dtype=W.dtype, device=q.device)
    solutions = [outs[0], *outs[2:]]
    schedule(T, L, lambda a: _leaf(W, scaled_rows(gamma, U, rhs, a, f), solutions, a, False),
             lambda *blk: blocks.apply(*blk, outs[0], U), False, 0, NL)


def bands(T: int, L: int, band: int) -> list[tuple[int, int]]:
    """The ranges [a, b) of the schedule's recursion over the leaves of [0, T) that span at most
    `band` rows (or one leaf), in time order.  The backward forms dS inside them after the chain;
    every block the recursion applies between two of them forms its dS in the chain."""
    def split(a: int, n: int) -> list[tuple[int, int]]:
        if n == 1 or n * L <= band:
            return [(a, min(a + n * L, T))]
        return split(a, n // 2) + split(a + n // 2 * L, n - n // 2)

    return split(0, triton.cdiv(T, L))


def _ds_products(dq, dk, dS, q, k, r0: int, r1: int, c0: int, c1: int, bm: int) -> None:
    """dq[r0:r1] += dS k[c0:c1] and dk[c0:c1] += dS^T q[r0:r1] for the dS block (batch, r1 - r0, c1 - c0)
    of rows [r0, r1) and keys [c0, c1) (q, k, dq, dk: (batch, rows, D)).  Its entries with key >= row
    are zeros: where the block holds the diagonal square, its rows and keys are split at the square's
    middle m, and the products skip the zero quadrant (rows < m against keys >= m): a quarter of the
    square instead of half wasted.  m is a multiple of bm past r0 (aligned operands for cuBLAS)."""
    m = r0 + (r1 - r0) // 2 // bm * bm
    if not c0 < m < c1 or m <= r0:
        _accumulate(dq[:, r0:r1], dS, k[:, c0:c1])
        _accumulate(dk[:, c0:c1], dS.transpose(1, 2), q[:, r0:r1])
        return
    early, late = dS[:, :m - r0], dS[:, m - r0:]  # rows before m and from m on
    _accumulate(dq[:, r0:m], early[..., :m - c0], k[:, c0:m])
    _accumulate(dq[:, m:r1], late, k[:, c0:c1])
    _accumulate(dk[:, c0:m], dS[..., :m - c0].transpose(1, 2), q[:, r0:r1])
    _accumulate(dk[:, m:c1], late[..., m - c0:].transpose(1, 2), q[:, m:r1])


class _Gradients:
    """The backward's pieces besides the transposed solve: delta, dS and its products dq, dk (ACC
    accumulators), the dgamma partials (B*H, T, cdiv(T, DS_BN)) (one slot per row and key tile), the
    forward's kept P by block (kept_probs_views)."""

    def __init__(self, blocks: _Blocks, lam, S, f, dq_out, dk_out, P=None):
        cfg, BH, T, dev = blocks.cfg, blocks.BH, blocks.T, lam.device
        self.blocks, self.lam, self.S, self.f, self.BN = blocks, lam, S, f, cfg.DS_BN
        self.kept = kept_probs_views(P, BH, T, blocks.pdt_bytes, cfg)
        self.dq, self.dk = (out.zero_() if out.dtype == blocks.acc else torch.zeros(out.shape, dtype=blocks.acc,
                                                                                     device=dev)
                            for out in (dq_out, dk_out))
        self.NCB = triton.cdiv(T, self.BN)
        self.dgp = torch.zeros((BH, T, self.NCB), dtype=blocks.acc, device=dev)
        self.delta = new_buffer((BH, T), blocks.acc, dev)  # delta_t = lam_t . (s_t - f_t), rows as they become final
        self.delta_from = T
        self.k_keys = slab_descriptor(blocks.kh, self.BN, cfg.LOGIT_BK)  # dS tiles are DS_BN keys wide
        self.lam_rows = slab_descriptor(lam, cfg.LOGIT_BM, cfg.LOGIT_BK)  # lam itself: read as the chain writes it
        s_slab = tma_slab(S)
        self.s_keys = slab_descriptor(s_slab, self.BN, cfg.LOGIT_BK)
        self.s_kept_keys = slab_descriptor(s_slab, cfg.DS_KEPT_BN, cfg.LOGIT_BK)  # ... where dS reads the kept P
        self.bands = bands(T, cfg.L, band_rows(cfg, BH, blocks.pdt_bytes))
        self.band_starts = [a for a, _ in self.bands]

    def _band(self, row: int) -> int:
        """Index of the band holding row."""
        return bisect.bisect_right(self.band_starts, row) - 1

    def finish_delta(self, r0: int) -> None:
        """delta of the rows from r0 on (final by then) that have none yet (the chain finalizes rows from
        the last one back)."""
        if r0 < self.delta_from:
            cfg, Dv = self.blocks.cfg, self.lam.shape[-1]
            BM, BV = row_tiles(Dv)
            G.delta_kernel[(triton.cdiv(self.delta_from - r0, BM), self.blocks.BH)](
                self.lam, self.S, self.f, self.delta, self.blocks.T, r0, self.delta_from - r0, self.blocks.H, Dv,
                self.lam.stride(0), self.lam.stride(1), self.S.stride(0), self.S.stride(1), self.f.stride(0),
                self.f.stride(1), BM=BM, BV=BV, **launch_options(cfg.EPI_WARPS, 2))
            self.delta_from = r0

    def _ds(self, dS, P, r0: int, R: int, c0: int, NC: int, n: int = 1, kept=None) -> None:
        """ds_kernel on n blocks per head of R rows x NC keys from (r0, c0), NC rows apart (n > 1);
        P: gamma*P too; kept (n = 1): the forward's P of these (B*H, R, NC) entries, read instead of formed."""
        b = self.blocks
        pk, bn, s_keys = (dS, self.BN, self.s_keys) if kept is None else (kept, b.cfg.DS_KEPT_BN, self.s_kept_keys)
        G.ds_kernel[b.grid(R, NC, bn, n)](
            b.q_rows, self.k_keys, self.lam_rows, s_keys, dS, dS if P is None else P, pk, self.dgp, b.gamma,
            b.lse, self.delta, b.T, b.H, r0, R, c0, NC, self.NCB, n, NC, b.Dk, self.lam.shape[-1], b.gamma.stride(0),
            b.gamma.stride(1), pk.stride(0), pk.stride(1), b.qk_scale, b.scale, BN=bn, WRITE_P=P is not None,
            READ_P=kept is not None, ONE_LOOP=b.Dk == self.lam.shape[-1], SLOT=self.BN, **b.logit)

    def apply(self, l0: int, l1: int, e0: int, e1: int, Y) -> None:
        """Y[e] += (gamma*P[l, e])^T lam[l] for later rows l in [l0, l1), earlier rows e in [e0, e1), in
        chunks of e.  A block between two bands also forms its dS there (lam[l] is final):
        dq[l] += dS k[e], dk[e] += dS^T q[l]."""
        b = self.blocks
        R = l1 - l0
        if self._band(e0) == self._band(l0):
            step = e1 - e0 if (l0, l1, e0, e1) in b.pairs else b.lines_per_chunk(R, b.pdt_bytes)
            for c0 in range(e0, e1, step):
                c1 = min(c0 + step, e1)
                _accumulate(Y[:, c0:c1], b.probs(l0, l1, c0, c1).transpose(1, 2), self.lam[:, l0:l1])
            return
        self.finish_delta(l0)
        # a kept block: dS from its P (no gamma) and lam s^T, Y[e] += P^T (gamma lam)[l]; otherwise dS and
        # gamma*P (both in the scratch) from q k^T and lam s^T, Y[e] += (gamma*P)^T lam[l]
        kept = self.kept.get((l0, l1, e0, e1))
        if kept is None:
            bn, buffers, lam = self.BN, 2, self.lam[:, l0:l1]
        else:
            bn, buffers = b.cfg.DS_KEPT_BN, 1
            lam = scaled_rows(b.gamma, self.lam, new_buffer((b.BH, R, self.lam.shape[-1]), b.pdt, Y.device), l0)
        step = max(bn, b.lines_per_chunk(R, buffers * b.pdt_bytes) // bn * bn)
        for c0 in range(e0, e1, step):
            c1 = min(c0 + step, e1)
            if kept is None:
                dS, P = b.views(R, c1 - c0, b.pdt, b.pdt)
                self._ds(dS, P, l0, R, c0, c1 - c0)
            else:
                (dS,), P = b.views(R, c1 - c0, b.pdt), kept[:, :, c0 - e0:c1 - e0]
                self._ds(dS, None, l0, R, c0, c1 - c0, kept=P)
            _accumulate(Y[:, c0:c1], P.transpose(1, 2), lam)
            _ds_products(self.dq, self.dk, dS, b.qh, b.kh, l0, l1, c0, c1, b.cfg.LOGIT_BM)

    def band_pass(self) -> None:
        """dS of the pairs inside each band, after the chain: adjacent bands of one size together (one
        head: as many as the scratch holds; several heads: one band per launch, over the heads)."""
        b = self.blocks
        self.finish_delta(0)
        runs: list[list[int]] = []  # [first row, rows per band, bands]
        for a, e in self.bands:
            size = e - a
            if (runs and b.BH == 1 and runs[-1][1] == size and runs[-1][0] + runs[-1][1] * runs[-1][2] == a
                    and (runs[-1][2] + 1) * size * size * b.pdt_bytes <= b.budget):
                runs[-1][2] += 1
            else:
                runs.append([a, size, 1])
        for a, size, n in runs:
            (dS,) = b.views(n * size, size, b.pdt)
            dS = dS.view(b.BH * n, size, size)
            self._ds(dS, None, a, size, a, size, n)
            if n == 1:
                view = lambda x: x[:, a:a + size]  # noqa: E731
            else:  # one head: the bands as a batch
                view = lambda x: x[0, a:a + n * size].view(n, size, x.shape[-1])  # noqa: E731
            _ds_products(view(self.dq), view(self.dk), dS, view(b.qh), view(b.kh), 0, size, 0, size, b.cfg.LOGIT_BM)

    def dgamma(self) -> torch.Tensor:
        """dgamma (B*H, T) from the partials: one rowsum."""
        b = self.blocks
        dg = new_buffer((b.BH, b.T), b.acc, self.lam.device)
        G.rowsum_kernel[(triton.cdiv(b.T, b.cfg.EPI_BM), b.BH)](self.dgp, dg, b.T, 0, b.T, self.NCB, **b.epi)
        return dg


def backward(ds, q, k, gamma, f, S, lse, outs, scale: float, cfg, W=None, P=None) -> None:
    """Writes outs as ``feedback_fused.backward``: dq, dk, Lam (and Lam2) head-major, dgamma (B, T, H);
    W: the forward's leaf inverses (None: recomputed here); P: the forward's kept P (kept_probs_plan) or None.
    The transposed solve's applies between bands (``bands``) form dS with gamma*P (one logit pass for
    both; a kept block: dS from its P and lam s^T) and take dS's products at once; the pairs inside bands
    get dS after the chain."""
    B, T, H, Dk = q.shape
    Dv = S.shape[-1]
    dq_out, dk_out, dgamma, Lam = outs[:4]
    blocks = _Blocks(q, k, gamma, lse, scale, cfg, scaled=True)
    # the dS tiles read lam through a TMA descriptor while the chain writes it: Lam itself where it can be one
    lam = Lam if tma_readable(Lam) else tma_buffer(Lam.shape, Lam.dtype, Lam.device)
    grads = _Gradients(blocks, lam, S, f, dq_out, dk_out, P)  # first: torch launches (its zeros; "CUDA context")
    Y = torch.empty((B * H, T, Dv), dtype=lse.dtype, device=q.device)
    widen(Y.view(B, H, T, Dv).transpose(1, 2), ds)
    if W is None:
        W = _leaf_inverses(q, k, gamma, lse, cfg, blocks)
    for run in leaf_pair_runs(T, cfg.L, lambda a: grads._band(a) == grads._band(a + cfg.L)):  # gamma*P (no dS)
        blocks.form_leaf_pairs(run)
    schedule(T, cfg.L, lambda a: _leaf(W, Y[:, a:a + cfg.L], [lam, *outs[4:]], a, True),
             lambda *blk: grads.apply(*blk, Y), True, 0, triton.cdiv(T, cfg.L))
    del W, Y
    grads.band_pass()
    dg = grads.dgamma()
    for out, result in ((dq_out, grads.dq), (dk_out, grads.dk), (dgamma, dg.view(B, H, T).transpose(1, 2)),
                        (Lam, lam)):
        if out is not result:
            out.copy_(result)
