"""Analytic model FLOPs: what MFU divides by. Each architecture counts one block's forward FLOPs
(its ArchSpec.layer_flops, next to the block in its model module, with its formula); this module
holds the convention they follow, the terms they share and the model totals.

Counted: every matrix product of the forward pass at 2 FLOPs per multiply-add, exactly as the
causal computation needs it (attention over j <= t, Sessa's feedback over j < t, Mamba-2's SSD
intra-chunk blocks over their lower triangles); biases, norms, activations, softmax and RoPE are
not counted (elementwise, as in Megatron's and PaLM's conventions). A training step costs 3x the
forward (the backward of each product is two products of the same size; recomputation under
activation checkpointing is not model work and is not counted). Embedding lookups are free; the
LM head is a D x V product per token.
"""

from __future__ import annotations

from sessa_scale.config.schema import ModelConfig
from sessa_scale.models.attention import kv_heads
from sessa_scale.models.spec import ARCHITECTURES


def attention_projection_flops(cfg: ModelConfig) -> int:
    """Per token: q (D -> D), k and v (D -> H_kv d)."""
    D, H = cfg.d_model, cfg.n_heads
    return 2 * D * D + 2 * 2 * D * kv_heads(cfg) * (D // H)


def causal_attention_flops(D: int, T: int) -> int:
    """Per sequence: scores q.k and the weighted sum of v over j <= t, all heads (width D in total)."""
    return 2 * 2 * D * T * (T + 1) // 2


def forward_flops_per_token(cfg: ModelConfig, T: int) -> float:
    """Forward FLOPs per token of the whole model (layers + LM head) for sequences of T tokens."""
    layers = cfg.n_layers * ARCHITECTURES[cfg.arch].layer_flops(cfg, T) / T
    return layers + 2 * cfg.d_model * cfg.vocab_size


def training_flops_per_token(cfg: ModelConfig, T: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward)."""
    return 3 * forward_flops_per_token(cfg, T)
