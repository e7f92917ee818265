"""Resuming on a different parallel layout through DeepSpeed's universal checkpoints.

A checkpoint records the (tensor, data) sizes it was saved with (meta.json "parallel") and, in its
client state, the model's `universal_checkpoint_info` (how TP slices merge, see
sessa_scale.distributed.tp_plan). When a run resumes with other sizes, rank 0 converts the
checkpoint once with DeepSpeed's ds_to_universal into STEP_DIR/universal (written to
universal.partial, renamed when complete, so an interrupted conversion is redone, never used),
and the engine loads it with `checkpoint.load_universal`, re-splitting parameters and optimizer
states for the new TP and DP sizes. Needs zero.stage >= 1 (DeepSpeed restores universal
checkpoints through its ZeRO optimizers; its ZeRO-3 restore is refused, see needs_universal).
"""

from __future__ import annotations

import contextlib
import io
import shutil
from argparse import Namespace
from pathlib import Path

from sessa_scale.checkpoint.manager import read_meta
from sessa_scale.distributed import barrier, is_rank0
from sessa_scale.errors import UserError

UNIVERSAL = "universal"


def saved_layout(checkpoint: Path) -> dict:
    """{"tensor", "data"} sizes a checkpoint was saved with (checkpoints predating TP: tensor 1,
    data None = unknown, taken as unchanged)."""
    return read_meta(checkpoint).get("parallel") or {"tensor": 1, "data": None}


def needs_universal(checkpoint: Path, tensor: int, data: int, zero_stage: int) -> bool:
    """Whether resuming `checkpoint` on (tensor, data) needs a universal conversion; raises
    UserError for a layout change DeepSpeed cannot re-split."""
    saved = saved_layout(checkpoint)
    if saved["tensor"] == tensor and (saved["data"] in (data, None) or zero_stage == 0):
        return False  # ZeRO-0 replicates everything over DP: any DP size loads the same files
    if zero_stage == 0:
        raise UserError(
            f"cannot resume {checkpoint} (saved with parallel.tensor={saved['tensor']}) at parallel.tensor={tensor} "
            "with zero.stage=0: re-splitting tensor-parallel optimizer states goes through DeepSpeed's universal "
            "checkpoints, which need a ZeRO optimizer. Resume with zero.stage=1 (same memory as stage 0 at one "
            f"data-parallel rank), or with parallel.tensor={saved['tensor']}."
        )
    if zero_stage == 3:
        raise UserError(
            f"cannot resume {checkpoint} (saved with tensor={saved['tensor']}, data={saved['data']}) on tensor={tensor}, "
            f"data={data} with zero.stage=3: DeepSpeed's ZeRO-3 universal restore does not reproduce the optimizer "
            "trajectory (the loss drifts from the second step on). Resume on the saved layout, or train with "
            "zero.stage=1 or 2, which re-split exactly."
        )
    return True


def ensure_universal(checkpoint: Path) -> Path:
    """The universal form of `checkpoint` (STEP_DIR/universal), converted on rank 0 if missing.
    Collective: every rank calls."""
    target = checkpoint / UNIVERSAL
    if is_rank0() and not target.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        partial = checkpoint / f"{UNIVERSAL}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        args = Namespace(
            input_folder=str(checkpoint), output_folder=str(partial), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=False,
        )  # fmt: skip
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal.main(args)
        except Exception as exc:  # noqa: BLE001 - any converter failure means the checkpoint cannot be re-split
            raise UserError(
                f"could not convert {checkpoint} to a universal checkpoint for the new parallel layout: "
                f"{type(exc).__name__}: {exc}. Resume with the layout it was saved with ({saved_layout(checkpoint)})."
            ) from None
        partial.rename(target)
    barrier()
    return target
