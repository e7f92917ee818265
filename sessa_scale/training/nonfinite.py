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


def skip_update_if_nonfinite(engine, grad_norm: torch.Tensor) -> torch.Tensor | None:
    """Before the optimizer step, when the trainer computed the gradient norm itself (ZeRO stage 0;
    grad_norm: 0-dim tensor): make the torch optimizer's update a no-op when the norm is not finite,
    so that no parameter and no AdamW state changes (DeepSpeed still clears the gradients and advances
    the LR schedule). Returns the 0-dim bool "not finite" tensor, or None when the engine steps one of
    DeepSpeed's own optimizers (those skip non-finite steps themselves: engine.was_step_applied()).

    Fused AdamW (CUDA) gets it as `found_inf`, which its kernel reads to skip the update and undo the
    step count: no host sync. Other AdamW implementations (CPU) take no `found_inf`; there the check
    syncs (free on CPU) and the optimizer's next step() becomes a no-op."""
    optimizer = engine.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    nonfinite = ~torch.isfinite(grad_norm)
    if all(group.get("fused") for group in optimizer.param_groups):
        optimizer.found_inf = nonfinite.float()
    elif nonfinite:

        def skip(*_args, **_kwargs) -> None:
            del optimizer.step  # one step only: the class's step() is back for the next one

        optimizer.step = skip
    return nonfinite


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None  # metrics.jsonl stays valid JSON (no NaN/Infinity)


class NonFiniteSteps:
    """Counts consecutive non-finite steps against train.skip_nonfinite_steps (`allowed`)."""

    def __init__(self, allowed: int):
        self.allowed = allowed
        self.in_a_row = 0
        self.problem: str | None = None  # set when training must stop

    def check(self, step: int, loss: float, grad_norm: float, trainer_skipped, engine, scheduler) -> dict:
        """After the optimizer step of `step`: the metrics fields to log for it ({} for a finite step).
        trainer_skipped: what skip_update_if_nonfinite returned (None: not called). Sets `problem`
        when training must stop (call stop_if_needed after logging the record)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return {}
        skipped_by_deepspeed = not engine.was_step_applied()
        if skipped_by_deepspeed:  # its overflow path leaves the scheduler: keep lr a function of the step
            scheduler.step()
        dropped = bool(trainer_skipped) if trainer_skipped is not None else skipped_by_deepspeed
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
