"""Checking a Config: field types against the schema (with did-you-mean for unknown keys) and
value ranges, every problem collected so that one error can report them all.

A problem is a string "SOURCE: KEY: what is wrong", SOURCE being the file that set KEY,
"command line" for an override, or "defaults" for a schema default."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

from sessa_scale.config.schema import Config
from sessa_scale.training.compile import COMPILE_MODES
from sessa_scale.training.cuda_graphs import config_problems as cuda_graph_problems
from sessa_scale.training.precision import PRECISIONS

DEFAULT_SOURCE = "defaults"

DATA_SOURCES = ("stdlib",)
WANDB_MODES = ("online", "offline", "disabled")
ZERO_STAGES = (0, 1, 2, 3)

_NOUNS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def show(value: Any) -> str:
    """A value as a user would write it in YAML, shortened."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def field_types(section: str) -> dict[str, tuple[type | tuple[type, ...], bool]]:
    """Field name -> (base type, or the tuple of them for a union such as int | str; whether null is
    allowed) for one section of the schema."""
    cls = {f.name: f for f in dataclasses.fields(Config)}[section].default_factory
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        base = [a for a in args if a is not type(None)]
        out[name] = (base[0] if len(base) == 1 else tuple(base), len(base) < len(args))
    return out


def coerce(value: Any, base: type | tuple[type, ...], nullable: bool) -> tuple[Any, str | None]:
    """(converted value, None) if `value` fits the field type, else (None, problem text).
    Integral floats are accepted for integers; numeric strings such as '3e-4' (which YAML
    reads as strings) for floats. A union takes the first of its types that fits."""
    if isinstance(base, tuple):
        for option in base:
            converted, problem = coerce(value, option, nullable)
            if problem is None:
                return converted, None
        return None, f"expected {' or '.join(_NOUNS[b] for b in base)}, got {show(value)}"
    if value is None:
        return (None, None) if nullable else (None, f"expected {_NOUNS[base]}, got null")
    wrong = (None, f"expected {_NOUNS[base]}{' or null' if nullable else ''}, got {show(value)}")
    if base is bool or base is list:
        return (value, None) if isinstance(value, base) else wrong
    if isinstance(value, bool):
        return wrong
    if base is int:
        if isinstance(value, int):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
        return wrong
    if base is float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                return wrong
        if not isinstance(value, (int, float)):
            return wrong
        if not math.isfinite(value):
            return None, f"must be a finite number, got {show(value)}"
        return float(value), None
    if isinstance(value, str):
        return value, None
    return None, f"expected a string, got {show(value)} (quote it in YAML)"


def suggest(key: str, section: str | None) -> str:
    """Did-you-mean text for an unknown top-level key (section None) or section key."""
    sections = section_names()
    if section is None:
        owners = [s for s in sections if key in field_types(s)]
        if owners:
            return f"unknown section; did you mean {' or '.join(f'{s}.{key}' for s in owners)} (nested under {owners[0]}:)?"
        close = difflib.get_close_matches(key, sections, n=1)
        hint = f"did you mean {close[0]}?" if close else f"sections are {', '.join(sections)}"
        return f"unknown section; {hint}"
    owners = [s for s in sections if s != section and key in field_types(s)]
    if owners:
        return f"unknown key; did you mean {owners[0]}.{key}?"
    names = list(field_types(section))
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return f"unknown key; did you mean {section}.{close[0]}?"
    return f"unknown key; the keys of {section} are {', '.join(names)}"


def _source_checks(item: Any) -> list[tuple[bool, str]]:
    """(ok, what is allowed) for one entry of data.sources."""
    if not isinstance(item, dict):
        return [(False, "must be a mapping {path: DIR_OR_URL, weight: W}")]
    path, weight = item.get("path"), item.get("weight", 1.0)
    extra = sorted(str(k) for k in item if k not in ("path", "weight"))
    return [
        (not extra, f"unknown key(s) {', '.join(extra)}; an entry has path and weight"),
        (isinstance(path, str) and bool(path.strip()), "needs path: a prepared dataset directory or URL"),
        (
            isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight) and weight > 0,
            "weight must be a number > 0",
        ),
    ]


def _range_checks(cfg: Config) -> list[tuple[str, bool, str]]:
    """(dotted key, ok, what is allowed) for every range and choice rule."""
    r, d, o, t = cfg.run, cfg.data, cfg.optim, cfg.train
    return [
        ("run.name", bool(r.name.strip()) and "/" not in r.name, "must be a non-empty name without '/'"),
        ("run.seed", r.seed >= 0, "must be >= 0"),
        ("data.source", d.source in DATA_SOURCES, f"must be one of {', '.join(DATA_SOURCES)}"),
        ("data.path", d.path is None or bool(d.path.strip()), "must be null or a dataset directory / URL"),
        ("data.sources", d.path is None or d.sources is None, "cannot be set together with data.path (use one)"),
        ("data.sources", d.sources is None or len(d.sources) >= 1, "must be null or a non-empty list"),
        *(
            (f"data.sources[{i}]", ok, allowed)
            for i, item in enumerate(d.sources or [])
            for ok, allowed in _source_checks(item)
        ),
        ("data.seq_len", d.seq_len >= 1, "must be >= 1"),
        ("data.corpus_bytes", d.corpus_bytes >= 1, "must be >= 1"),
        ("data.val_fraction", 0 < d.val_fraction <= 0.5, "must be in (0, 0.5]"),
        ("data.shuffle_buffer", d.shuffle_buffer >= 1, "must be >= 1 (1 = shuffle shard order only)"),
        ("data.num_workers", d.num_workers >= 0, "must be >= 0 (0 = read in the training process)"),
        ("data.prefetch", d.prefetch >= 1, "must be >= 1"),
        ("optim.lr", o.lr > 0, "must be > 0"),
        ("optim.min_lr", o.min_lr >= 0, "must be >= 0"),
        ("optim.min_lr", o.min_lr <= o.lr, f"must be <= optim.lr ({o.lr:g})"),
        ("optim.warmup_steps", o.warmup_steps >= 0, "must be >= 0"),
        (
            "optim.decay_steps",
            o.decay_steps is None or o.decay_steps >= max(1, o.warmup_steps),
            f"must be null (decay until train.max_steps) or >= max(1, optim.warmup_steps) = {max(1, o.warmup_steps)}",
        ),
        ("optim.weight_decay", o.weight_decay >= 0, "must be >= 0"),
        ("optim.beta1", 0 <= o.beta1 < 1, "must be in [0, 1)"),
        ("optim.beta2", 0 <= o.beta2 < 1, "must be in [0, 1)"),
        ("optim.eps", o.eps > 0, "must be > 0"),
        ("optim.grad_clip", o.grad_clip >= 0, "must be >= 0 (0 disables clipping)"),
        ("train.max_steps", t.max_steps >= 1, "must be >= 1"),
        ("train.micro_batch_size", t.micro_batch_size >= 1, "must be >= 1"),
        ("train.grad_accum_steps", t.grad_accum_steps >= 1, "must be >= 1"),
        ("train.precision", t.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
        ("train.compile_mode", t.compile_mode in COMPILE_MODES, f"must be one of {', '.join(COMPILE_MODES)}"),
        ("train.eval_interval", t.eval_interval >= 0, "must be >= 0 (0 disables evaluation)"),
        ("train.profile_step", t.profile_step >= 0, "must be >= 0 (0: no profile)"),
        ("train.eval_batches", t.eval_batches >= 1, "must be >= 1"),
        ("train.resume", bool(t.resume.strip()), "must be 'auto', 'none' or a checkpoint path"),
        ("train.skip_nonfinite_steps", t.skip_nonfinite_steps >= 0, "must be >= 0 (0 stops at the first NaN/inf step)"),
        ("checkpoint.interval", cfg.checkpoint.interval >= 0, "must be >= 0 (0 saves only at the end)"),
        ("checkpoint.keep", cfg.checkpoint.keep >= 1, "must be >= 1"),
        ("zero.stage", cfg.zero.stage in ZERO_STAGES, "must be 0, 1, 2 or 3"),
        (
            "zero.offload_optimizer",
            not cfg.zero.offload_optimizer or cfg.zero.stage >= 1,
            "needs zero.stage 1, 2 or 3 (ZeRO partitions what it offloads); set zero.stage=1 or offload_optimizer=false",
        ),
        ("zero.reduce_bucket_size", cfg.zero.reduce_bucket_size >= 1, "must be >= 1 (elements per gradient reduction bucket)"),
        ("zero.allgather_bucket_size", cfg.zero.allgather_bucket_size >= 1, "must be >= 1 (elements per parameter all-gather)"),
        ("parallel.tensor", cfg.parallel.tensor >= 1, "must be >= 1 (1 disables tensor parallelism)"),
        (
            "data.seq_len",
            not (cfg.parallel.sequence_parallel and cfg.parallel.tensor > 1) or d.seq_len % cfg.parallel.tensor == 0,
            f"must be a multiple of parallel.tensor ({cfg.parallel.tensor}) under parallel.sequence_parallel=true",
        ),
        ("logging.wandb_mode", cfg.logging.wandb_mode in WANDB_MODES, f"must be one of {', '.join(WANDB_MODES)}"),
        *cuda_graph_problems(cfg),
    ]


def _value(cfg: Config, dotted: str) -> Any:
    section, name = dotted.split(".", 1)
    name, _, index = name.partition("[")
    value = getattr(getattr(cfg, section), name)
    return value[int(index.rstrip("]"))] if index else value


def check_values(cfg: Config, sources: dict[str, str], skip: set[str]) -> list[str]:
    """Range, choice and model problems of a well-typed Config; keys in `skip` (already
    reported as mistyped) are not checked again. `sources` maps dotted keys to where they were
    set; a problem with a key left at its default (a cross-key rule) names the last source that
    set anything in that key's section."""

    def source_of(key: str) -> str:
        key = key.split("[")[0]
        return sources.get(key) or sources.get(key.split(".")[0]) or DEFAULT_SOURCE

    problems = [
        f"{source_of(key)}: {key}: {allowed}, got {show(_value(cfg, key))}"
        for key, ok, allowed in _range_checks(cfg)
        if not ok and key not in skip
    ]
    from sessa_scale.models.registry import model_config_problems  # lazy: models import torch

    model_problems = model_config_problems(cfg.model)
    for field, problem in model_problems:
        key = f"model.{field}"
        if key not in skip:
            problems.append(f"{source_of(key)}: {key}: {problem.rstrip('.')}")
    if "parallel.tensor" not in skip and cfg.parallel.tensor > 1 and not model_problems:
        from sessa_scale.distributed.tp_plan import tensor_parallel_config_problems

        for field, problem in tensor_parallel_config_problems(cfg.model, cfg.parallel.tensor):
            key = f"model.{field}"
            problems.append(f"{source_of(key)}: {key}: {problem} (needed by parallel.tensor)")
    return problems
