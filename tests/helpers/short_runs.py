"""Shared by the preemption, SLURM and GPU trainer tests: overrides for short CPU training runs of the tiny config,
`sessa-scale train` started in a subprocess, and reading / comparing runs' metrics."""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers import repo_first_pythonpath

SHORT_RUN = [
    "data.seq_len=32",
    "data.corpus_bytes=300000",
    "train.micro_batch_size=4",
    "train.eval_interval=0",
    "optim.warmup_steps=5",
    "optim.decay_steps=40",  # fixed schedule length, so a run can be extended
    "checkpoint.interval=0",  # only the final and the preemption checkpoints
]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_same_losses(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert (x["loss"], x["lr"], x["tokens"], x["grad_norm"]) == (y["loss"], y["lr"], y["tokens"], y["grad_norm"])


def single_process_env(**extra: str) -> dict:
    """os.environ for a subprocess that starts its own one-process group: without the rendezvous
    variables (RANK, MASTER_PORT, ...) that an earlier in-process training run left behind."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def start_cli_train(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """`python -m sessa_scale train OVERRIDES run.dir=RUN_DIR` in a fresh process (this checkout first on
    PYTHONPATH, its own one-process group); finish_cli_train waits for it.  Its output goes to a log file
    beside RUN_DIR, not a pipe (a child never blocks on output the test has not read yet), and
    PYTHONFAULTHANDLER is set, so that a child still running at finish_cli_train's time limit prints
    every thread's Python stack when it is aborted."""
    args = [sys.executable, "-m", "sessa_scale", "train", *overrides, f"run.dir={run_dir}"]
    env = single_process_env(PYTHONPATH=repo_first_pythonpath(), PYTHONFAULTHANDLER="1")
    fd, log = tempfile.mkstemp(dir=run_dir.parent, prefix=f"{run_dir.name}-", suffix=".log")
    with os.fdopen(fd, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=run_dir.parent)
    proc.log_path = Path(log)
    return proc


def finish_cli_train(proc: subprocess.Popen, timeout: float = 150.0) -> str:
    """The output of a start_cli_train run, asserting it exited 0 within `timeout` seconds of this call
    (its last 3,000 characters otherwise).  A run still going then is aborted (SIGABRT: its Python
    stacks go to its output) and the assertion shows them."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out = proc.log_path.read_text(errors="replace")
        stacks = out.find("Fatal Python error")  # faulthandler's dump; worker processes may print after it
        stacks = len(out) if stacks < 0 else stacks
        raise AssertionError(f"`sessa-scale train` still running after {timeout:.0f} s; its output before the abort, "
                             f"then its Python stacks:\n{out[:stacks][-2000:]}\n{out[stacks:][:6000]}") from None
    out = proc.log_path.read_text(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    return out
