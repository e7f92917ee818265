"""Where a training run starts: the checkpoint train.resume selects, the protection of a run
directory that already holds a run, and every difference between the checkpoint's config and this one.

- train.resume=auto: the newest complete checkpoint of run.dir (checkpoint/scan.py; when `latest`
  is missing or unusable, which one was used and why is printed). A fresh start only where no run is.
- train.resume=none: a fresh start; refused where a run is.
- train.resume=PATH: that checkpoint (or run); refused when run.dir holds another run.
run.dir "holds a run" when it has metrics.jsonl records or step_N checkpoint directories: a run that
did not resume them would prune or overwrite them.

On resume every config difference is printed, with what happens to it:
- model keys that shape the weights: refused, naming the keys to restore;
- the LR schedule (optim.lr, min_lr, warmup_steps, decay_steps; train.max_steps while decay_steps is
  null) and AdamW's settings (weight_decay, betas, eps, grad_clip): applied from the next step as if
  the run had been configured so from its start (training/optimizer.py, apply_hyperparameters); the
  next step's learning rate under both configs is printed;
- the batch (train.micro_batch_size, grad_accum_steps, data-parallel ranks): applied; the sample
  sequence continues where it stopped, in steps of the new global batch (data/loader.py);
- the data (data.path/sources/source, corpus_bytes, val_fraction, seq_len, shuffle_buffer, run.seed):
  checked against the checkpoint's data position when the data loads; other samples are refused;
- anything else (logging, checkpointing, evaluation, solver, precision, compile, ...): applied; these
  choose how the same model and data are computed or recorded.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sessa_scale.checkpoint import find_checkpoint, read_meta
from sessa_scale.checkpoint.scan import newest_complete, step_dirs, step_of
from sessa_scale.config import Config, config_from_dict, config_to_dict
from sessa_scale.config.schema import RUNTIME_MODEL_KEYS
from sessa_scale.distributed import is_rank0
from sessa_scale.errors import UserError
from sessa_scale.filesystem import writable_dir
from sessa_scale.training.optimizer import lr_at

RESUMABLE_MODEL_KEYS = {f"model.{key}" for key in RUNTIME_MODEL_KEYS}  # may differ from the checkpoint's
SCHEDULE_KEYS = ("optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.decay_steps")
ADAMW_KEYS = ("optim.weight_decay", "optim.beta1", "optim.beta2", "optim.eps", "optim.grad_clip")
BATCH_KEYS = ("train.micro_batch_size", "train.grad_accum_steps")
DATA_KEYS = (
    "data.source", "data.path", "data.sources", "data.corpus_bytes", "data.val_fraction", "data.seq_len",
    "data.shuffle_buffer", "run.seed",
)  # fmt: skip
_NOT_COMPARED = {"train.resume"}  # how this invocation starts, not a property of the run


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value) -> str:
    """A config value as YAML spells it."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return f"{value:g}" if isinstance(value, float) else str(value)


def existing_run(run_dir: Path) -> str | None:
    """What of a run `run_dir` holds (metrics.jsonl records, checkpoint directories), or None."""
    parts = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        with open(metrics, "rb") as fh:
            records = sum(1 for line in fh if line.strip())
        if records:
            parts.append(f"metrics.jsonl with {records} record(s)")
    checkpoints = step_dirs(run_dir / "checkpoints")
    if checkpoints:
        span = checkpoints[0].name + (f" .. {checkpoints[-1].name}" if len(checkpoints) > 1 else "")
        parts.append(f"{len(checkpoints)} checkpoint directory(ies) ({span})")
    return " and ".join(parts) or None


def config_changes(checkpoint: Path, cfg: Config, dp_size: int) -> list[str]:
    """Lines describing every difference between the checkpoint's config and `cfg`, each group with
    what happens to it ([] if none). Raises UserError for model changes that do not fit the weights."""
    meta = read_meta(checkpoint)
    saved_cfg = config_from_dict(meta["config"], source=str(checkpoint / "meta.json"))
    saved, now = _flatten(config_to_dict(saved_cfg)), _flatten(config_to_dict(cfg))
    changed = [k for k in now if k not in _NOT_COMPARED and saved.get(k) != now[k]]
    refused = [k for k in changed if k.startswith("model.") and k not in RESUMABLE_MODEL_KEYS]
    if refused:
        diffs = "; ".join(f"{k}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in refused)
        raise UserError(
            f"cannot resume from {checkpoint}: the model differs from the one it was trained with ({diffs}). "
            "Restore those keys, or start a fresh run with train.resume=none and a new run.name."
        )
    saved_dp = (meta.get("parallel") or {}).get("data") or dp_size
    if not changed and saved_dp == dp_size:
        return []
    step = meta["step"]
    lines = [f"resuming {checkpoint} (step {step}); the config differs from the checkpoint's:"]
    lines += [f"  {k}: {_show(saved[k])} -> {_show(now[k])}" for k in changed]
    if saved_dp != dp_size:
        lines.append(f"  data-parallel ranks: {saved_dp} -> {dp_size}")
    schedule = [k for k in changed if k in SCHEDULE_KEYS]
    if "train.max_steps" in changed and (saved_cfg.optim.decay_steps is None or cfg.optim.decay_steps is None):
        schedule.append("train.max_steps")
    if schedule:
        before = lr_at(step, saved_cfg.optim, saved_cfg.train.max_steps)
        after = lr_at(step, cfg.optim, cfg.train.max_steps)
        lines.append(
            f"  => learning-rate schedule ({', '.join(schedule)}): applied from step {step + 1} as if the run had been "
            f"configured so from its start; lr of step {step + 1}: {after:.4g} (under the checkpoint's config {before:.4g})"
        )
    adamw = [k for k in changed if k in ADAMW_KEYS]
    if adamw:
        lines.append(f"  => AdamW ({', '.join(adamw)}): applied from step {step + 1}")
    batch = [k for k in changed if k in BATCH_KEYS] + (["data-parallel ranks"] if saved_dp != dp_size else [])
    if batch:
        old = saved_cfg.train.micro_batch_size * saved_cfg.train.grad_accum_steps * saved_dp
        new = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * dp_size
        lines.append(
            f"  => batch ({', '.join(batch)}): global batch {old} -> {new} sequences per step; the data continues "
            "where it stopped, in steps of the new size"
        )
    data = [k for k in changed if k in DATA_KEYS]
    if data:
        lines.append(
            f"  => data ({', '.join(data)}): checked against the checkpoint's data position when the data loads "
            "(another dataset, order or seq_len is refused)"
        )
    other = [k for k in changed if k not in {*schedule, *adamw, *BATCH_KEYS, *DATA_KEYS}]
    if other:
        lines.append(f"  => how the same model and data are computed or recorded ({', '.join(other)}): applied")
    return lines


def _resume_path(resume: str, run_dir: Path, existing: str | None) -> tuple[Path, list[str]]:
    """train.resume=PATH: the checkpoint, and a note when it is older than this run's newest."""
    checkpoint = find_checkpoint(resume)
    own = run_dir / "checkpoints"
    if checkpoint.parent.resolve() != own.resolve():
        if existing:
            raise UserError(
                f"train.resume={resume} continues another run's checkpoint, but run.dir {run_dir} holds {existing}, "
                "which this run would prune and overwrite. Choose a new run.name or run.dir for the continued run."
            )
        return checkpoint, []
    step = read_meta(checkpoint)["step"]
    newer = [d.name for d in step_dirs(own) if step_of(d) > step]
    if not newer:
        return checkpoint, []
    return checkpoint, [
        f"resuming {checkpoint.name}, older than this run's newest checkpoint(s) {', '.join(newer)}: those are replaced "
        f"as the run reaches their steps, and metrics.jsonl records after step {step} are dropped"
    ]


def plan_resume(cfg: Config, dp_size: int) -> Path | None:
    """The checkpoint this run resumes (None: a fresh start), after checking that run.dir is
    writable and that no run there would be overwritten; prints on rank 0 which checkpoint, why
    (when `latest` was not used) and every config change. Raises UserError where it must not start."""
    run_dir = writable_dir(cfg.run_dir, f"run.dir {cfg.run_dir}")
    existing = existing_run(run_dir)
    resume = cfg.train.resume
    keep_it = (
        "Choose another run.name or run.dir for a new run, or move that directory away to start over in it."
    )
    notes: list[str] = []
    if resume == "none":
        if existing:
            raise UserError(
                f"train.resume=none starts a fresh run, but run.dir {run_dir} holds {existing}, which it would "
                f"overwrite. Use train.resume=auto to continue that run. {keep_it}"
            )
        return None
    if resume == "auto":
        choice = newest_complete(run_dir / "checkpoints")
        if choice.checkpoint is None:
            if existing:
                raise UserError(
                    f"run.dir {run_dir} holds {existing}, but nothing to resume: {choice.note or 'it has no checkpoint'}. "
                    f"A fresh start would overwrite that run. To continue it from a checkpoint elsewhere, pass "
                    f"train.resume=PATH. {keep_it}"
                )
            return None
        checkpoint = choice.checkpoint
        notes += [choice.note] if choice.note else []
    else:
        checkpoint, more = _resume_path(resume, run_dir, existing)
        notes += more
    notes += config_changes(checkpoint, cfg, dp_size)
    if is_rank0():
        for note in notes:
            print(f"sessa-scale: {note}" if not note.startswith("  ") else note, file=sys.stderr, flush=True)
    return checkpoint
