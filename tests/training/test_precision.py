"""Compute precision inside the DeepSpeed engine (`train.precision`), the trainer's own gradient
clipping, and GPU checks of the user's path: bf16 inside the engine during real steps, every
architecture trained and resumed through the CLI, and train.deterministic resuming bitwise.

CPU: the DeepSpeed config the trainer builds for each precision is pinned, the clipping matches
torch.nn.utils.clip_grad_norm_, and a probe inside nn.Linear sees the configured dtype during real
training steps. GPU (`-m gpu`): the same probe on CUDA (where an outer torch.autocast was silently
disabled by the engine), the feedback solve's input dtype, and CLI runs.
"""

import subprocess
from pathlib import Path

import pytest
import torch

from sessa_scale.config import load_config
from sessa_scale.training import trainer
from sessa_scale.training.precision import autocast, compute_dtype, deepspeed_precision_config
from tests.helpers.short_runs import finish_cli_train, metrics, start_cli_train
BF16_SECTION = {"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}


@pytest.mark.parametrize(
    "precision,device,section",
    [("bf16", "cpu", BF16_SECTION), ("bf16", "cuda", BF16_SECTION), ("auto", "cuda", BF16_SECTION),
     ("auto", "cpu", {}), ("fp32", "cuda", {}), ("fp32", "cpu", {})],
)  # fmt: skip
def test_deepspeed_config_pins_the_precision_section(precision, device, section):
    cfg = load_config(None, [f"train.precision={precision}", "train.micro_batch_size=4", "train.grad_accum_steps=3"])
    ds = trainer.deepspeed_config(cfg, dp_size=2, device=torch.device(device))
    assert {k: ds[k] for k in ("torch_autocast", "bf16", "fp16") if k in ds} == section
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 3, 24)
    assert ds["gradient_clipping"] == 0.0  # stage 0: the trainer clips (clip_gradients)
    assert compute_dtype(precision, device) == (torch.bfloat16 if section else torch.float32)


def test_zero_stages_clip_inside_deepspeed():
    cfg = load_config(None, ["zero.stage=2", "optim.grad_clip=0.5"])
    assert trainer.deepspeed_config(cfg, 1, torch.device("cpu"))["gradient_clipping"] == 0.5


def test_outside_the_engine_autocast_follows_the_same_rule():
    with autocast("bf16", "cpu"):
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16
    with autocast("auto", "cpu"):
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float32
    assert deepspeed_precision_config("fp32", "cuda") == {}


@pytest.mark.parametrize("max_norm", [0.05, 100.0, 0.0])
def test_clip_gradients_matches_torch(max_norm):
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(4, 7)
    for m in models:
        m(x).square().sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(models[0].parameters(), max_norm if max_norm > 0 else float("inf"))
    norm = trainer.clip_gradients(models[1], max_norm, tp_group=None)
    assert norm.dtype == torch.float32 and norm.dim() == 0
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


class LinearProbe:
    """Records (input dtype, output dtype, autocast on) of every nn.Linear forward while active."""

    def __init__(self):
        self.seen = []

    def __enter__(self):
        def hook(module, args, output):
            if isinstance(module, torch.nn.Linear) and module.training:
                device_type = output.device.type
                self.seen.append((args[0].dtype, output.dtype, torch.is_autocast_enabled(device_type)))

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _probe_training(tmp_path, arch: str, precision: str, extra=()):
    cfg = load_config(None, [
        f"model.arch={arch}", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "data.seq_len=64",
        "data.corpus_bytes=200000", "train.micro_batch_size=2", "train.max_steps=2", "train.eval_interval=0",
        f"train.precision={precision}", "logging.progress=false", f"run.dir={tmp_path / arch}", *extra,
    ])  # fmt: skip
    with LinearProbe() as probe:
        trainer.train(cfg)
    return probe.seen


@pytest.mark.parametrize("precision,expected", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_engine_computes_in_the_configured_precision(tmp_path, precision, expected):
    seen = _probe_training(tmp_path, "sessa", precision)
    assert seen and {out for _, out, _ in seen} == {expected}
    assert {on for _, _, on in seen} == {expected == torch.bfloat16}


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ARCHS = ["sessa", "transformer", "mamba2"]


@gpu
@needs_cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_engine_trains_in_bf16(tmp_path, monkeypatch, arch):
    """During real steps on CUDA (DeepSpeed engine, train.precision=bf16): every nn.Linear computes in
    bf16 under autocast, and Sessa's feedback solve receives bf16 inputs."""
    from sessa_scale.models import sessa

    solve_dtypes = []
    real_solve = sessa.feedback_solve

    def recording_solve(q, k, gamma, f, **kw):
        solve_dtypes.append((q.dtype, f.dtype))
        return real_solve(q, k, gamma, f, **kw)

    monkeypatch.setattr(sessa, "feedback_solve", recording_solve)
    seen = _probe_training(tmp_path, arch, "bf16")
    assert seen and {(out, on) for _, out, on in seen} == {(torch.bfloat16, True)}
    if arch == "sessa":
        assert solve_dtypes and set(solve_dtypes) == {(torch.bfloat16, torch.bfloat16)}


def _cli_train(run_dir: Path, arch: str, steps: int, interval: int) -> subprocess.Popen:
    return start_cli_train(run_dir, [
        f"model.arch={arch}", "model.d_model=256", "model.n_layers=4", "model.n_heads=4", "data.seq_len=256",
        "data.corpus_bytes=2000000", "train.micro_batch_size=8", f"train.max_steps={steps}", "optim.decay_steps=40",
        "optim.warmup_steps=5", "train.eval_interval=0", f"checkpoint.interval={interval}", "train.precision=bf16",
        "train.deterministic=true", "logging.progress=true",
    ])  # fmt: skip


@gpu
@needs_cuda
def test_gpu_cli_train_resume_is_bitwise_under_deterministic(tmp_path):
    """Each architecture through `sessa-scale train` on the GPU (bf16, train.deterministic=true):
    Sessa 20 + 20 resumed steps == 40 straight steps bitwise; Transformer and Mamba-2 5 + 5 == 10."""
    steps = {"sessa": 40, "transformer": 10, "mamba2": 10}
    straight = {a: _cli_train(tmp_path / f"{a}-straight", a, n, 0) for a, n in steps.items()}
    first = {a: _cli_train(tmp_path / f"{a}-split", a, n // 2, 0) for a, n in steps.items()}
    for proc in [*straight.values(), *first.values()]:
        finish_cli_train(proc)
    resumed = {a: _cli_train(tmp_path / f"{a}-split", a, n, 0) for a, n in steps.items()}
    for arch, proc in resumed.items():
        out = finish_cli_train(proc)
        assert "resumed from" in out, out[-2000:]
        a, b = metrics(tmp_path / f"{arch}-straight"), metrics(tmp_path / f"{arch}-split")
        assert [r["step"] for r in b] == list(range(1, steps[arch] + 1))
        assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b], arch
        assert a[-1]["loss"] < a[0]["loss"] and a[-1]["mfu"] is not None
