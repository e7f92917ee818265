"""Work buffers of the Triton ops (the feedback solve, the SSD scan, the fused Mamba-2 conv and norm)
and the test hook that poisons them: inside poisoned_buffers() every buffer a kernel must fill
starts as NaN, so tiles no kernel wrote show in the results."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # kernels run on the CPU interpreter
_poisoned = False  # True only inside poisoned_buffers()


@contextmanager
def poisoned_buffers():
    """Test hook: inside it, new_buffer() returns NaN-filled tensors (and the solve's GEMM scratch
    is NaN-filled), so entries no kernel wrote show."""
    global _poisoned
    previous, _poisoned = _poisoned, True
    try:
        yield
    finally:
        _poisoned = previous


def buffers_poisoned() -> bool:
    """Whether poisoned_buffers() is active."""
    return _poisoned


def new_buffer(shape, dtype, device) -> torch.Tensor:
    """An uninitialized tensor for a kernel to fill (NaN-filled inside poisoned_buffers())."""
    if _poisoned:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
