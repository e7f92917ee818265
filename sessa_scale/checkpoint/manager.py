"""Checkpoint layout and lifecycle.

    RUN_DIR/checkpoints/
        step_00000100/         DeepSpeed files (model, optimizer, scheduler), rng_rank{r}.pt, meta.json
        step_00000200/
        latest                 text file: the tag of the newest complete checkpoint

A save is written to `step_N.partial`, completed by every rank (barrier), finished with
meta.json (which lists every file with its size), renamed to `step_N`, and only then does `latest`
move (write-then-rename). A crash or kill at any point leaves `latest` naming a complete, loadable
checkpoint; a pointer that is missing or names an incomplete checkpoint is stood in for by the
newest complete one (checkpoint/scan.py). A save that the file system refuses (no space, read-only)
removes its partial directory and raises a UserError; the previous checkpoint stays `latest`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import torch

from sessa_scale.checkpoint.rng import capture_rng_state, restore_rng_state
from sessa_scale.checkpoint.scan import LATEST, META, file_sizes, incomplete_reason, newest_complete, step_dirs
from sessa_scale.distributed import barrier, is_rank0, rank
from sessa_scale.errors import UserError
from sessa_scale.filesystem import file_system_error, write_failure_cause


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_meta(checkpoint: Path) -> dict:
    """meta.json of a checkpoint directory: {"step", "config", "format"}."""
    try:
        return json.loads((checkpoint / META).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint {checkpoint} is incomplete or unreadable ({META}: {exc}).") from None


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a checkpoint directory, a run directory or a checkpoints directory (the last two
    through their `latest` pointer, or the newest complete checkpoint when the pointer is missing or
    unusable, said on stderr) to a complete checkpoint directory, or raise UserError."""
    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        if (candidate / LATEST).exists() or step_dirs(candidate):
            choice = newest_complete(candidate)
            if choice.checkpoint is None:
                raise UserError(f"{choice.note}; pass the path of a complete checkpoint directory (step_*) explicitly.")
            if choice.note and is_rank0():
                print(f"sessa-scale: {choice.note}", file=sys.stderr)
            return choice.checkpoint
    if (p / META).is_file():
        reason = incomplete_reason(p)
        if reason is not None:
            raise UserError(f"checkpoint {p} is incomplete ({reason}); pass another checkpoint directory (step_*).")
        return p
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist; pass a run directory or a checkpoint directory (step_*).")
    raise UserError(
        f"{p} is not a checkpoint: it holds no {META} and no checkpoints/{LATEST}; pass a run directory or a "
        "checkpoint directory (step_*)."
    )


class CheckpointManager:
    """Saves and loads DeepSpeed engine checkpoints under RUN_DIR/checkpoints."""

    def __init__(self, run_dir: Path, keep: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this run (see checkpoint/scan.py), or None."""
        return newest_complete(self.dir).checkpoint

    def save(self, engine, step: int, client_state: dict, meta: dict) -> Path:
        """Save a complete checkpoint for `step` and move `latest` to it. Collective: every rank calls.
        A write the file system refuses removes the partial checkpoint and raises a UserError."""
        tag = f"step_{step:08d}"
        final, partial = self.dir / tag, self.dir / f"{tag}.partial"
        if is_rank0():
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # debris of an interrupted save
        barrier()
        try:
            engine.save_checkpoint(str(self.dir), tag=partial.name, client_state=client_state, save_latest=False)
            torch.save(capture_rng_state(), partial / f"rng_rank{rank()}.pt")
        except (OSError, RuntimeError) as exc:
            self._abandon(partial, exc)
        barrier()
        if is_rank0():
            try:
                record = {"format": 1, "step": step, **meta, "files": file_sizes(partial)}
                _atomic_write_text(partial / META, json.dumps(record, indent=1))
            except OSError as exc:
                self._abandon(partial, exc)
            stale = self.dir / f"{tag}.old"
            if final.exists():  # re-saving a step (e.g. after resuming from an earlier checkpoint)
                final.rename(stale)
            partial.rename(final)
            _atomic_write_text(self.dir / LATEST, tag + "\n")
            shutil.rmtree(stale, ignore_errors=True)
            self._prune(keep_tag=tag)
        barrier()
        return final

    def _abandon(self, partial: Path, exc: BaseException) -> None:
        """A save failed: raise a UserError naming the file-system cause (after removing the partial
        checkpoint, which frees its space), or re-raise `exc` when the file system is not the cause."""
        cause = write_failure_cause(self.dir, exc)
        shutil.rmtree(partial, ignore_errors=True)
        if cause is None:
            raise exc
        previous = self.latest()
        kept = (
            f"The previous checkpoint {previous} is intact: fix the cause and run the same command again to resume "
            "from it."
            if previous is not None
            else "There is no earlier checkpoint of this run."
        )
        advice = f"The partial checkpoint was removed. {kept}"
        raise file_system_error(partial.with_suffix(""), "write checkpoint", cause, advice) from None

    def _prune(self, keep_tag: str) -> None:
        tags = [p.name for p in step_dirs(self.dir)]
        for name in tags[: max(0, len(tags) - self.keep)]:
            if name != keep_tag:
                shutil.rmtree(self.dir / name, ignore_errors=True)

    def load(self, engine, checkpoint: Path, universal: Path | None = None) -> dict:
        """Restore model, optimizer, scheduler and this rank's RNG; return the client state.
        universal: the checkpoint's universal form (checkpoint/universal.py) to load instead, for
        an engine configured with checkpoint.load_universal."""
        source = checkpoint if universal is None else universal
        try:
            load_path, client_state = engine.load_checkpoint(
                str(source.parent), tag=source.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            raise UserError(f"checkpoint {checkpoint} could not be loaded: {exc}") from None
        if load_path is None:
            raise UserError(f"checkpoint {checkpoint} could not be loaded: DeepSpeed found no model states in it.")

        rng_file = checkpoint / f"rng_rank{rank()}.pt"
        if rng_file.is_file():  # absent when resuming on more ranks than were saved
            restore_rng_state(torch.load(rng_file, weights_only=False))
        return client_state
