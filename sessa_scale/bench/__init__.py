"""Benchmarks of sessa_scale operators."""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from sessa_scale.ops.graph_cache import clear_graphs


WARM_CALLS = 3  # measured calls of cuda_peak_bytes(warm=True): the feedback solve captures its graphs among them


def clear_op_caches() -> None:
    """Drop what the feedback solve keeps between calls (its CUDA graphs and their static buffers)."""
    clear_graphs()


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device | str | None = None, warm: bool = False) -> int:
    """Peak CUDA memory allocated during one call of `fn`, beyond what was allocated before it.
    warm: the op caches are cleared, `fn` runs once unmeasured, and the peak of the next WARM_CALLS
    calls is taken against the memory before the first, so what the op keeps between calls (CUDA
    graphs' static buffers) and what a graph capture among those calls allocates (its memory pool,
    held from then on) count as the op's memory, while first-call compilation does not."""
    if warm:
        clear_op_caches()
    gc.collect()  # objects of earlier work freed now, not during the measured call
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    if warm:
        fn()
        torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(WARM_CALLS if warm else 1):
        fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def emit_report(report: str, out: Path | str | None) -> None:
    """Print a benchmark's Markdown report and, when `out` is given, also write it there (parents created)."""
    print(report)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report if report.endswith("\n") else report + "\n")


def interleaved_ms(steps: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], object],
                   warmup: int = 0, calls: int = 1) -> dict[str, float]:
    """{name: median ms per call} over `repeats` timed runs of `calls` calls of each step, the steps taking
    turns within each round after `warmup` untimed rounds; sync() waits for the device before and after
    each run only (one step: `repeats` synchronized runs in a row).  calls = 1: each call synchronized;
    calls > 1: back to back, the host issuing a call while the device still runs the ones before (as the
    layers of a model follow each other), so a call costs what the device spends on it."""
    times = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                step()
            sync()
            if round_ >= warmup:
                times[name].append((time.perf_counter() - t0) / calls)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}

