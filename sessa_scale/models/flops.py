"""Analytic model FLOPs per architecture: what MFU divides by.

Counted: every matrix product of the forward pass at 2 FLOPs per multiply-add, exactly as the
causal computation needs it (attention over j <= t, Sessa's feedback over j < t, Mamba-2's SSD
intra-chunk blocks over their lower triangles); biases, norms, activations, softmax and RoPE are
not counted (elementwise, as in Megatron's and PaLM's conventions). A training step costs 3x the
forward (the backward of each product is two products of the same size; recomputation under
activation checkpointing is not model work and is not counted). Embedding lookups are free; the
LM head is a D x V product per token.

Per token of a sequence of T tokens, width D, H heads of width d = D/H, H_kv key/value heads:
  Sessa layer:  W_in 4D^2 + q 2D^2 + k, v 2 * 2 D H_kv d + proj_fb 4D^2 + gamma_ctx 2 D H_b
                + out_proj 2D^2 (H > 1) + W_out 2D^2
                + forward attention 4 D (T + 1) / 2 (scores and values over j <= t, averaged over t)
                + feedback 4 D (T - 1) / 2 (q_b.k_b logits and the solve's alpha @ s over j < t)
  Transformer:  q, out 2 * 2D^2 + k, v 2 * 2 D H_kv d + attention 4 D (T + 1) / 2 + MLP
                (gelu: 2 * 2 D F, swiglu: 3 * 2 D F, F = mlp hidden width)
  Mamba-2:      in_proj 2 D (2E + 2GN + H) + depthwise conv 2 K (E + 2GN) + out_proj 2 E D
                + chunked SSD (chunks of Q): per chunk of q tokens, C B^T over the causal block
                2 N G q(q+1)/2, its product with x 2 P H q(q+1)/2, the chunk's state B^T x 2 q N P H,
                and for every chunk after the first, the carried state's decay-and-add 2 N P H
                and its read-out C h 2 q N P H.
"""

from __future__ import annotations

from sessa_scale.config.schema import ModelConfig


def _attention_projections(cfg: ModelConfig) -> int:
    """q (D -> D), k and v (D -> H_kv d) per token."""
    D, H = cfg.d_model, cfg.n_heads
    kv = (H if cfg.n_kv_heads is None else cfg.n_kv_heads) * (D // H)
    return 2 * D * D + 2 * 2 * D * kv


def _causal_attention(D: int, T: int) -> int:
    """Per sequence: scores q.k and the weighted sum of v over j <= t, all heads (width D in total)."""
    return 2 * 2 * D * T * (T + 1) // 2


def sessa_layer_flops(cfg: ModelConfig, T: int) -> int:
    """Forward FLOPs of one Sessa layer on one sequence of T tokens."""
    D = cfg.d_model
    per_token = 4 * D * D + _attention_projections(cfg) + 4 * D * D + 2 * D * cfg.n_fb_heads + 2 * D * D
    if cfg.n_heads > 1:
        per_token += 2 * D * D  # out_proj (the identity for one head)
    feedback = 2 * 2 * D * T * (T - 1) // 2  # logits q_b.k_b and alpha @ s over j < t
    return T * per_token + _causal_attention(D, T) + feedback


def transformer_layer_flops(cfg: ModelConfig, T: int) -> int:
    """Forward FLOPs of one Transformer block on one sequence of T tokens."""
    from sessa_scale.models.transformer import default_mlp_hidden

    D = cfg.d_model
    F = default_mlp_hidden(D, cfg.mlp) if cfg.mlp_hidden is None else cfg.mlp_hidden
    mlp = (2 if cfg.mlp == "gelu" else 3) * 2 * D * F
    per_token = _attention_projections(cfg) + 2 * D * D + mlp
    return T * per_token + _causal_attention(D, T)


def mamba2_layer_flops(cfg: ModelConfig, T: int) -> int:
    """Forward FLOPs of one Mamba-2 block on one sequence of T tokens (chunked SSD)."""
    D, N, P, G, K, Q = cfg.d_model, cfg.ssm_state, cfg.ssm_head_dim, cfg.ssm_groups, cfg.ssm_conv, cfg.ssm_chunk
    E = cfg.ssm_expand * D
    H = E // P
    per_token = 2 * D * (2 * E + 2 * G * N + H) + 2 * K * (E + 2 * G * N) + 2 * E * D
    ssd = 0
    for i, start in enumerate(range(0, T, Q)):
        q = min(Q, T - start)
        ssd += (N * G + P * H) * q * (q + 1) + 2 * q * N * P * H
        if i > 0:
            ssd += 2 * N * P * H + 2 * q * N * P * H
    return T * per_token + ssd


LAYER_FLOPS = {"sessa": sessa_layer_flops, "transformer": transformer_layer_flops, "mamba2": mamba2_layer_flops}


def forward_flops_per_token(cfg: ModelConfig, T: int) -> float:
    """Forward FLOPs per token of the whole model (layers + LM head) for sequences of T tokens."""
    layers = cfg.n_layers * LAYER_FLOPS[cfg.arch](cfg, T) / T
    return layers + 2 * cfg.d_model * cfg.vocab_size


def training_flops_per_token(cfg: ModelConfig, T: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward)."""
    return 3 * forward_flops_per_token(cfg, T)


def full_square_attention_extra(cfg: ModelConfig, T: int) -> float:
    """Training FLOPs per token that the Megatron/PaLM convention adds for a Transformer by counting
    the whole T x T attention square instead of its causal triangle: the upper triangle's scores and
    value products, 2 D (T - 1) forward per layer, x 3 for training. 0 for other architectures."""
    return 6 * cfg.n_layers * cfg.d_model * (T - 1) if cfg.arch == "transformer" else 0.0
