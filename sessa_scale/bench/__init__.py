"""Benchmarks of sessa_scale operators."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device | str | None = None) -> int:
    """Peak CUDA memory allocated during one call of `fn`, beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
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
