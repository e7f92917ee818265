"""Steps whose loss or gradient is not finite (NaN/inf): skip a few, then stop cleanly.

A step with a non-finite gradient norm does not update the model: at ZeRO stage 0 the trainer skips
the torch optimizer's step (`skip_update_if_nonfinite`: parameters and AdamW moments untouched), and
DeepSpeed's ZeRO optimizers skip such a step themselves (seen at stages 1 and 3 in fp32). Its data is
consumed and the LR schedule advances as for any step, so the learning rate stays a function of the
step. Up to train.skip_nonfinite_steps non-finite steps in a row are tolerated (each logged with
"skipped" and null for the non-finite values); one more, or a non-finite update that an optimizer
applied, stops training without a checkpoint: `latest` stays on the last good one.
"""

from __future__ import annotations

import math

import torch

from sessa_scale.errors import UserError


class TrainingDiverged(UserError):
    """Training produced non-finite losses or gradients beyond what train.skip_nonfinite_steps allows."""

    exit_code = 3


def skip_update_if_nonfinite(engine, grad_norm: float) -> bool:
    """Before the optimizer step, when the trainer computed grad_norm itself (ZeRO stage 0): if it is
    not finite and the engine steps a plain torch optimizer, make that optimizer's next step() a no-op,
    so that no parameter and no optimizer state changes (DeepSpeed still clips and clears the gradients
    and advances the LR schedule). True if the update will be skipped. DeepSpeed's own optimizers
    (ZeRO, bf16) skip non-finite steps themselves (engine.was_step_applied() tells)."""
    optimizer = engine.optimizer
    if math.isfinite(grad_norm) or not isinstance(optimizer, torch.optim.Optimizer):
        return False

    def skip(*_args, **_kwargs) -> None:
        del optimizer.step  # one step only: the class's step() is back for the next one

    optimizer.step = skip
    return True


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None  # metrics.jsonl stays valid JSON (no NaN/Infinity)


class NonFiniteSteps:
    """Counts consecutive non-finite steps against train.skip_nonfinite_steps (`allowed`)."""

    def __init__(self, allowed: int):
        self.allowed = allowed
        self.in_a_row = 0
        self.problem: str | None = None  # set when training must stop

    def check(self, step: int, loss: float, grad_norm: float, update_dropped: bool, engine, scheduler) -> dict:
        """After the optimizer step of `step`: the metrics fields to log for it ({} for a finite step).
        update_dropped: the trainer skipped the update (skip_update_if_nonfinite). Sets
        `problem` when training must stop (call stop_if_needed after logging the record)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return {}
        skipped_by_deepspeed = not engine.was_step_applied()
        if skipped_by_deepspeed:  # its overflow path leaves the scheduler: keep lr a function of the step
            scheduler.step()
        dropped = update_dropped or skipped_by_deepspeed
        self.in_a_row += 1
        what = f"step {step}: the loss is {loss} and the gradient norm {grad_norm}"
        if not dropped and not math.isfinite(grad_norm):
            self.problem = f"{what}, and this optimizer applied the update, so the weights are no longer finite"
        elif self.in_a_row > self.allowed:
            allowed = f"train.skip_nonfinite_steps={self.allowed}"
            self.problem = f"{what} ({self.in_a_row} such step(s) in a row, more than {allowed})"
        return {"loss": _number(loss), "grad_norm": _number(grad_norm), "skipped": dropped}

    def stop_if_needed(self, checkpoints) -> None:
        """Raise TrainingDiverged when check() decided that training must stop (checkpoints: the
        run's CheckpointManager, which names the last good checkpoint)."""
        if self.problem is None:
            return
        last_good_checkpoint = checkpoints.latest()
        kept = (
            f"the last good checkpoint {last_good_checkpoint} stays `latest`; run the same command again to resume "
            "from it"
            if last_good_checkpoint is not None
            else "no checkpoint was saved yet"
        )
        raise TrainingDiverged(
            f"training stopped: {self.problem}. Nothing was saved after the problem: {kept}. Lower optim.lr or "
            "raise optim.warmup_steps, check the data around this step, or raise train.skip_nonfinite_steps to skip "
            "more such steps."
        )
