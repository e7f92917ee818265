"""`sessa-scale config [CONFIG] [key=value ...]`: the resolved config, where each value came from,
and what it implies (parameters, FLOPs per token, tokens per step), without training."""

from __future__ import annotations

import argparse
import json
import os

from sessa_scale.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "config",
        help="print the resolved config with the source of every value",
        description="Resolve a config as `sessa-scale train` would (schema defaults, the YAML file and its bases, "
        "key=value overrides; model.vocab_size=auto from the dataset) and print every value with where it came "
        "from (defaults, the file that set it, or command line), then the exact parameter count, the model FLOPs "
        "per training token and the tokens per optimizer step.",
    )
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value", help="an optional YAML config, then overrides")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks of the run, for tokens per step (default: $WORLD_SIZE, else parallel.tensor: one replica)")
    p.add_argument("--json", action="store_true", help="print {config, sources, summary} as JSON")


def run_summary(cfg, world_size: int | None = None) -> dict:
    """What a config implies: parameters (total and without the embedding / untied head), model
    FLOPs per token (forward, and training = forward + backward, at data.seq_len; see
    sessa_scale/models/flops.py) and tokens per optimizer step over world_size ranks."""
    from sessa_scale.models.registry import count_parameters, count_training_flops

    tensor = cfg.parallel.tensor
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", tensor))
    if world_size < 1 or world_size % tensor:
        raise UserError(f"--world-size {world_size} is not a positive multiple of parallel.tensor={tensor}")
    params = count_parameters(cfg.model)
    training_flops = count_training_flops(cfg.model, cfg.data.seq_len)
    per_replica = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len
    data_parallel = world_size // tensor
    return {
        "arch": cfg.model.arch,
        "params": params.total,
        "non_embedding_params": params.non_embedding,
        "vocab_size": cfg.model.vocab_size,
        "seq_len": cfg.data.seq_len,
        "forward_flops_per_token": training_flops / 3,
        "training_flops_per_token": training_flops,
        "world_size": world_size,
        "data_parallel": data_parallel,
        "tokens_per_step": per_replica * data_parallel,
        "training_flops_per_step": training_flops * per_replica * data_parallel,
    }


def format_summary(s: dict, cfg) -> str:
    t = cfg.train
    return "\n".join(
        [
            f"parameters: {s['params']:,} ({s['non_embedding_params']:,} without the embedding / untied LM head); "
            f"{s['arch']}, vocab {s['vocab_size']:,}",
            f"model FLOPs per token at seq_len {s['seq_len']:,}: {s['forward_flops_per_token']:.4g} forward, "
            f"{s['training_flops_per_token']:.4g} training (forward + backward)",
            f"tokens per optimizer step: {s['tokens_per_step']:,} = micro_batch_size {t.micro_batch_size} x grad_accum_steps "
            f"{t.grad_accum_steps} x {s['data_parallel']} data-parallel replica(s) (world size {s['world_size']} / "
            f"parallel.tensor {cfg.parallel.tensor}) x seq_len {s['seq_len']:,}; "
            f"{s['training_flops_per_step']:.4g} training FLOPs per step",
        ]
    )


def _format_value(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


def run(args: argparse.Namespace) -> int:
    from sessa_scale.commands.train import split_config_and_overrides
    from sessa_scale.config import config_to_dict, load_config_with_sources

    path, overrides = split_config_and_overrides(args.args)
    cfg, sources = load_config_with_sources(path, overrides)
    summary = run_summary(cfg, args.world_size)
    values = config_to_dict(cfg)
    if args.json:
        print(json.dumps({"config": values, "sources": sources, "summary": summary}, indent=1))
        return 0
    rows = [(f"{section}.{key}", _format_value(value), sources[f"{section}.{key}"])
            for section, keys in values.items() for key, value in keys.items()]  # fmt: skip
    key_width = max(len(k) for k, _, _ in rows)
    value_width = min(40, max(len(v) for _, v, _ in rows))
    lines = [f"{k:<{key_width}}  {v:<{value_width}}  # {src}" for k, v, src in rows]
    print("\n".join(lines) + "\n\n" + format_summary(summary, cfg))
    return 0
