"""GPU kernel launches of one Triton feedback solve call (forward + backward), counted on the CPU.

    python -m sessa_scale.bench.solve_launches --layouts 1x768,6x128 --seq-lens 2048,32768

The call runs on the ``meta`` device (no data, no GPU): torch ops go through a dispatch mode that
counts every op that launches a kernel on CUDA (not views, not allocations; ``torch.zeros`` counts as
its one fill), and the Triton kernels are replaced by counters of their launches.  B = batch_tokens
// T and bf16 inputs, as ``solve_quick``; the configuration is ``SolveConfig()`` resolved for the
shape as the op does (``_fit``), so the count is the eager path's (a CUDA-graph replay issues the same
kernels from one launch).  cuBLAS may split one product into two kernels (split-K), which this count
does not see: it counts the calls that reach the GPU's queue from Python.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sessa_scale.kernels import feedback as K
from sessa_scale.kernels import feedback_gemm as G
from sessa_scale.ops import feedback_fused, feedback_gemm
from sessa_scale.ops.feedback_triton import SolveConfig, _fit, backward_outputs, forward_outputs, kept_buffers

_DEVICE = torch.device("meta")
_NO_KERNEL_OPS = ("_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh")


class _CountLaunches(TorchDispatchMode):
    """Counts the torch ops that launch a GPU kernel, by name, into ``counts``."""

    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL_OPS:
            self.counts[f"torch.{func.overloadpacket.__name__}"] += 1
        if func._overloadname == "dtype_out":  # bmm / baddbmm with out_dtype: no meta kernel
            return kwargs["out"]
        return func(*args, **kwargs)


class _KernelCounter:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` counts one launch."""

    def __init__(self, name: str, counts: Counter):
        self.name, self.counts = name, counts

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[f"triton.{self.name}"] += 1
        return launch


@contextmanager
def _counted_kernels(counts: Counter):
    """Every Triton kernel of the solve replaced by a launch counter while inside."""
    saved = []
    for module in (K, G):
        for name in dir(module):
            if name.endswith("_kernel"):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, _KernelCounter(name, counts))
    try:
        yield
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def count_launches(B: int, T: int, H: int, Dk: int, Dv: int, cfg: SolveConfig | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> tuple[Counter, Counter]:
    """(forward, backward) launch counts by kernel / torch op of one call of shape (B, T, H, Dk|Dv)."""
    cfg = _fit(cfg or SolveConfig(), T, Dk, Dv, torch.finfo(dtype).bits // 8)
    path = feedback_gemm if cfg.gemm else feedback_fused
    q, k = (torch.empty((B, T, H, Dk), dtype=dtype, device=_DEVICE) for _ in range(2))
    f, ds = (torch.empty((B, T, H, Dv), dtype=dtype, device=_DEVICE) for _ in range(2))
    gamma = torch.empty((B, T, H), dtype=dtype, device=_DEVICE)
    scale = 1.0 / math.sqrt(Dk)
    feedback_gemm._ACCUMULATES_OUT_DTYPE[_DEVICE] = True  # as CUDA with torch >= 2.8
    fwd, bwd = Counter(), Counter()
    with _counted_kernels(fwd), _CountLaunches(fwd):
        outs = forward_outputs(path, q, k, gamma, f)
        kept = kept_buffers(path, q, outs[1], cfg)
        path.forward(q, k, gamma, f, outs, scale, cfg, **kept)
    with _counted_kernels(bwd), _CountLaunches(bwd):
        S, lse = outs[:2]
        path.backward(ds, q, k, gamma, f, S, lse, backward_outputs(path, q, k, f, S, (dtype,) * 4), scale, cfg, **kept)
    return fwd, bwd


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="1x768,6x128", help="HxD head layouts, comma-separated")
    parser.add_argument("--seq-lens", default="2048,8192,16384,32768")
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--detail", action="store_true", help="launches per kernel / op as well")
    args = parser.parse_args(argv)
    print("| layout | T | B | forward | backward | per call |\n|---|---|---|---|---|---|")
    for layout in args.layouts.split(","):
        H, D = (int(x) for x in layout.split("x"))
        for T in (int(t) for t in args.seq_lens.split(",")):
            B = max(1, args.batch_tokens // T)
            fwd, bwd = count_launches(B, T, H, D, D)
            nf, nb = sum(fwd.values()), sum(bwd.values())
            print(f"| {layout} | {T} | {B} | {nf} | {nb} | {nf + nb} |")
            if args.detail:
                for name, n in (fwd + bwd).most_common():
                    print(f"|  | | | | {name} | {n} |")


if __name__ == "__main__":
    main()
