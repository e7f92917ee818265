"""Integer helpers for kernel launches (grids, tile sizes) in plain Python: triton's cdiv and
next_power_of_2 are constexpr functions that cost microseconds per host call, and the Mamba-2 and
SSD wrappers take dozens of them per layer and step."""

from __future__ import annotations


def cdiv(n: int, d: int) -> int:
    """ceil(n / d) for integers n >= 0, d > 0 (triton.cdiv)."""
    return -(-n // d)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length()
