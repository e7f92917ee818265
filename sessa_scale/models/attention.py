"""Causal softmax attention shared by the architectures: rotary position embedding (RoPE),
parallel causal self-attention with grouped-query heads (GQA), and one decoding step over a
key/value cache.

Layout everywhere: (B, T, H, d) (batch, tokens, heads, head dim), as flash-attn uses.
GQA: query head h reads key/value head h // (H / H_kv) (consecutive query heads share one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sessa_scale.config.schema import ModelConfig
from sessa_scale.errors import UserError

ATTENTION_BACKENDS = ("sdpa", "flash")


def kv_heads(cfg: ModelConfig) -> int:
    """The key/value head count H_kv of cfg (model.n_kv_heads, null meaning n_heads)."""
    return cfg.n_heads if cfg.n_kv_heads is None else cfg.n_kv_heads


def project(x: torch.Tensor, linears: Sequence[nn.Linear], sizes: Sequence[int] | None = None) -> list[torch.Tensor]:
    """The outputs of several Linears reading the same x (..., D), as one matrix product over their
    concatenated weights where that is exact -> [linear(x) for linear in linears], or, given sizes,
    their concatenation (..., sum out_features) split into parts of those widths (one split of the joint
    product: its backward assembles the parts' gradients in one concatenation).

    One wide product (e.g. q, k, v: N = 3 D instead of three of N = D) runs faster in both directions,
    and the parameters stay separate (checkpoints, tensor-parallel plans and init see no change).
    The joint width is padded with zero rows to a multiple of ROW_ALIGN columns: an odd width such as
    Sessa's 5 D + 1 runs on slow pre-Hopper cuBLAS kernels (4.6x slower at D = 1024 on an H200), and
    rows only 16-byte aligned (5 D + 8) slowed the Triton feedback solve's TMA reads of q_b, k_b by
    15-20% (H200, D = 768) against 128-byte aligned ones.  The padding's columns go with the last
    output's split (then narrowed), so that the backward concatenates aligned widths (odd ones put
    the concatenation on a slower kernel).
    Falls back to one call per module (sizes: each output split where sizes only subdivide the outputs,
    else their concatenation split) when any is not a plain nn.Linear (a tensor-parallel layer,
    whose forward communicates) or holds a ZeRO-3 partitioned weight (gathered only by its own forward),
    and under torch.compile: there inductor fuses the RoPE backward into the gradient's concatenation
    as one slow kernel (H200, Transformer 350M, T = 2048: 0.78 ms instead of 0.10 ms per layer; the
    step 5% slower than with separate products), while eager steps are 5% faster fused.
    """
    widths = [m.weight.shape[0] for m in linears] if sizes is None else list(sizes)
    joined = joint_projection(x, linears, align=ROW_ALIGN)
    if joined is None:
        outputs = [m(x) for m in linears]
        if sizes is None:
            return outputs
        parts = _split_each(outputs, widths)
        return parts if parts is not None else list(torch.cat(outputs, dim=-1).split(widths, dim=-1))
    pad = joined.shape[-1] - sum(widths)
    outputs = list(joined.split(widths[:-1] + [widths[-1] + pad], dim=-1))
    if pad:
        outputs[-1] = outputs[-1][..., :widths[-1]]
    return outputs


def _split_each(outputs: Sequence[torch.Tensor], widths: Sequence[int]) -> list[torch.Tensor] | None:
    """The outputs split into parts of `widths` (views) where those only subdivide each output, else None
    (a part spans two outputs: they must be concatenated first)."""
    parts, i = [], 0
    for out in outputs:
        n, total = 0, 0
        while total < out.shape[-1] and i + n < len(widths):
            total, n = total + widths[i + n], n + 1
        if total != out.shape[-1]:
            return None
        parts += out.split(widths[i:i + n], dim=-1)
        i += n
    return parts if i == len(widths) else None


ROW_ALIGN = 64  # project(): joint widths padded to a multiple of this many columns (128-byte rows in bf16)


def joint_projection(x: torch.Tensor, linears: Sequence[nn.Linear], align: int = 1) -> torch.Tensor | None:
    """x (..., D) -> the concatenated outputs of linears (..., sum out_features), then zeros up to a
    multiple of `align` columns, as one matrix product over their concatenated weights (and zero rows),
    or None where project() runs them one by one (see there)."""
    if torch.compiler.is_compiling() or any(type(m) is not nn.Linear or hasattr(m.weight, "ds_id") for m in linears):
        return None
    weights = [m.weight for m in linears]
    pad = -sum(w.shape[0] for w in weights) % align
    if pad:
        weights.append(weights[0].new_zeros(pad, weights[0].shape[1]))
    weight = torch.cat(weights)
    if all(m.bias is None for m in linears):
        bias = None
    else:
        bias = torch.cat([m.weight.new_zeros(m.weight.shape[0]) if m.bias is None else m.bias for m in linears]
                         + ([weight.new_zeros(pad)] if pad else []))
    return F.linear(x, weight, bias)


def rope_inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotation frequencies base^(-2i/d) for i in [0, d/2): float32, shape (d/2,)."""
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (2i, 2i+1) of every head of x by angle pos * inv_freq[i].

    x: (B, T, H, d); positions: (T,) absolute positions; inv_freq: (d/2,) -> (B, T, H, d).
    Angles are formed in inv_freq's dtype (at least float32) and cast to x's dtype as the
    reference does, except that cos/sin are never taken in a half dtype (whose resolution would
    blur positions beyond a few hundred): there they are computed in float32, then cast.
    """
    angle_dtype = torch.promote_types(inv_freq.dtype, torch.float32)
    theta = positions.to(angle_dtype)[:, None] * inv_freq.to(angle_dtype)  # (T, d/2)
    theta = theta.to(torch.promote_types(angle_dtype, x.dtype))
    cos = theta.cos().to(x.dtype)[None, :, None, :]
    sin = theta.sin().to(x.dtype)[None, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError as exc:
        raise UserError(
            "model.attention=flash needs the flash-attn package, which is not installed; "
            "install it with `pip install -e .[flash]` (CUDA only) or set model.attention=sdpa"
        ) from exc
    return flash_attn_func


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """softmax_{j<=t}(q[t].k[j] / sqrt(d)) v[j] per head.

    q: (B, T, H, d); k, v: (B, T, H_kv, d) with H % H_kv == 0 -> (B, T, H, d).
    backend: "sdpa" (torch scaled_dot_product_attention) or "flash" (flash-attn, CUDA tensors).
    """
    if backend == "flash":
        flash_attn_func = _flash_attn_func()
        if not q.is_cuda:
            raise UserError(
                f"model.attention=flash runs on CUDA only, but the model is on {q.device.type}; "
                "set model.attention=sdpa"
            )
        return flash_attn_func(q, k, v, causal=True)
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; choose from {list(ATTENTION_BACKENDS)}")
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=q.shape[2] != k.shape[2]
    )
    return out.transpose(1, 2)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query step attending to every cached key (the cache already holds the new token).

    q: (B, 1, H, d); k, v: (B, L, H_kv, d), the first L cached positions -> (B, 1, H, d).
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=q.shape[2] != k.shape[2]
    )
    return out.transpose(1, 2)
