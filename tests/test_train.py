"""End-to-end training through the CLI entry point: metrics, resume exactness, accumulation,
generation, and user errors."""

import json
import os
import subprocess
import sys

import pytest

from sessa_scale.cli import main

os.environ.setdefault("DS_ACCELERATOR", "cpu")

SMALL = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "data.seq_len=32",
    "data.corpus_bytes=200000",
    "train.micro_batch_size=4",
    "train.eval_interval=10",
    "train.eval_batches=1",
    "optim.warmup_steps=5",
    "optim.decay_steps=30",
    "checkpoint.interval=5",
    "logging.progress=false",
]


def _train(run_dir, *overrides) -> list[dict]:
    assert main(["train", f"run.dir={run_dir}", *SMALL, *overrides]) == 0
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_the_exact_loss_sequence(tmp_path):
    straight = _train(tmp_path / "straight", "train.max_steps=30")
    _train(tmp_path / "split", "train.max_steps=15")
    resumed = _train(tmp_path / "split", "train.max_steps=30", "train.resume=auto")
    assert [r["step"] for r in resumed] == list(range(1, 31))
    for a, b in zip(straight, resumed):
        assert (a["loss"], a["lr"], a["tokens"], a["grad_norm"]) == (b["loss"], b["lr"], b["tokens"], b["grad_norm"])
    assert straight[-1]["val_loss"] == resumed[-1]["val_loss"]
    assert {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm"} <= set(straight[0])
    assert straight[-1]["loss"] < straight[0]["loss"]
    ckpts = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_00000020", "step_00000025", "step_00000030"]  # checkpoint.keep=3
    assert (tmp_path / "split" / "config.yaml").is_file()


def test_gradient_accumulation_matches_a_larger_micro_batch(tmp_path):
    big = _train(tmp_path / "big", "train.max_steps=4", "train.micro_batch_size=8")
    acc = _train(tmp_path / "acc", "train.max_steps=4", "train.grad_accum_steps=2")
    for a, b in zip(big, acc):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_generate_samples_from_a_trained_run(tmp_path, capsys):
    _train(tmp_path / "run", "train.max_steps=2")
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "import ", "--max-new-tokens", "12", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("import ")
    assert main(["generate", str(tmp_path / "run"), "--prompt", "import ", "--max-new-tokens", "12", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # seeded sampling is reproducible


def test_explicit_missing_checkpoint_is_an_error_not_a_fresh_start(tmp_path, capsys):
    rc = main(["train", f"run.dir={tmp_path / 'r'}", *SMALL, f"train.resume={tmp_path / 'missing'}"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "sessa_scale", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_user_errors_exit_2_with_one_paragraph_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 64\n  n_heads: 3\n  gamma_max: 1.5\noptim:\n  lr: -1\n")
    result = _cli("train", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for needle in ("bad.yaml", "d_modle", "d_model", "gamma_max", "optim.lr"):
        assert needle in result.stderr
    result = _cli("generate", str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "does not exist" in result.stderr
