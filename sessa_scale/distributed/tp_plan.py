"""Tensor-parallel plans: for each architecture, how every module of one residual block is split
across the TP group, plus the shard/merge arithmetic shared by model conversion and checkpoints.

A plan maps a module (or bare parameter) path inside a block to a style. Inside a parallel
model the residual stream between blocks is sequence-first (T, B, D), sequence-sharded (T/tp, B, D)
under sequence parallelism (SP); a block's body runs batch-first on the full sequence, as the
single-device code expects:

    Norm()           a norm reading the residual stream: its output is all-gathered over the
                     sequence (SP) and handed on batch-first (B, T, D).
    Column(chunks)   nn.Linear -> megatron ColumnParallelLinear: output features split. With
                     chunks = c the output is c concatenated parts (e.g. W_in's [a | g]), each split
                     the same way, so rank r holds part 1's r-th slice, then part 2's r-th slice.
    Row()            nn.Linear -> megatron RowParallelLinear: input features split; the output is
                     summed over TP back into the residual stream (reduce-scatter over the
                     sequence under SP, all-reduce otherwise), sequence-first.
    RowToHidden()    nn.Linear (no bias) with input features split whose partial outputs are
                     reduce-scattered over the hidden dim: rank r gets output columns r*out/tp...
    Shard(dim)       a bare parameter split along dim (per-head gains).
    Replicated()     kept whole on every rank, but its gradient is a partial sum (it runs on every
                     rank on data that only the rank's own columns depend on): all-reduced over TP.
    Heads(attrs, gather_input)
                     a module computing heads: its head-count attributes (e.g. "n_heads") are
                     divided by tp, and with gather_input its column-split input is all-gathered
                     over the hidden dim first.

Parameters not split (norms, Row biases) are replicated; under SP they only see a sequence shard,
so their gradients are all-reduced over TP as well (DeepSpeed does not).

Adding an architecture: write `def <arch>_plan(cfg) -> dict[str, Style]` (paths relative to a
block, e.g. "attn.q_proj"), register it in TP_PLANS, and list in TP_DIVISIBLE the ModelConfig
integers that tp must divide, and add a case to tests/distributed/tp_equivalence.py, which checks
tp=2 against tp=1 (see transformer_plan for a Megatron-style attention + MLP block). Block code
must infer split widths (`reshape(B, T, -1)`) rather than rebuild them from d_model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Union

import torch

from sessa_scale.config.schema import ModelConfig


@dataclass(frozen=True)
class Norm:
    pass


@dataclass(frozen=True)
class Column:
    chunks: int = 1


@dataclass(frozen=True)
class Row:
    pass


@dataclass(frozen=True)
class RowToHidden:
    pass


@dataclass(frozen=True)
class Shard:
    dim: int = 0


@dataclass(frozen=True)
class Replicated:
    pass


@dataclass(frozen=True)
class Heads:
    attrs: tuple[str, ...]
    gather_input: bool = True


Style = Union[Norm, Column, Row, RowToHidden, Shard, Replicated, Heads]


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


def mamba2_plan(cfg: ModelConfig) -> dict[str, Style]:
    """Mamba-2 under TP (as mamba_ssm/Megatron): heads and B/C groups local. z, x, B, C and dt
    projections column-parallel, the depthwise convs and per-head parameters split with them, the
    gated RMSNorm local (it normalizes each group on its own), out_proj row-parallel."""
    convs = {f"mixer.{conv}.{p}": Shard(0) for conv in ("conv_x", "conv_B", "conv_C") for p in ("weight", "bias")}
    return {
        "ln": Norm(),
        "mixer": Heads(("d_inner", "n_heads", "n_groups"), gather_input=False),
        "mixer.in_proj": Column(chunks=2),  # [z | x]
        "mixer.B_proj": Column(),
        "mixer.C_proj": Column(),
        "mixer.dt_proj": Column(),
        **convs,
        "mixer.dt_bias": Shard(0),
        "mixer.A_log": Shard(0),
        "mixer.D": Shard(0),
        "mixer.norm.weight": Shard(0),
        "mixer.out_proj": Row(),
    }


# arch -> plan builder; arch -> ModelConfig integer fields that the TP size must divide.
TP_PLANS: dict[str, Callable[[ModelConfig], dict[str, Style]]] = {
    "sessa": sessa_plan, "transformer": transformer_plan, "mamba2": mamba2_plan}  # fmt: skip
TP_DIVISIBLE: dict[str, tuple[str, ...]] = {
    "sessa": ("n_heads", "n_kv_heads"), "transformer": ("n_heads", "n_kv_heads", "mlp_hidden"), "mamba2": ("ssm_groups",)}  # fmt: skip


def tensor_parallel_problems(cfg: ModelConfig, tp: int) -> list[str]:
    """Why `cfg` cannot be split over `tp` ranks: "model.<key>: ..." strings ([] if it can)."""
    if tp == 1:
        return []
    if cfg.arch not in TP_PLANS:
        return [f"model.arch: {cfg.arch!r} has no tensor-parallel plan; set parallel.tensor=1"]
    problems = []
    n_kv = cfg.n_heads if cfg.n_kv_heads is None else cfg.n_kv_heads
    values = {"n_kv_heads": n_kv}
    if cfg.arch == "transformer":
        from sessa_scale.models.transformer import default_mlp_hidden

        values["mlp_hidden"] = default_mlp_hidden(cfg.d_model, cfg.mlp) if cfg.mlp_hidden is None else cfg.mlp_hidden
    for key in ("d_model", "vocab_size", *TP_DIVISIBLE[cfg.arch]):
        value = values.get(key, getattr(cfg, key))
        if value % tp:
            hint = " (pad the vocabulary: any size >= the tokenizer's works)" if key == "vocab_size" else ""
            problems.append(f"model.{key}: {value} is not divisible by parallel.tensor={tp}; use a multiple of {tp}{hint}")
    if cfg.arch == "sessa" and cfg.n_fb_heads > 1 and cfg.n_fb_heads % tp:
        problems.append(
            f"model.n_fb_heads: {cfg.n_fb_heads} feedback heads cannot be split over parallel.tensor={tp}; "
            f"use 1 (replicated) or a multiple of {tp}"
        )
    return problems


def shard(full: torch.Tensor, dim: int, chunks: int, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s slice of `full` along `dim`, split as `chunks` equal parts each cut in tp."""
    return torch.cat([part.chunk(tp, dim)[rank] for part in full.chunk(chunks, dim)], dim).contiguous()


def unshard(shards: list[torch.Tensor], dim: int, chunks: int) -> torch.Tensor:
    """Inverse of shard: the full tensor from all ranks' slices (in rank order)."""
    parts = [s.chunk(chunks, dim) for s in shards]
    return torch.cat([torch.cat([p[c] for p in parts], dim) for c in range(chunks)], dim)


def param_layout(cfg: ModelConfig, name: str) -> tuple[int, int] | None:
    """(dim, chunks) along which the parameter `name` of the model's state dict is split, or None
    if it is replicated."""
    if name in ("embed.weight", "lm_head.weight"):
        return 0, 1
    parts = name.split(".")
    if parts[0] != "layers" or cfg.arch not in TP_PLANS:
        return None
    path, leaf = ".".join(parts[2:-1]), parts[-1]
    plan = TP_PLANS[cfg.arch](cfg)
    style = plan.get(path)
    if isinstance(style, Column):
        return 0, style.chunks
    if isinstance(style, (Row, RowToHidden)) and leaf == "weight":
        return 1, 1
    direct = plan.get(f"{path}.{leaf}" if path else leaf)
    if isinstance(direct, Shard):
        return direct.dim, 1
    return None


def merge_state_dicts(cfg: ModelConfig, states: list[dict]) -> dict:
    """One full (tp=1) model state dict from the per-TP-rank state dicts of a parallel model."""
    merged = {}
    for name, value in states[0].items():
        layout = param_layout(cfg, name)
        merged[name] = value if layout is None else unshard([s[name] for s in states], *layout)
    return merged


def universal_checkpoint_info(cfg: ModelConfig) -> dict:
    """DeepSpeed's `universal_checkpoint_info` for `cfg` (saved in every checkpoint's client state):
    how ds_to_universal merges each parameter's TP slices (replicated, row-parallel: cat on dim 1,
    two sub-parameters such as W_in's [a | g], default: cat on dim 0) and how a new TP size re-splits
    them. Patterns are exact parameter names."""
    from sessa_scale.models.registry import build_model

    with torch.device("meta"):
        names = [name for name, _ in build_model(cfg).named_parameters()]
    kinds = {"tp_replicated_parameter_patterns": [], "parameter_with_row_parallelism_patterns": [],
             "parameter_with_2_sub_params_cat_dim_0": []}  # fmt: skip
    for name in names:
        layout = param_layout(cfg, name)
        pattern = "^" + re.escape(name) + "$"
        if layout is None:
            kinds["tp_replicated_parameter_patterns"].append(pattern)
        elif layout == (1, 1):
            kinds["parameter_with_row_parallelism_patterns"].append(pattern)
        elif layout == (0, 2):
            kinds["parameter_with_2_sub_params_cat_dim_0"].append(pattern)
        elif layout != (0, 1):
            raise ValueError(f"{name}: no universal-checkpoint category for a split {layout}")
    return {"universal_checkpoint_version": 0.2, **kinds}
