"""`feedback_solve`: the public entry point of the Sessa feedback solve, dispatching to an
implementation by name."""

from __future__ import annotations

import math
from typing import Callable

import torch

from sessa_scale.ops.feedback_chunked import feedback_solve_chunked
from sessa_scale.ops.feedback_reference import feedback_solve_dense

# name -> callable(q, k, gamma, f, scale) -> s. Implementations register themselves here.
FEEDBACK_SOLVE_IMPLS: dict[str, Callable[..., torch.Tensor]] = {"dense": feedback_solve_dense}
FEEDBACK_SOLVE_IMPLS["chunked"] = feedback_solve_chunked


def _check_shapes(q: torch.Tensor, k: torch.Tensor, gamma: torch.Tensor, f: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (B, T, H, Dk); got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, _ = q.shape
    if gamma.shape != (B, T, H):
        raise ValueError(f"gamma must be (B, T, H) = {(B, T, H)}; got {tuple(gamma.shape)}")
    if f.dim() != 4 or f.shape[:3] != (B, T, H):
        raise ValueError(f"f must be (B, T, H, Dv) with (B, T, H) = {(B, T, H)}; got {tuple(f.shape)}")


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map "auto" to the fastest implementation available on ``device``."""
    if impl != "auto":
        if impl not in FEEDBACK_SOLVE_IMPLS:
            raise ValueError(f"unknown feedback_solve impl {impl!r}; choose from {['auto', *FEEDBACK_SOLVE_IMPLS]}")
        return impl
    if device.type == "cuda" and "triton" in FEEDBACK_SOLVE_IMPLS:
        return "triton"
    return "chunked" if "chunked" in FEEDBACK_SOLVE_IMPLS else "dense"


def feedback_solve(
    q: torch.Tensor,
    k: torch.Tensor,
    gamma: torch.Tensor,
    f: torch.Tensor,
    *,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Solve s[t] = f[t] + gamma[t] * sum_{j<t} softmax_{j<t}(scale * q[t].k[j]) s[j].

    q, k: (B, T, H, Dk); gamma: (B, T, H); f: (B, T, H, Dv) -> s: (B, T, H, Dv) in f's dtype.
    ``scale`` defaults to 1/sqrt(Dk). ``impl``: "auto" (Triton on CUDA when available, else
    "chunked"), or any key of FEEDBACK_SOLVE_IMPLS ("dense", "chunked", ...).
    """
    _check_shapes(q, k, gamma, f)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return FEEDBACK_SOLVE_IMPLS[resolve_impl(impl, q.device)](q, k, gamma, f, float(scale))


# Triton kernels (kernels/feedback.py): registered when triton imports and CUDA is available,
# or on CPU under TRITON_INTERPRET=1 (the interpreter tests).
try:
    import os as _os

    import triton as _triton  # noqa: F401

    if _os.environ.get("TRITON_INTERPRET", "0") == "1" or torch.cuda.is_available():
        from sessa_scale.ops.feedback_triton import feedback_solve_triton

        FEEDBACK_SOLVE_IMPLS["triton"] = feedback_solve_triton
except ImportError:  # no triton on this platform
    pass
