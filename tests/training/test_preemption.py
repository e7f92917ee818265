"""Preemption and crash safety without SLURM (tests/launch/test_slurm.py covers the sbatch path): SIGTERM stops
a run after the current step with a checkpoint and exit status 75, and running again resumes the exact
loss sequence; Ctrl-C does the same, and a second Ctrl-C aborts at once; a signal that reaches only one of two torchrun ranks stops both at the same step; a
kill -9 in the middle of writing a checkpoint leaves `latest` on the previous one, which loads and
resumes exactly."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sessa_scale.cli import main
from tests.helpers.short_runs import SHORT_RUN, assert_same_losses, metrics

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses POSIX signals and /proc")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(autouse=True)
def one_thread():
    """The tests compare in-process runs with subprocess runs (OMP_NUM_THREADS=1) bit for bit, and the
    float summation order depends on the intra-op thread count: run the in-process side on one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def _start(launcher: list[str], run_dir: Path, *overrides: str, own_session: bool = False) -> subprocess.Popen:
    """own_session: the run leads a process group of its own (with its DataLoader workers), which
    os.killpg signals the way a terminal's Ctrl-C signals its foreground group."""
    return subprocess.Popen(
        [*launcher, "train", f"run.dir={run_dir}", *overrides],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=own_session,
    )


def _children(pid: int) -> list[int]:
    """Live child processes of `pid` (Linux /proc)."""
    children = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += map(int, (task / "children").read_text().split())
    return children


def _descendants(pid: int) -> list[int]:
    children = _children(pid)
    return children + [d for child in children for d in _descendants(child)]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the run and every process under it (torchrun workers live in sessions of their own)."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for the run to exit; returns its output. A hung run (and its workers) is killed."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        pytest.fail(f"the run did not exit within {timeout} s; output:\n{proc.communicate(timeout=30)[0]}")


def _wait_until(proc: subprocess.Popen, condition, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            _kill_tree(proc)
            pytest.fail(f"the run ended or stalled before the condition held; output:\n{proc.communicate(timeout=30)[0]}")
        time.sleep(0.002)


def test_sigterm_checkpoints_exits_75_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
    handler_before = signal.getsignal(signal.SIGTERM)
    assert main(["train", f"run.dir={tmp_path / 'straight'}", *SHORT_RUN, "train.max_steps=30"]) == 0
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the trainer restores the handlers

    run = tmp_path / "stopped"
    proc = _start([sys.executable, "-m", "sessa_scale"], run, *SHORT_RUN, "train.max_steps=30", own_session=True)
    _wait_until(proc, lambda: len(metrics(run)) >= 3)
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM's time limit or `timeout`: the DataLoader workers get it too
    out = _finish(proc)
    assert proc.returncode == 75, out
    step = len(metrics(run))
    assert 3 <= step < 30 and f"stopped early: SIGTERM received at step {step}/30" in out
    assert _latest(run) == f"step_{step:08d}"

    assert main(["train", f"run.dir={run}", *SHORT_RUN, "train.max_steps=30"]) == 0  # resume=auto
    assert_same_losses(metrics(tmp_path / "straight"), metrics(run))


def test_a_second_ctrl_c_aborts_at_once_and_one_ctrl_c_checkpoints_after_the_step(tmp_path):
    """Ctrl-C is SIGINT to the whole process group (DataLoader workers included): two abort at once
    (status 130) with `latest` on the previous checkpoint; the same command resumes from it, and one
    Ctrl-C then behaves like SIGTERM: the step finishes, a checkpoint is written, status 75."""
    from sessa_scale.checkpoint import find_checkpoint

    run = tmp_path / "run"
    slow = ["model.d_model=128", "model.n_layers=2", "data.seq_len=64", "train.micro_batch_size=8"]  # steps of ~50 ms or more
    args = [*SHORT_RUN, *slow, "checkpoint.interval=2", "train.max_steps=400", "logging.progress=false"]
    python = [sys.executable, "-m", "sessa_scale"]
    proc = _start(python, run, *args, own_session=True)
    _wait_until(proc, lambda: len(metrics(run)) >= 3)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    out = _finish(proc)
    assert proc.returncode == 130, out
    latest = run / "checkpoints" / _latest(run)
    assert "aborted by a second Ctrl-C without saving; the last complete checkpoint is" in out and str(latest) in out
    assert "Traceback" not in out and find_checkpoint(run) == latest  # complete and loadable
    logged = len(metrics(run))

    proc = _start(python, run, *args, own_session=True)  # resumes from `latest`
    _wait_until(proc, lambda: len(metrics(run)) > logged)
    os.killpg(proc.pid, signal.SIGINT)
    out = _finish(proc)
    assert proc.returncode == 75, out
    step = len(metrics(run))
    assert out.count("Ctrl-C: finishing the current step, then saving a checkpoint and stopping") == 1  # not the workers
    assert f"stopped early: SIGINT received at step {step}/400" in out and "run the same command again" in out
    assert _latest(run) == f"step_{step:08d}" and "Traceback" not in out
    assert [r["step"] for r in metrics(run)] == list(range(1, step + 1))


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """{RANK: pid} of the torchrun workers: the launcher's children (their DataLoader workers, one level
    down, inherit RANK too)."""
    workers = {}
    for pid in _children(launcher_pid):
        env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        if "RANK" in env:
            workers[int(env["RANK"])] = pid
    return workers


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "sessa_scale"]
    proc = _start(torchrun, run, *SHORT_RUN, "train.max_steps=40", "logging.progress=false")
    _wait_until(proc, lambda: len(metrics(run)) >= 3)
    workers = _worker_pids(proc.pid)
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGUSR1)  # rank 1 only
    out = _finish(proc)
    step = len(metrics(run))
    assert 3 <= step < 40
    assert f"stopped early: a preemption signal reached another rank at step {step}/40" in out  # rank 0's view
    assert "exitcode  : 75" in out  # torchrun reports both workers' status
    checkpoint = run / "checkpoints" / _latest(run)
    assert checkpoint.name == f"step_{step:08d}"
    assert {"meta.json", "rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in checkpoint.iterdir()}


def test_kill_9_during_a_checkpoint_write_leaves_latest_loadable(tmp_path):
    # ~10M parameters: a ~110 MB checkpoint whose write takes long enough to be interrupted.
    big = ["model.d_model=512", "model.n_layers=4", "data.seq_len=16", "train.micro_batch_size=1"]
    args = [*SHORT_RUN, *big, "checkpoint.interval=2", "train.max_steps=4", "logging.progress=false"]
    run = tmp_path / "run"
    writing = run / "checkpoints" / "step_00000004.partial" / "mp_rank_00_model_states.pt"
    proc = _start([sys.executable, "-m", "sessa_scale"], run, *args)
    _wait_until(proc, writing.exists)
    proc.send_signal(signal.SIGKILL)
    _finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert writing.parent.is_dir() and not (run / "checkpoints" / "step_00000004").exists()  # killed mid-save
    assert _latest(run) == "step_00000002"
    before = metrics(run)
    assert [r["step"] for r in before] == [1, 2, 3, 4]  # steps 3, 4 were logged before the save began

    assert main(["train", f"run.dir={run}", *args]) == 0  # resumes from step 2: loads the previous checkpoint
    assert_same_losses(before, metrics(run))
    assert _latest(run) == "step_00000004" and not writing.parent.exists()
