"""Yardsticks for the feedback-solve benchmark, in the solve's calling convention
callable(q, k, gamma, f, scale) with q, k (B, T, H, Dk), gamma (B, T, H), f (B, T, H, Dv).

* ``sdpa_flash_same_shape``: causal SDPA flash attention on the same shape (q, k, v = f),
  ignoring gamma: the cost of ordinary attention that the solve is compared against.
* ``fla_deltaformer_solve``: fla-core's DeltaFormer (u = v - beta * strict-softmax(qk) u), which
  is this solve with beta = -gamma, v = f (its own scale is 1/sqrt(D)); head dims <= ~256; CUDA
  with fla-core installed (``sessa_scale.ops.ssd.fla_available``).

``sessa_scale.bench.solve.IMPLS`` registers them next to the solve's own implementations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa_flash_same_shape(q, k, gamma, f, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), f.transpose(1, 2), is_causal=True, scale=scale)
    return out.transpose(1, 2)


def _deltaformer_function():
    """fla-core's ParallelDeltaformerFunction. Its module imports ``fla.layers.utils`` (pad/unpad,
    used only for attention masks), which lives in the separate flash-linear-attention package;
    when that is absent a stub module stands in (we never pass masks)."""
    import sys
    import types

    try:
        import fla.layers.utils  # noqa: F401
    except ImportError:
        import fla  # noqa: F401  (fla-core itself must be installed)

        stub = types.ModuleType("fla.layers.utils")

        def _unavailable(*args, **kwargs):
            raise NotImplementedError("fla.layers is not installed (fla-core only)")

        stub.pad_input = stub.unpad_input = _unavailable
        sys.modules.setdefault("fla.layers", types.ModuleType("fla.layers"))
        sys.modules["fla.layers.utils"] = stub
    from fla.ops.deltaformer.parallel import ParallelDeltaformerFunction

    return ParallelDeltaformerFunction


def fla_deltaformer_solve(q, k, gamma, f, scale):
    ParallelDeltaformerFunction = _deltaformer_function()

    if abs(scale * q.shape[-1] ** 0.5 - 1.0) > 1e-6:
        raise ValueError("fla DeltaFormer uses scale 1/sqrt(Dk) only")
    return ParallelDeltaformerFunction.apply(q, k, f, -gamma, 512, None)
