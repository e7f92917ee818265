"""Helpers for kernel launches (grids, tile sizes): integer math in plain Python (triton's cdiv and
next_power_of_2 are constexpr functions that cost microseconds per host call, and the Mamba-2 and
SSD wrappers take dozens of them per layer and step) and the device's SM count, cached."""

from __future__ import annotations

import functools

import torch


def cdiv(n: int, d: int) -> int:
    """ceil(n / d) for integers n >= 0, d > 0 (triton.cdiv)."""
    return -(-n // d)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device device_index (cached)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
