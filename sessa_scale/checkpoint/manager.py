"""Checkpoint layout and lifecycle.

    RUN_DIR/checkpoints/
        step_00000100/         DeepSpeed files (model, optimizer, scheduler), rng_rank{r}.pt, meta.json
        step_00000200/
        latest                 text file: the tag of the newest complete checkpoint

A save is written to `step_N.partial`, completed by every rank (barrier), finished with
meta.json, renamed to `step_N`, and only then does `latest` move (write-then-rename). A crash or
kill at any point leaves `latest` naming a complete, loadable checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from sessa_scale.checkpoint.rng import capture_rng_state, restore_rng_state
from sessa_scale.distributed import barrier, is_rank0, rank
from sessa_scale.errors import UserError

LATEST = "latest"
META = "meta.json"
_TAG = re.compile(r"^step_(\d{8})$")


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
    through their `latest` pointer) to a complete checkpoint directory, or raise UserError."""
    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        if (candidate / LATEST).is_file():
            target = candidate / (candidate / LATEST).read_text().strip()
            if not (target / META).is_file():
                raise UserError(
                    f"{candidate / LATEST} names {target.name}, which is missing or incomplete; pass the path of "
                    "another checkpoint directory (step_*) explicitly."
                )
            return target
    if (p / META).is_file():
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
        """The newest complete checkpoint of this run, or None if it has none."""
        if not (self.dir / LATEST).is_file():
            return None
        return find_checkpoint(self.dir)

    def resolve_resume(self, resume: str) -> Path | None:
        """train.resume -> the checkpoint to load, or None for a fresh start."""
        if resume == "auto":
            return self.latest()
        if resume == "none":
            if self.latest() is not None:
                raise UserError(
                    f"train.resume=none, but {self.dir} already holds checkpoints that a fresh run would overwrite; "
                    "use train.resume=auto to continue it, choose another run.name / run.dir, or delete the directory."
                )
            return None
        return find_checkpoint(resume)

    def save(self, engine, step: int, client_state: dict, meta: dict) -> Path:
        """Save a complete checkpoint for `step` and move `latest` to it. Collective: every rank calls."""
        tag = f"step_{step:08d}"
        final, partial = self.dir / tag, self.dir / f"{tag}.partial"
        if is_rank0():
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # debris of an interrupted save
        barrier()
        engine.save_checkpoint(str(self.dir), tag=partial.name, client_state=client_state, save_latest=False)
        torch.save(capture_rng_state(), partial / f"rng_rank{rank()}.pt")
        barrier()
        if is_rank0():
            _atomic_write_text(partial / META, json.dumps({"format": 1, "step": step, **meta}, indent=1))
            stale = self.dir / f"{tag}.old"
            if final.exists():  # re-saving a step (e.g. after resuming from an earlier checkpoint)
                final.rename(stale)
            partial.rename(final)
            _atomic_write_text(self.dir / LATEST, tag + "\n")
            shutil.rmtree(stale, ignore_errors=True)
            self._prune(keep_tag=tag)
        barrier()
        return final

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.dir.iterdir() if p.is_dir() and _TAG.match(p.name))
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
