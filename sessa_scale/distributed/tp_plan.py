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
integers that tp must divide, and add the architecture to the cases of
tests/test_tensor_parallel.py, which checks tp=2 against tp=1. A Transformer block, for instance:
{"ln1": Norm(), "attn": Heads(("n_heads", "n_kv_heads"), gather_input=False), "attn.q_proj": Column(),
"attn.k_proj": Column(), "attn.v_proj": Column(), "attn.o_proj": Row(), "ln2": Norm(),
"mlp.fc1": Column(), "mlp.fc2": Row()}.
"""

from __future__ import annotations

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
    """The layout of shared/SESSA_SPEC.md: W_in column-parallel (a and g split alike), attention and
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


# arch -> plan builder; arch -> ModelConfig integer fields that the TP size must divide
TP_PLANS: dict[str, Callable[[ModelConfig], dict[str, Style]]] = {"sessa": sessa_plan}
TP_DIVISIBLE: dict[str, tuple[str, ...]] = {"sessa": ("n_heads", "n_kv_heads")}


def tensor_parallel_problems(cfg: ModelConfig, tp: int) -> list[str]:
    """Why `cfg` cannot be split over `tp` ranks: "model.<key>: ..." strings ([] if it can)."""
    if tp == 1:
        return []
    if cfg.arch not in TP_PLANS:
        return [f"model.arch: {cfg.arch!r} has no tensor-parallel plan; set parallel.tensor=1"]
    problems = []
    n_kv = cfg.n_heads if cfg.n_kv_heads is None else cfg.n_kv_heads
    values = {"d_model": cfg.d_model, "vocab_size": cfg.vocab_size, "n_heads": cfg.n_heads, "n_kv_heads": n_kv}
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
        if name.endswith("_extra_state"):  # megatron-core layer metadata, not a weight
            continue
        layout = param_layout(cfg, name)
        merged[name] = value if layout is None else unshard([s[name] for s in states], *layout)
    return merged
