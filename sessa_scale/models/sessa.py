"""The Sessa layer (arXiv 2604.18580): causal attention whose output f feeds a recurrent,
attention-routed feedback path s[t] = f[t] + gamma[t] * sum_{j<t} alpha[t, j] s[j].

Exactly the layer of docs/sessa_math.md, with the public reference implementation's
constructor arguments and parameter names, so its state dicts load with strict=True.
Shapes: B batch, T tokens, D width, H attention heads of width d = D/H, H_kv key/value heads,
H_b feedback heads of width D/H_b.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sessa_scale.config.schema import ModelConfig
from sessa_scale.distributed.tp_styles import Column, Heads, Norm, Replicated, Row, RowToHidden, Shard, Style, indivisible
from sessa_scale.models.attention import (
    apply_rope, causal_attention, decode_attention, kv_heads, project, rope_inv_freq,
)
from sessa_scale.models.flops import attention_projection_flops, causal_attention_flops
from sessa_scale.models.spec import ArchSpec, Problem
from sessa_scale.ops.feedback_solve import FEEDBACK_SOLVE_IMPLS, feedback_solve

# Derived constants the reference stores in its state dict when built with max_len; we drop them.
_REFERENCE_MASK_BUFFERS = ("causal_mask_f_full", "causal_mask_fb_full")

Cache = dict  # {"t": int, "k_f", "v_f": (B, L, H_kv, d), "k_b", "s": (B, L, D)}


class SessaMixer(nn.Module):
    """a_bar (B, T, D) -> s (B, T, D): forward attention f, then the feedback solve for s."""

    def __init__(
        self,
        D: int,
        n_heads: int = 1,
        n_kv_heads: int | None = None,
        max_len: int | None = None,
        use_flash: bool = False,
        use_forward_rope: bool = True,
        gamma_max: float = 0.999,
        n_fb_heads: int = 1,
        solver: str = "auto",
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads < 1 or D % n_heads != 0:
            raise ValueError(f"D ({D}) must be divisible by n_heads ({n_heads}), and n_heads >= 1")
        if not (1 <= n_kv_heads <= n_heads and n_heads % n_kv_heads == 0):
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must be in [1, n_heads={n_heads}] and divide n_heads")
        if use_forward_rope and (D // n_heads) % 2 != 0:
            raise ValueError(f"RoPE needs an even head dim, got D / n_heads = {D // n_heads}")
        if not 0.0 < gamma_max < 1.0:
            raise ValueError(f"gamma_max ({gamma_max}) must lie strictly between 0 and 1")
        if n_fb_heads < 1 or D % n_fb_heads != 0:
            raise ValueError(f"D ({D}) must be divisible by n_fb_heads ({n_fb_heads}), and n_fb_heads >= 1")
        if solver != "auto" and solver not in FEEDBACK_SOLVE_IMPLS:
            raise ValueError(f"unknown solver {solver!r}; choose from {['auto', *FEEDBACK_SOLVE_IMPLS]}")
        self.D, self.n_heads, self.n_kv_heads, self.head_dim = D, n_heads, n_kv_heads, D // n_heads
        self.n_fb_heads, self.fb_head_dim = n_fb_heads, D // n_fb_heads
        self.fb_scale = 1.0 / math.sqrt(self.fb_head_dim)
        self.max_len, self.use_forward_rope, self.gamma_max = max_len, use_forward_rope, gamma_max
        self.attention = "flash" if use_flash else "sdpa"
        self.solver = solver

        kv_dim = n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, kv_dim)
        self.v_proj = nn.Linear(D, kv_dim)
        self.proj_fb = nn.Linear(D, 2 * D)
        self.out_proj = nn.Identity() if n_heads == 1 else nn.Linear(D, D, bias=False)
        # Shape (H_b,) even for one head: DeepSpeed cannot broadcast 0-dim parameters. The
        # reference's 0-dim gamma_bias is reshaped on load (_adapt_reference_state).
        self.gamma_bias = nn.Parameter(torch.ones(n_fb_heads))
        self.gamma_ctx = nn.Linear(D, n_fb_heads, bias=False)
        if use_forward_rope:
            self.register_buffer("rope_inv_freq", rope_inv_freq(self.head_dim), persistent=True)
        self.register_load_state_dict_pre_hook(_adapt_reference_state)

    def _project(self, a_bar: torch.Tensor, positions: torch.Tensor):
        """a_bar (B, T, D), positions (T,) -> q (B, T, H, d) and k, v (B, T, H_kv, d) (RoPE applied),
        q_b, k_b (B, T, H_b, D/H_b), the gate's logits gamma_ctx(a_bar) (B, T, H_b) (see _gamma)."""
        B, T, _ = a_bar.shape
        # One product for all five (project() pads the odd width 5 D + H_b to aligned rows): gamma_ctx
        # as its own product of H_b columns cost more than the padding, in both directions.  proj_fb's
        # output is split there into q_b, its FIRST half, and k_b (feedback head h owns columns
        # [h*D/H_b, (h+1)*D/H_b) of each), so that the backward assembles their gradients in the joint
        # product's one concatenation (split apart here, they were stacked first: one more copy).
        linears = (self.q_proj, self.k_proj, self.v_proj, self.proj_fb, self.gamma_ctx)
        widths = [m.weight.shape[0] for m in linears]  # this rank's widths under tensor parallelism
        sizes = widths[:3] + [widths[3] // 2] * 2 + widths[4:]
        q, k, v, q_b, k_b, gamma_logits = project(a_bar, linears, sizes=sizes)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k, v = k.view(B, T, self.n_kv_heads, self.head_dim), v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.use_forward_rope:
            q = apply_rope(q, positions, self.rope_inv_freq)
            k = apply_rope(k, positions, self.rope_inv_freq)
        fb_heads = (B, T, -1, self.fb_head_dim)  # this rank's feedback heads
        return q, k, v, q_b.view(fb_heads), k_b.view(fb_heads), gamma_logits

    def _gamma(self, gamma_logits: torch.Tensor) -> torch.Tensor:
        """gamma_ctx(a_bar) (B, T, H_b) -> the feedback gate gamma (B, T, H_b) in (-gamma_max, gamma_max)."""
        return self.gamma_max * torch.tanh(self.gamma_bias + gamma_logits)

    def _forward(self, a_bar: torch.Tensor):
        """a_bar (B, T, D) -> s (B, T, D) and what a cache keeps: k, v (B, T, H_kv, d), k_b (B, T, D)."""
        B, T, _ = a_bar.shape
        q, k, v, q_b, k_b, gamma_logits = self._project(a_bar, torch.arange(T, device=a_bar.device))
        attention = causal_attention(q, k, v, self.attention)
        # Issued after the attention: the host forms the gate while the GPU runs the attention (before it,
        # the GPU waits on the host's launches of the layer's short kernels).
        gamma = self._gamma(gamma_logits)
        # Widths are inferred (-1): under tensor parallelism this rank holds a subset of the heads
        # and of f's columns (sessa_plan below).
        f = self.out_proj(attention.reshape(B, T, -1))
        f = f.view(B, T, self.n_fb_heads, -1)
        s = feedback_solve(q_b, k_b, gamma, f, scale=self.fb_scale, impl=self.solver)
        return s.reshape(B, T, -1), k, v, k_b.reshape(B, T, -1)

    def forward(self, a_bar: torch.Tensor) -> torch.Tensor:
        """a_bar (B, T, D) -> s (B, T, D)."""
        return self._forward(a_bar)[0]

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> Cache:
        """An empty decoding cache for up to max_len (default: the constructor's) positions."""
        max_len = self.max_len if max_len is None else max_len
        if max_len is None:
            raise ValueError("init_cache needs max_len: pass it here or construct the layer with max_len")
        ref = self.q_proj.weight
        kw = dict(device=ref.device if device is None else device, dtype=ref.dtype if dtype is None else dtype)
        kv_shape = (batch_size, max_len, self.n_kv_heads, self.head_dim)
        return {
            "t": 0,
            "k_f": torch.zeros(kv_shape, **kw),
            "v_f": torch.zeros(kv_shape, **kw),
            "k_b": torch.zeros(batch_size, max_len, self.D, **kw),
            "s": torch.zeros(batch_size, max_len, self.D, **kw),
        }

    def prefill(self, a_bar: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """Run the parallel forward on a prompt a_bar (B, T, D) and fill an empty cache -> (s, cache)."""
        T, capacity = a_bar.shape[1], cache["s"].shape[1]
        if cache["t"] != 0:
            raise ValueError(f"prefill needs an empty cache, this one holds {cache['t']} positions")
        if T > capacity:
            raise ValueError(f"prompt of {T} tokens does not fit a cache of max_len {capacity}")
        s, k, v, k_b = self._forward(a_bar)
        for name, value in (("k_f", k), ("v_f", v), ("k_b", k_b), ("s", s)):
            cache[name][:, :T] = value
        cache["t"] = T
        return s, cache

    def decode_step(self, a_bar_t: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """One token a_bar_t (B, D) or (B, 1, D) at position cache["t"] -> (s_t in the same shape, cache)."""
        x = a_bar_t.unsqueeze(1) if a_bar_t.dim() == 2 else a_bar_t
        B, _, D = x.shape
        t, capacity = cache["t"], cache["s"].shape[1]
        if t >= capacity:
            raise ValueError(f"the cache is full ({capacity} positions); init_cache with a larger max_len")
        q, k, v, q_b, k_b, gamma_logits = self._project(x, torch.tensor([t], device=x.device))
        gamma = self._gamma(gamma_logits)
        cache["k_f"][:, t : t + 1] = k
        cache["v_f"][:, t : t + 1] = v
        f = self.out_proj(decode_attention(q, cache["k_f"][:, : t + 1], cache["v_f"][:, : t + 1]).reshape(B, 1, D))
        s = f
        if t > 0:  # s_t = f_t + gamma_t * sum_{j<t} softmax_j(q_b[t].k_b[j] * scale) s[j], per feedback head
            compute = torch.promote_types(f.dtype, torch.float32)
            heads = (B, t, self.n_fb_heads, self.fb_head_dim)
            past_k = cache["k_b"][:, :t].view(heads).to(compute)
            past_s = cache["s"][:, :t].view(heads).to(compute)
            logits = torch.einsum("bhd,bjhd->bhj", q_b[:, 0].to(compute), past_k) * self.fb_scale
            context = torch.einsum("bhj,bjhd->bhd", torch.softmax(logits, dim=-1), past_s)
            s = f + (gamma[:, 0, :, None].to(compute) * context).reshape(B, 1, D).to(f.dtype)
        cache["k_b"][:, t : t + 1] = k_b.reshape(B, 1, D)
        cache["s"][:, t : t + 1] = s
        cache["t"] = t + 1
        return s.view_as(a_bar_t), cache


def _adapt_reference_state(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook for reference state dicts: drop its (max_len x max_len) causal-mask
    buffers (derived constants) and view its 0-dim gamma_bias as shape (1,)."""
    for name in _REFERENCE_MASK_BUFFERS:
        state_dict.pop(prefix + name, None)
    gamma_bias = state_dict.get(prefix + "gamma_bias")
    if gamma_bias is not None and gamma_bias.dim() == 0:
        state_dict[prefix + "gamma_bias"] = gamma_bias.reshape(1)


class SessaLayer(nn.Module):
    """Pre-norm residual Sessa block (no separate MLP): x (B, T, D) -> x + W_out(s * g).

    ln_eps: the LayerNorm's epsilon; mixer_options: SessaMixer's keyword arguments (n_heads,
    n_kv_heads, max_len, use_flash, use_forward_rope, gamma_max, n_fb_heads, solver)."""

    def __init__(self, D: int, *, ln_eps: float = 1e-5, **mixer_options):
        super().__init__()
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.mixer = SessaMixer(D, **mixer_options)
        self.W_out = nn.Linear(D, D)

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., D) -> a_bar = gelu(a) (exact), g (raw): the two halves of W_in(ln(x)), a first."""
        a, g = self.W_in(self.ln(x)).chunk(2, dim=-1)
        return F.gelu(a), g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> y (B, T, D)."""
        a_bar, g = self._gates(x)
        return x + self.W_out(self.mixer(a_bar) * g)

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> Cache:
        """See SessaMixer.init_cache."""
        return self.mixer.init_cache(batch_size, device=device, dtype=dtype, max_len=max_len)

    def prefill(self, x: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """Prompt x (B, T, D) on an empty cache -> (y (B, T, D), cache)."""
        a_bar, g = self._gates(x)
        s, cache = self.mixer.prefill(a_bar, cache)
        return x + self.W_out(s * g), cache

    def decode_step(self, x_t: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """One token x_t (B, D) or (B, 1, D) -> (y_t in the same shape, cache)."""
        a_bar, g = self._gates(x_t)
        s, cache = self.mixer.decode_step(a_bar, cache)
        return x_t + self.W_out(s * g), cache

    # The block protocol DecoderLM relies on (see sessa_scale.models.lm.Block).
    def residual_projections(self) -> list[nn.Linear]:
        """Linears writing into the residual stream (scaled init: std / sqrt(2 n_layers))."""
        return [self.W_out]

    def default_init_modules(self) -> list[nn.Module]:
        """Modules that keep their PyTorch default init under the scaled init (the gamma gate)."""
        return [self.mixer.gamma_ctx]


# The architecture spec (sessa_scale/models/spec.py): model.arch = sessa.


def build_sessa_block(cfg: ModelConfig, layer_idx: int) -> SessaLayer:
    """The layer_idx-th Sessa block of a model described by cfg."""
    return SessaLayer(
        cfg.d_model,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        ln_eps=cfg.ln_eps,
        use_flash=cfg.attention == "flash",
        use_forward_rope=cfg.rope,
        gamma_max=cfg.gamma_max,
        n_fb_heads=cfg.n_fb_heads,
        solver=cfg.solver,
    )


def sessa_layer_flops(cfg: ModelConfig, T: int) -> int:
    """Forward FLOPs of one Sessa layer on one sequence of T tokens. Per token: W_in 4D^2, q 2D^2,
    k and v 2 * 2 D H_kv d, proj_fb 4D^2, gamma_ctx 2 D H_b, out_proj 2D^2 (H > 1), W_out 2D^2;
    forward attention 4 D (T + 1) / 2 (scores and values over j <= t, averaged over t), feedback
    4 D (T - 1) / 2 (q_b.k_b logits and the solve's alpha @ s over j < t)."""
    D = cfg.d_model
    per_token = 4 * D * D + attention_projection_flops(cfg) + 4 * D * D + 2 * D * cfg.n_fb_heads + 2 * D * D
    if cfg.n_heads > 1:
        per_token += 2 * D * D  # out_proj (the identity for one head)
    feedback = 2 * 2 * D * T * (T - 1) // 2  # logits q_b.k_b and alpha @ s over j < t
    return T * per_token + causal_attention_flops(D, T) + feedback


def sessa_plan(cfg: ModelConfig) -> dict[str, Style]:
    """The layout of docs/sessa_math.md: W_in column-parallel (a and g split alike), attention and
    feedback heads local, out_proj reduce-scattered over the hidden dim so each rank holds f for its
    own feedback columns, W_out row-parallel. One feedback head: q_b, k_b, gamma replicated."""
    fb_sharded = cfg.n_fb_heads > 1
    heads = ("n_heads", "n_kv_heads") + (("n_fb_heads",) if fb_sharded else ())
    return {
        "ln": Norm(),
        "W_in": Column(chunks=2),
        "mixer": Heads(heads, gather_input=True),
        "mixer.q_proj": Column(),
        "mixer.k_proj": Column(),
        "mixer.v_proj": Column(),
        "mixer.out_proj": RowToHidden(),
        "mixer.proj_fb": Column(chunks=2) if fb_sharded else Replicated(),
        "mixer.gamma_ctx": Column() if fb_sharded else Replicated(),
        "mixer.gamma_bias": Shard(0) if fb_sharded else Replicated(),
        "W_out": Row(),
    }


def sessa_tp_problems(cfg: ModelConfig, tp: int) -> list[Problem]:
    """Attention heads split over tp; feedback heads replicated (one) or split."""
    problems = indivisible({"n_heads": cfg.n_heads, "n_kv_heads": kv_heads(cfg)}, tp)
    if cfg.n_fb_heads > 1 and cfg.n_fb_heads % tp:
        problem = f"{cfg.n_fb_heads} feedback heads cannot be split over parallel.tensor={tp}; use 1 (replicated) or a multiple of {tp}"
        problems.append(("n_fb_heads", problem))
    return problems


SESSA = ArchSpec(
    name="sessa",
    build_block=build_sessa_block,
    layer_flops=sessa_layer_flops,
    tp_plan=sessa_plan,
    tp_problems=sessa_tp_problems,
)
