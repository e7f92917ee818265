"""End-to-end training through the CLI entry point: metrics, resume exactness, accumulation,
generation, and user errors."""

import json
import subprocess
import sys

import pytest

from sessa_scale.cli import main

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


def _model_keys(run_dir, step: int) -> list[str]:
    import torch

    states = torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt", weights_only=False)
    return sorted(states["module"])


@pytest.mark.slow
def test_train_compile_trains_checkpoints_and_resumes_like_eager(tmp_path):
    """train.compile=true: losses close to the eager run's, checkpoints with the eager state-dict keys
    (nn.Module.compile in place, no _orig_mod. prefix), and an eager run resumes from them."""
    eager = _train(tmp_path / "eager", "train.max_steps=4", "checkpoint.interval=2")
    compiled = _train(tmp_path / "compiled", "train.max_steps=2", "train.compile=true")
    assert _model_keys(tmp_path / "compiled", 2) == _model_keys(tmp_path / "eager", 2)
    assert not any("_orig_mod" in k for k in _model_keys(tmp_path / "compiled", 2))
    resumed = _train(tmp_path / "compiled", "train.max_steps=4", "train.resume=auto")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(eager, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert [r["loss"] for r in compiled] == [r["loss"] for r in resumed[:2]]
    assert eager[-1]["val_loss"] == pytest.approx(resumed[-1]["val_loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_fused_adamw_through_deepspeed_resumes_exactly(tmp_path, monkeypatch, stage):
    """Fused AdamW (what CUDA runs get) forced on CPU, where torch has a fused kernel too: DeepSpeed's
    engine (stage 0) and ZeRO-1's flat fp32 partitions step it, save it and resume it bit-exactly."""
    from sessa_scale.training import optimizer, trainer

    monkeypatch.setattr(optimizer, "adamw_implementation", lambda params: {"fused": True})
    built = []
    monkeypatch.setattr(trainer, "build_optimizer", lambda *a, **kw: built.append(optimizer.build_optimizer(*a, **kw)) or built[-1])
    common = (f"zero.stage={stage}", "train.eval_interval=0")
    straight = _train(tmp_path / "straight", "train.max_steps=6", "checkpoint.interval=3", *common)
    _train(tmp_path / "split", "train.max_steps=3", *common)
    resumed = _train(tmp_path / "split", "train.max_steps=6", "train.resume=auto", *common)
    assert len(built) == 3 and all(g["fused"] is True for opt in built for g in opt.param_groups)
    assert [(r["loss"], r["grad_norm"]) for r in straight] == [(r["loss"], r["grad_norm"]) for r in resumed]
    assert straight[-1]["loss"] < straight[0]["loss"]


def test_restore_implementation_undoes_a_checkpoint_of_another_adamw(monkeypatch):
    """Optimizer.load_state_dict takes the saved groups' fused/foreach flags; restore_implementation
    gives back this run's (fused here, as on CUDA) with step counters where the fused kernel wants them."""
    import torch

    from sessa_scale.config import OptimConfig
    from sessa_scale.training import optimizer

    model = torch.nn.Linear(4, 3)
    plain = optimizer.build_optimizer(model, OptimConfig())
    assert all(g["fused"] is None for g in plain.param_groups)  # CPU: torch's default implementation
    model(torch.ones(2, 4)).sum().backward()
    plain.step()
    monkeypatch.setattr(optimizer, "adamw_implementation", lambda params: {"fused": True})
    fused = optimizer.build_optimizer(model, OptimConfig())
    fused.load_state_dict(plain.state_dict())
    assert all(g["fused"] is None for g in fused.param_groups)
    optimizer.restore_implementation(fused)
    assert all(g["fused"] is True for g in fused.param_groups)
    assert all(s["step"].dtype == torch.float32 and s["step"].item() == 1 for s in fused.state.values())
    fused.step()
    assert all(s["step"].item() == 2 for s in fused.state.values())
