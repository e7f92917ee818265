"""`sessa-scale train [CONFIG] [key=value ...]`: train a model (no CONFIG: the tiny CPU default)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model",
        description="Train a model. With no CONFIG, trains the tiny Sessa model on the embedded corpus "
        "(the Python standard library, byte-level). Overrides are dotted keys, e.g. train.max_steps=30 "
        "run.name=exp1 train.resume=none. Run under torchrun / srun as `python -m sessa_scale train ...`. "
        "SIGUSR1, SIGTERM or Ctrl-C stops training after the current step with a checkpoint and exit status 75 "
        "(a second Ctrl-C aborts at once, status 130); running the same command again resumes (train.resume=auto). "
        "Exit status 2: a configuration, data or file-system problem (nothing of an existing run is changed); "
        "3: NaN/inf losses beyond train.skip_nonfinite_steps.",
    )
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value", help="an optional YAML config, then overrides")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve the config, build the model (on the meta device: every shape, no memory) and read one "
                   "micro-batch of rank 0, print what the run would be (parameters, FLOPs, tokens per step) and exit")


def split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """The first item is the config path unless it is a key=value override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _format(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def run(args: argparse.Namespace) -> int:
    from sessa_scale.config import load_config
    from sessa_scale.distributed import is_rank0
    from sessa_scale.training.preemption import PREEMPTED_EXIT_CODE

    path, overrides = split_config_and_overrides(args.args)
    cfg = load_config(path, overrides)
    if args.dry_run:
        return dry_run(cfg)
    from sessa_scale.training.trainer import train

    try:
        summary = train(cfg)
    except KeyboardInterrupt:
        from sessa_scale.checkpoint import CheckpointManager

        latest = CheckpointManager(cfg.run_dir, cfg.checkpoint.keep).latest()
        kept = f"the last complete checkpoint is {latest}; run the same command again to resume from it" if latest else "no checkpoint was saved"
        print(f"sessa-scale train: aborted by a second Ctrl-C without saving; {kept}", file=sys.stderr)
        return 130
    if not is_rank0():
        return PREEMPTED_EXIT_CODE if summary["preempted"] else 0
    end = f"step {summary['final_step']}/{cfg.train.max_steps}"
    if summary["preempted"]:
        print(
            f"stopped early: {summary['preempted']} at {end}; checkpoint {summary['checkpoint']}; "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return PREEMPTED_EXIT_CODE
    if summary["final_step"] == summary["start_step"]:
        print(
            f"already complete: the run is at {end} (checkpoint {summary['checkpoint']}); nothing to train. "
            "Raise train.max_steps to continue it.",
            file=sys.stderr,
        )
        return 0
    print(
        f"done: {end}, loss {_format(summary['first_loss'])} -> {_format(summary['last_loss'])}, "
        f"val_loss {_format(summary['val_loss'])}, {summary['wall_s']:.1f} s; checkpoint {summary['checkpoint']}",
        file=sys.stderr,
    )
    return 0


def dry_run(cfg) -> int:
    """Check a run without training: the model is built (meta device) and one micro-batch read."""
    import torch

    from sessa_scale.commands.config import format_summary, run_summary
    from sessa_scale.data.loader import inputs_and_targets
    from sessa_scale.data.setup import build_training_data
    from sessa_scale.models.registry import build_model

    summary = run_summary(cfg)
    with torch.device("meta"):
        build_model(cfg.model)
    data = build_training_data(cfg, dp_rank=0, dp_size=summary["data_parallel"])
    try:
        inputs, targets = inputs_and_targets(data.train.next_step()[0])
    finally:
        data.train.close()
    print(
        f"dry run: {cfg.model.arch} model built; data: {data.description}; one micro-batch of rank 0: inputs and targets "
        f"{tuple(inputs.shape)} {inputs.dtype}, token ids {int(inputs.min())}..{int(inputs.max())} "
        f"(model.vocab_size {cfg.model.vocab_size}); {len(data.val_batches)} validation micro-batch(es)\n"
        + format_summary(summary, cfg)
    )
    return 0
