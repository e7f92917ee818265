"""Yardsticks for the feedback-solve benchmark, in the solve's calling convention
callable(q, k, gamma, f, scale) with q, k (B, T, H, Dk), gamma (B, T, H), f (B, T, H, Dv).

* ``sdpa_flash_same_shape``: causal SDPA flash attention on the same shape (q, k, v = f),
  ignoring gamma: the cost of ordinary attention that the solve is compared against.
* ``fla_deltaformer_solve``: fla-core's DeltaFormer (u = v - beta * strict-softmax(qk) u), which
  is this solve with beta = -gamma, v = f (its own scale is 1/sqrt(D)); head dims <= ~256.
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


def fla_available() -> bool:
    try:
        from fla.ops.deltaformer.parallel import ParallelDeltaformerFunction  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def fla_deltaformer_solve(q, k, gamma, f, scale):
    from fla.ops.deltaformer.parallel import ParallelDeltaformerFunction

    if abs(scale * q.shape[-1] ** 0.5 - 1.0) > 1e-6:
        raise ValueError("fla DeltaFormer uses scale 1/sqrt(Dk) only")
    return ParallelDeltaformerFunction.apply(q, k, f, -gamma, 512, None)
