"""Tensor parallelism by architecture: whether a config can be split over the TP group, and the
shard/merge arithmetic shared by model conversion (sessa_scale/distributed/tensor_parallel.py) and
checkpoints. How a block splits is its architecture's ArchSpec.tp_plan (in the model's module, in
the styles of sessa_scale/distributed/tp_styles.py); the ArchSpec's tp_problems say which of its
ModelConfig integers tp must divide. A new plan gets a case in tests/distributed/tp_equivalence.py,
which checks tp=2 against tp=1.
"""

from __future__ import annotations

import re

import torch

from sessa_scale.config.schema import ModelConfig
from sessa_scale.distributed.tp_styles import Column, Row, RowToHidden, Shard, Style, indivisible
from sessa_scale.models.registry import build_model
from sessa_scale.models.spec import ARCHITECTURES, Problem, problem_lines


def block_plan(cfg: ModelConfig) -> dict[str, Style] | None:
    """The TP plan of one block of cfg's architecture (paths relative to the block), None if it has none."""
    spec = ARCHITECTURES.get(cfg.arch)
    return None if spec is None or spec.tp_plan is None else spec.tp_plan(cfg)


def tensor_parallel_config_problems(cfg: ModelConfig, tp: int) -> list[Problem]:
    """Why `cfg` cannot be split over `tp` ranks, as (ModelConfig key, problem) pairs ([] if it can)."""
    if tp == 1:
        return []
    spec = ARCHITECTURES.get(cfg.arch)
    if spec is None or spec.tp_plan is None:
        return [("arch", f"{cfg.arch!r} has no tensor-parallel plan; set parallel.tensor=1")]
    return indivisible({"d_model": cfg.d_model, "vocab_size": cfg.vocab_size}, tp) + spec.tp_problems(cfg, tp)


def tensor_parallel_problems(cfg: ModelConfig, tp: int) -> list[str]:
    """Why `cfg` cannot be split over `tp` ranks: "model.<key>: ..." lines ([] if it can)."""
    return problem_lines(tensor_parallel_config_problems(cfg, tp))


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
    plan = block_plan(cfg) if parts[0] == "layers" else None
    if plan is None:
        return None
    path, leaf = ".".join(parts[2:-1]), parts[-1]
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
