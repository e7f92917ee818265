"""The styles of a tensor-parallel plan (each architecture's ArchSpec.tp_plan, in its model module)
and the divisibility rule that splitting rests on. Leaf module: model modules import it.

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

Block code must infer split widths (`reshape(B, T, -1)`) rather than rebuild them from d_model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


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


def indivisible(values: dict[str, int], tp: int) -> list[tuple[str, str]]:
    """(ModelConfig key, problem) for each of `values` (key -> the integer tp must divide) that
    parallel.tensor = tp does not divide."""
    problems = []
    for key, value in values.items():
        if value % tp:
            hint = " (pad the vocabulary: any size >= the tokenizer's works)" if key == "vocab_size" else ""
            problems.append((key, f"{value} is not divisible by parallel.tensor={tp}; use a multiple of {tp}{hint}"))
    return problems
