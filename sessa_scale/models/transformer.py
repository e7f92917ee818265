"""The Transformer baseline block: pre-norm GPT-style decoder block that differs from Sessa only in
the sequence mixer (same LayerNorm, embedding, init and tying, chosen in sessa_scale.models.lm).

    h = x + out_proj(CausalAttention(RoPE(q_proj(LN1(x))), RoPE(k_proj(.)), v_proj(.)))
    y = h + MLP(LN2(h)),  MLP = fc2(gelu(fc1(.)))  or  w_down(silu(w_gate(.)) * w_up(.))  (SwiGLU)

Attention is Sessa's forward branch without the feedback: H query heads of width d = D/H,
H_kv key/value heads (GQA), interleaved-pair RoPE, SDPA or flash-attn. Every Linear has a bias
(as Sessa's projections); the MLP hidden width is mlp_hidden. Decoding keeps RoPE-rotated keys
and values (B, L, H_kv, d), with the same cache API as SessaLayer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sessa_scale.config.schema import ModelConfig
from sessa_scale.distributed.tp_styles import Column, Heads, Norm, Row, Style, indivisible
from sessa_scale.models.attention import (
    apply_rope, causal_attention, decode_attention, kv_heads, project, rope_inv_freq,
)
from sessa_scale.models.flops import attention_projection_flops, causal_attention_flops
from sessa_scale.models.spec import ArchSpec, Problem

Cache = dict  # {"t": int, "k", "v": (B, L, H_kv, d)}

MLP_KINDS = ("gelu", "swiglu")


def default_mlp_hidden(D: int, kind: str) -> int:
    """4 D for the GELU MLP; for SwiGLU (three matrices) the multiple of 64 nearest 8 D / 3, so
    both have about 8 D^2 weights."""
    return 4 * D if kind == "gelu" else max(64, 64 * round(8 * D / 3 / 64))


class CausalSelfAttention(nn.Module):
    """x (B, T, D) -> (B, T, D): causal multi-head attention with RoPE and GQA."""

    def __init__(self, D: int, n_heads: int, n_kv_heads: int | None = None, rope: bool = True, backend: str = "sdpa"):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if D % n_heads != 0 or n_heads % n_kv_heads != 0:
            raise ValueError(f"need D % n_heads == 0 and n_heads % n_kv_heads == 0; got {D}, {n_heads}, {n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, D // n_heads
        self.rope, self.backend = rope, backend
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, n_kv_heads * self.head_dim)
        self.v_proj = nn.Linear(D, n_kv_heads * self.head_dim)
        self.out_proj = nn.Linear(D, D)
        if rope:
            self.register_buffer("rope_inv_freq", rope_inv_freq(self.head_dim), persistent=False)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """x (B, T, D), positions (T,) -> q (B, T, H, d), k and v (B, T, H_kv, d), RoPE applied."""
        B, T, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k, v = k.view(B, T, self.n_kv_heads, self.head_dim), v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.rope:
            q = apply_rope(q, positions, self.rope_inv_freq)
            k = apply_rope(k, positions, self.rope_inv_freq)
        return q, k, v

    def _forward(self, x: torch.Tensor):
        """x (B, T, D) -> (out (B, T, D), k, v (B, T, H_kv, d))."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, torch.arange(T, device=x.device))
        # -1: under tensor parallelism this rank holds a subset of the heads (transformer_plan below)
        return self.out_proj(causal_attention(q, k, v, self.backend).reshape(B, T, -1)), k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)[0]

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> Cache:
        """An empty key/value cache for up to max_len positions."""
        if max_len is None:
            raise ValueError("init_cache needs max_len")
        ref = self.q_proj.weight
        kw = dict(device=ref.device if device is None else device, dtype=ref.dtype if dtype is None else dtype)
        shape = (batch_size, max_len, self.n_kv_heads, self.head_dim)
        return {"t": 0, "k": torch.zeros(shape, **kw), "v": torch.zeros(shape, **kw)}

    def prefill(self, x: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """Parallel forward on a prompt x (B, T, D) filling an empty cache -> (out, cache)."""
        T, capacity = x.shape[1], cache["k"].shape[1]
        if cache["t"] != 0:
            raise ValueError(f"prefill needs an empty cache, this one holds {cache['t']} positions")
        if T > capacity:
            raise ValueError(f"prompt of {T} tokens does not fit a cache of max_len {capacity}")
        out, k, v = self._forward(x)
        cache["k"][:, :T], cache["v"][:, :T] = k, v
        cache["t"] = T
        return out, cache

    def decode_step(self, x: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """One token x (B, 1, D) at position cache["t"] -> (out (B, 1, D), cache)."""
        t, capacity = cache["t"], cache["k"].shape[1]
        if t >= capacity:
            raise ValueError(f"the cache is full ({capacity} positions); init_cache with a larger max_len")
        q, k, v = self._qkv(x, torch.tensor([t], device=x.device))
        cache["k"][:, t : t + 1], cache["v"][:, t : t + 1] = k, v
        out = decode_attention(q, cache["k"][:, : t + 1], cache["v"][:, : t + 1])
        cache["t"] = t + 1
        return self.out_proj(out.reshape(x.shape)), cache


class MLP(nn.Module):
    """(..., D) -> (..., D): fc2(gelu(fc1(x))) (exact GELU), or SwiGLU w_down(silu(w_gate(x)) * w_up(x))."""

    def __init__(self, D: int, hidden: int, kind: str = "gelu"):
        super().__init__()
        if kind not in MLP_KINDS:
            raise ValueError(f"unknown MLP kind {kind!r}; choose from {list(MLP_KINDS)}")
        self.kind = kind
        if kind == "gelu":
            self.fc1, self.fc2 = nn.Linear(D, hidden), nn.Linear(hidden, D)
        else:
            self.w_gate, self.w_up, self.w_down = nn.Linear(D, hidden), nn.Linear(D, hidden), nn.Linear(hidden, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gelu":
            return self.fc2(F.gelu(self.fc1(x)))
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))

    @property
    def output(self) -> nn.Linear:
        """The Linear that writes into the residual stream."""
        return self.fc2 if self.kind == "gelu" else self.w_down


class TransformerBlock(nn.Module):
    """Pre-norm decoder block: x (B, T, D) -> h + MLP(LN2(h)), h = x + Attention(LN1(x))."""

    def __init__(
        self,
        D: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        ln_eps: float = 1e-5,
        rope: bool = True,
        attention: str = "sdpa",
        mlp: str = "gelu",
        mlp_hidden: int | None = None,
    ):
        super().__init__()
        self.ln1 = nn.LayerNorm(D, eps=ln_eps)
        self.attn = CausalSelfAttention(D, n_heads, n_kv_heads, rope, attention)
        self.ln2 = nn.LayerNorm(D, eps=ln_eps)
        self.mlp = MLP(D, default_mlp_hidden(D, mlp) if mlp_hidden is None else mlp_hidden, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        h = x + self.attn(self.ln1(x))
        return h + self.mlp(self.ln2(h))

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> Cache:
        """See CausalSelfAttention.init_cache."""
        return self.attn.init_cache(batch_size, device=device, dtype=dtype, max_len=max_len)

    def prefill(self, x: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """Prompt x (B, T, D) on an empty cache -> (y (B, T, D), cache)."""
        out, cache = self.attn.prefill(self.ln1(x), cache)
        h = x + out
        return h + self.mlp(self.ln2(h)), cache

    def decode_step(self, x_t: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """One token x_t (B, D) or (B, 1, D) -> (y_t in the same shape, cache)."""
        x = x_t.unsqueeze(1) if x_t.dim() == 2 else x_t
        out, cache = self.attn.decode_step(self.ln1(x), cache)
        h = x + out
        return (h + self.mlp(self.ln2(h))).view_as(x_t), cache

    # The block protocol DecoderLM relies on (see sessa_scale.models.lm.Block).
    def residual_projections(self) -> list[nn.Linear]:
        """Linears writing into the residual stream (scaled init: std / sqrt(2 n_layers))."""
        return [self.attn.out_proj, self.mlp.output]

    def default_init_modules(self) -> list[nn.Module]:
        """Modules that keep PyTorch's default init under the scaled init (none)."""
        return []


# The architecture spec (sessa_scale/models/spec.py): model.arch = transformer.


def build_transformer_block(cfg: ModelConfig, layer_idx: int) -> TransformerBlock:
    """The layer_idx-th block of the Transformer baseline described by cfg."""
    return TransformerBlock(
        cfg.d_model,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        ln_eps=cfg.ln_eps,
        rope=cfg.rope,
        attention=cfg.attention,
        mlp=cfg.mlp,
        mlp_hidden=cfg.mlp_hidden,
    )


def mlp_hidden_width(cfg: ModelConfig) -> int:
    """The MLP hidden width F of cfg (model.mlp_hidden, null meaning the default for model.mlp)."""
    return default_mlp_hidden(cfg.d_model, cfg.mlp) if cfg.mlp_hidden is None else cfg.mlp_hidden


def transformer_layer_flops(cfg: ModelConfig, T: int) -> int:
    """Forward FLOPs of one Transformer block on one sequence of T tokens. Per token: q and out
    2 * 2D^2, k and v 2 * 2 D H_kv d, the MLP (gelu: 2 * 2 D F, swiglu: 3 * 2 D F); attention
    4 D (T + 1) / 2 (scores and values over j <= t, averaged over t)."""
    D = cfg.d_model
    mlp = (2 if cfg.mlp == "gelu" else 3) * 2 * D * mlp_hidden_width(cfg)
    per_token = attention_projection_flops(cfg) + 2 * D * D + mlp
    return T * per_token + causal_attention_flops(D, T)


def full_square_attention_extra(cfg: ModelConfig, T: int) -> float:
    """Training FLOPs per token that the Megatron/PaLM convention adds for a Transformer by counting
    the whole T x T attention square instead of its causal triangle: the upper triangle's scores and
    value products, 2 D (T - 1) forward per layer, x 3 for training."""
    return 6 * cfg.n_layers * cfg.d_model * (T - 1)


def transformer_plan(cfg: ModelConfig) -> dict[str, Style]:
    """Megatron's layout: attention heads local (q/k/v column-, out_proj row-parallel), the MLP's
    hidden units split (fc1 or gate/up column-, fc2 or down row-parallel)."""
    mlp = {"mlp.fc1": Column(), "mlp.fc2": Row()} if cfg.mlp == "gelu" else {
        "mlp.w_gate": Column(), "mlp.w_up": Column(), "mlp.w_down": Row()}  # fmt: skip
    return {
        "ln1": Norm(),
        "attn": Heads(("n_heads", "n_kv_heads"), gather_input=False),
        "attn.q_proj": Column(),
        "attn.k_proj": Column(),
        "attn.v_proj": Column(),
        "attn.out_proj": Row(),
        "ln2": Norm(),
        **mlp,
    }


def transformer_tp_problems(cfg: ModelConfig, tp: int) -> list[Problem]:
    """Attention heads and MLP hidden units split over tp."""
    return indivisible({"n_heads": cfg.n_heads, "n_kv_heads": kv_heads(cfg), "mlp_hidden": mlp_hidden_width(cfg)}, tp)


TRANSFORMER = ArchSpec(
    name="transformer",
    build_block=build_transformer_block,
    layer_flops=transformer_layer_flops,
    tp_plan=transformer_plan,
    tp_problems=transformer_tp_problems,
)
