"""`sbatch launch/pretrain.sh` on a real SLURM cluster, 2 CPU tasks: a job trains and checkpoints, a
resubmission resumes from that checkpoint, and a job sent SIGUSR1 mid-run checkpoints, requeues itself
and finishes with exactly the losses of an uninterrupted run.

Needs a cluster: CI starts a one-node cluster on localhost with launch/slurm_localhost.sh. Without one
these tests skip, except under CI=true, where a missing cluster is a failure."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT as REPO
from tests.helpers.short_runs import SHORT_RUN, assert_same_losses, metrics
SCRIPT = REPO / "launch" / "pretrain.sh"
CONFIG = REPO / "configs" / "sessa" / "tiny.yaml"
STEPS = 30
OVERRIDES = [f"train.max_steps={STEPS}", *SHORT_RUN]
# 2 tasks on CPU, no GPUs; the time limit stays well above the script's --signal=USR1@600 warning.
SBATCH = ["--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not installed"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if result.returncode != 0:
        return f"sinfo failed: {result.stderr.strip()}"
    if not set(result.stdout.split()) & {"idle", "mix", "alloc", "comp"}:
        return f"no node is up (sinfo states: {' '.join(result.stdout.split()) or 'none'})"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        message = f"no SLURM cluster reachable ({problem}); `sudo launch/slurm_localhost.sh` starts one on localhost"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def _submit(cwd: Path, run_dir: Path, *overrides: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SESSA_PYTHON": sys.executable}
    result = subprocess.run(
        ["sbatch", *SBATCH, str(SCRIPT), str(CONFIG), f"run.dir={run_dir}", *OVERRIDES, *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def _job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return {key: re.search(rf"\b{key}=(\S+)", out).group(1) for key in ("JobState", "Restarts", "ExitCode")}


def _log(cwd: Path, job_id: str) -> str:
    path = cwd / f"sessa-pretrain-{job_id}.out"
    return path.read_text() if path.exists() else "(no log yet)"


def _wait(cwd: Path, job_id: str, until=None, timeout: float = 600) -> dict:
    """Poll until the job reaches a final state (or `until()` holds); returns _job()."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _job(job_id)
        if info["JobState"] in FINAL_STATES or (until is not None and until()):
            return info
        time.sleep(0.1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} did not get there in {timeout} s ({_job(job_id)}); log:\n{_log(cwd, job_id)}")


def _completed(cwd: Path, job_id: str, info: dict) -> None:
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}; log:\n{_log(cwd, job_id)}"


@pytest.fixture(scope="module")
def straight(cluster, tmp_path_factory):
    """An uninterrupted STEPS-step job: (submission dir, run dir, job id, its metrics)."""
    cwd = tmp_path_factory.mktemp("slurm")
    run_dir = cwd / "straight"
    job_id = _submit(cwd, run_dir)
    _completed(cwd, job_id, _wait(cwd, job_id))
    return cwd, run_dir, job_id, metrics(run_dir)


def test_job_trains_on_two_tasks_and_writes_a_checkpoint(straight):
    cwd, run_dir, job_id, records = straight
    log = _log(cwd, job_id)
    assert "2 rank(s) on cpu" in log and ", 2 tasks, rendezvous " in log
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["loss"] < records[0]["loss"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    saved = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert {"meta.json", "rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in saved.iterdir()}


def test_resubmitted_job_resumes_from_the_run_directory(straight):
    cwd, run_dir, _, before = straight
    job_id = _submit(cwd, run_dir, f"train.max_steps={STEPS + 3}")
    _completed(cwd, job_id, _wait(cwd, job_id))
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{STEPS:08d}'} at step {STEPS}" in _log(cwd, job_id)
    after = metrics(run_dir)
    assert after[:STEPS] == before and [r["step"] for r in after[STEPS:]] == [STEPS + 1, STEPS + 2, STEPS + 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS + 3:08d}"


def test_usr1_checkpoints_requeues_and_matches_the_uninterrupted_run(straight):
    cwd, _, _, expected = straight
    run_dir = cwd / "preempted"
    job_id = _submit(cwd, run_dir)
    _wait(cwd, job_id, until=lambda: len(metrics(run_dir)) >= 3)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    info = _wait(cwd, job_id)
    _completed(cwd, job_id, info)
    log = _log(cwd, job_id)
    stopped = re.search(r"stopped early: SIGUSR1 received at step (\d+)/", log)
    assert stopped and int(stopped.group(1)) < STEPS, log
    assert f"requeueing job {job_id}" in log and info["Restarts"] == "1"
    assert f"at step {stopped.group(1)}" in log.split(f"job {job_id} (restart 1)")[1]  # resumed there
    assert [r["step"] for r in expected] == list(range(1, STEPS + 1))
    assert_same_losses(expected, metrics(run_dir))
