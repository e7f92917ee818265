"""Nothing lost, nothing silent: a deleted or corrupt `latest` resumes from the newest complete
checkpoint (and says so), no fresh start overwrites a run, every config change on resume is printed
and applied or refused, file-system faults end in one paragraph with the previous checkpoint intact,
and NaN/inf steps are skipped or stop training with `latest` on the last good checkpoint."""

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sessa_scale.cli import main
from tests.helpers.short_runs import SHORT_RUN

# SHORT_RUN's schedule has a fixed length (optim.decay_steps=40): runs of different max_steps share it
SMALL = [*SHORT_RUN, "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "optim.warmup_steps=2",
         "checkpoint.interval=2", "logging.progress=false"]  # fmt: skip
SCHEDULE_OF_MAX_STEPS = "optim.decay_steps=null"  # the schedule's length is train.max_steps


def _train(capsys, run_dir, *overrides) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["train", f"run.dir={run_dir}", *SMALL, *overrides])
    return rc, capsys.readouterr().err


def _metrics(run_dir) -> list[dict]:
    def no_nan(name):
        raise AssertionError(f"metrics.jsonl holds {name}, which is not JSON")

    return [json.loads(line, parse_constant=no_nan) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _state(run_dir: Path) -> tuple[str, list[str]]:
    """What a refused command must leave alone: metrics.jsonl and the checkpoint directories."""
    return (run_dir / "metrics.jsonl").read_text(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _model_states(run_dir: Path, step: int) -> dict:
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False)["module"]


def test_a_deleted_or_corrupt_latest_never_restarts_or_overwrites_the_run(tmp_path, capsys):
    """The issue's reproduction: `latest` deleted, then naming a truncated checkpoint, then no complete
    checkpoint left; train.resume=none and auto must never start the run over."""
    run = tmp_path / "run"
    assert _train(capsys, run, "train.max_steps=6")[0] == 0
    first = _metrics(run)
    (run / "checkpoints" / "latest").unlink()

    rc, err = _train(capsys, run, "train.max_steps=8", "train.resume=none")  # a fresh start is refused
    assert rc == 2 and "holds metrics.jsonl with 6 record(s) and 3 checkpoint directory(ies)" in err
    state = _state(run)

    rc, err = _train(capsys, run, "train.max_steps=8")  # resume=auto scans for the newest complete checkpoint
    assert rc == 0 and "latest is missing; using the newest complete checkpoint found by scanning, step_00000006" in err
    resumed = _metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 9)) and resumed[:6] == first

    weights = run / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:4096])  # `latest` now names a truncated checkpoint
    rc, err = _train(capsys, run, "train.max_steps=10")
    assert rc == 0 and "names step_00000008, which is incomplete (mp_rank_00_model_states.pt has 4,096 bytes" in err
    assert "using the newest complete checkpoint found by scanning, step_00000006" in err
    again = _metrics(run)
    assert [r["step"] for r in again] == list(range(1, 11))
    assert [r["loss"] for r in again[:8]] == [r["loss"] for r in resumed]  # steps 7-8 redone exactly

    for checkpoint in (run / "checkpoints").glob("step_*"):
        (checkpoint / "meta.json").unlink()  # nothing complete is left: refuse, change nothing
    state = _state(run)
    rc, err = _train(capsys, run, "train.max_steps=12")
    assert rc == 2 and "but nothing to resume" in err and "no complete checkpoint was found" in err
    assert _state(run) == state


def _lr(k: int, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    """Reference warmup + cosine schedule: the learning rate of step k + 1 (k steps done)."""
    if k < warmup:
        return lr * (k + 1) / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (k - warmup) / (decay - warmup)))


CHANGED = (SCHEDULE_OF_MAX_STEPS, "train.max_steps=8", "optim.lr=1e-3", "train.micro_batch_size=8", "optim.beta2=0.99")


def test_resume_prints_every_config_change_and_applies_or_refuses_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(capsys, run, SCHEDULE_OF_MAX_STEPS, "train.max_steps=4", "optim.lr=2e-3")[0] == 0
    state = _state(run)

    rc, err = _train(capsys, run, SCHEDULE_OF_MAX_STEPS, "train.max_steps=4", "optim.lr=2e-3", "model.d_model=64")
    assert rc == 2 and "model.d_model: checkpoint 32, now 64" in err and _state(run) == state
    rc, err = _train(capsys, run, SCHEDULE_OF_MAX_STEPS, "train.max_steps=4", "optim.lr=2e-3", "run.seed=7")
    assert rc == 2 and "run.seed" in err and _state(run) == state

    rc, err = _train(capsys, run, *CHANGED)
    assert rc == 0
    for line in (
        "optim.lr: 0.002 -> 0.001",
        "optim.beta2: 0.95 -> 0.99",
        "train.max_steps: 4 -> 8",
        "train.micro_batch_size: 4 -> 8",
        "=> learning-rate schedule (optim.lr, train.max_steps): applied from step 5",
        "=> AdamW (optim.beta2): applied from step 5",
        "=> batch (train.micro_batch_size): global batch 4 -> 8 sequences per step",
    ):
        assert line in err, line
    records = _metrics(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records[4:]:  # the new schedule, as if configured so from the start (min_lr default 2e-4)
        assert r["lr"] == pytest.approx(_lr(r["step"] - 1, 1e-3, 2e-4, 2, 8), rel=1e-12)
    assert [r["tokens"] for r in records[3:6]] == [512, 768, 1024]  # 4 x 32, then 8 x 32 tokens per step

    rc, err = _train(capsys, run, *CHANGED)
    assert rc == 0 and "already complete: the run is at step 8/8" in err and "None" not in err


def test_file_system_faults_are_one_paragraph_and_keep_the_previous_checkpoint(tmp_path, capsys):
    rc, err = _train(capsys, "/proc/nope", "train.max_steps=2")
    assert rc == 2 and "cannot create run.dir /proc/nope (in /proc): no such file or directory (ENOENT)" in err

    (tmp_path / "doc.txt").write_text("some text\n")
    capsys.readouterr()
    assert main(["prep", str(tmp_path / "doc.txt"), "--out", "/proc/nope/data", "--no-progress"]) == 2
    assert "the directory of --out /proc/nope/data (in /proc): no such file or directory" in capsys.readouterr().err


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)]
    return os.geteuid() == 0 and shutil.which("mount") and subprocess.run(cmd, capture_output=True).returncode == 0


def _remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (needs root and a mount-capable container; skipped otherwise)."""
    where = tmp_path / "tmpfs"
    if not _mount_tmpfs(where, "size=64m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_during_a_save_and_a_read_only_run_dir(tmpfs, capsys):
    """A real full file system (tmpfs) during a checkpoint write, then the same mount read-only."""
    run = tmpfs / "run"
    assert _train(capsys, run, "train.max_steps=2")[0] == 0
    checkpoint_bytes = sum(p.stat().st_size for p in (run / "checkpoints" / "step_00000002").iterdir())
    used = shutil.disk_usage(tmpfs).used
    _remount(tmpfs, f"size={(used + checkpoint_bytes // 2) // 4096 * 4096 + 4096}")  # room for half a checkpoint

    rc, err = _train(capsys, run, "train.max_steps=4")
    assert rc == 2 and "Traceback" not in err
    assert "cannot write checkpoint" in err and "step_00000004: no space left on the device" in err
    assert "The partial checkpoint was removed. The previous checkpoint" in err and "step_00000002 is intact" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"

    _remount(tmpfs, "ro")
    rc, err = _train(capsys, run, "train.max_steps=4")
    assert rc == 2 and f"cannot write to run.dir {run}: the file system is read-only (EROFS)" in err

    _remount(tmpfs, "rw,size=64m")
    assert _train(capsys, run, "train.max_steps=4")[0] == 0  # the same command resumes from step 2
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]


def _poison_loss(monkeypatch, calls_to_poison: set[int]) -> None:
    """Fault injection: the training loss of the given forward calls (1-based; one per step here)
    becomes NaN, as a diverging run's would."""
    from sessa_scale.training import trainer

    real, calls = trainer.lm_loss, []

    def poisoned(model, inputs, targets):
        calls.append(1)
        loss = real(model, inputs, targets)
        return loss * float("nan") if len(calls) in calls_to_poison else loss

    monkeypatch.setattr(trainer, "lm_loss", poisoned)


def test_a_nan_loss_stops_with_the_step_and_keeps_latest_on_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _poison_loss(monkeypatch, {3})
    rc, err = _train(capsys, run, "train.max_steps=8")
    assert rc == 3 and "Traceback" not in err
    assert "training stopped: step 3: the loss is nan and the gradient norm nan" in err
    assert "the last good checkpoint" in err and "step_00000002 stays `latest`" in err
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    records = _metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3] and (records[2]["loss"], records[2]["skipped"]) == (None, True)


@pytest.mark.parametrize("stage, fused", [(0, False), (0, True), (1, False)])
def test_skip_nonfinite_steps_drops_the_update_and_continues(tmp_path, capsys, monkeypatch, stage, fused):
    """train.skip_nonfinite_steps=1: NaN steps 3 and 6 change no weight (step 3's checkpoint equals
    step 2's) and the schedule goes on. At ZeRO stage 0 the trainer skips the update: fused AdamW (what
    CUDA runs use; forced here on CPU, where torch has the kernel too) through `found_inf`, without a
    host sync, the default CPU AdamW by a no-op step; at stage 1 DeepSpeed skips it."""
    run = tmp_path / "run"
    _poison_loss(monkeypatch, {3, 6})
    if fused:
        from sessa_scale.training import optimizer

        monkeypatch.setattr(optimizer, "adamw_implementation", lambda params: {"fused": True})
    rc, err = _train(
        capsys, run, SCHEDULE_OF_MAX_STEPS, "train.max_steps=8", "train.skip_nonfinite_steps=1", "checkpoint.interval=1",
        "checkpoint.keep=8", f"zero.stage={stage}",
    )
    assert rc == 0, err
    records = _metrics(run)
    assert [r["step"] for r in records if r.get("skipped")] == [3, 6]
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in records if not r.get("skipped"))
    before, after = _model_states(run, 2), _model_states(run, 3)
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(before[k], v) for k, v in _model_states(run, 4).items())
    for r in records:  # lr stays the schedule's value of the step (warmup 2, decay over 8 steps)
        assert r["lr"] == pytest.approx(_lr(r["step"] - 1, 2e-3, 2e-4, 2, 8), rel=1e-12)


def test_zero_stage_3_prints_no_deprecation_warning_per_step(tmp_path, capsys):
    """DeepSpeed's ZeRO-3 calls torch.distributed functions torch deprecates; torch warned on every step."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _train(capsys, tmp_path / "run", "zero.stage=3", "train.max_steps=2")[0] == 0
    assert not [str(w.message) for w in caught if "is deprecated" in str(w.message)]
