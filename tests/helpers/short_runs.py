"""Shared by the preemption and SLURM tests: overrides for short CPU training runs of the tiny config,
and reading / comparing their metrics."""

import json
from pathlib import Path

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
    import os

    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}
