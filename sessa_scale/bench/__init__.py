"""Benchmarks of sessa_scale operators."""

from __future__ import annotations

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
