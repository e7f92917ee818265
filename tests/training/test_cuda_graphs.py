"""`train.cuda_graphs` (sessa_scale/training/cuda_graphs.py): each block's forward and backward
replayed as CUDA graphs.

CPU: the settings it cannot be combined with are all reported at once, and on CPU the trainer runs
the blocks eagerly and says so. GPU (`-m gpu`): for every architecture, graphed blocks give the eager
blocks' losses and accumulated gradients over two micro-batches (the case where a graph's static
gradient adopted as param.grad would be overwritten), evaluation and other shapes run eagerly, and
`sessa-scale train` with graphs repeats the eager run's losses and resumes bitwise.
"""

import copy
from pathlib import Path

import pytest
import torch

from sessa_scale.config import load_config
from sessa_scale.errors import UserError
from sessa_scale.models.registry import build_model
from sessa_scale.training import trainer
from sessa_scale.training.cuda_graphs import capture_block_graphs
from sessa_scale.training.precision import autocast
from tests.helpers.short_runs import finish_cli_train, metrics, start_cli_train

ARCHS = ["sessa", "transformer", "mamba2"]


def test_every_setting_it_cannot_be_combined_with_is_reported_at_once():
    with pytest.raises(UserError) as err:
        load_config(None, ["train.cuda_graphs=true", "train.compile=true", "model.activation_checkpointing=true",
                           "zero.stage=2"])
    message = str(err.value)
    for key in ("train.compile", "model.activation_checkpointing", "zero.stage"):
        assert f"{key}:" in message and "train.cuda_graphs=true" in message, message
    load_config(None, ["train.cuda_graphs=true", "zero.stage=0"])  # allowed


def test_cpu_training_runs_the_blocks_eagerly_and_says_so(tmp_path, capsys):
    cfg = load_config(None, [
        "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.seq_len=16", "data.corpus_bytes=100000",
        "train.micro_batch_size=2", "train.max_steps=2", "train.eval_interval=0", "train.cuda_graphs=true",
        "checkpoint.save=false", f"run.dir={tmp_path / 'run'}",
    ])  # fmt: skip
    trainer.train(cfg)
    captured = capsys.readouterr()
    assert "train.cuda_graphs ignored (no CUDA device" in captured.out + captured.err
    assert len(metrics(tmp_path / "run")) == 2


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _tiny_model(arch: str, T: int):
    cfg = load_config(None, [f"model.arch={arch}", "model.d_model=128", "model.n_layers=3", "model.n_heads=2",
                             f"data.seq_len={T}"])
    torch.manual_seed(0)
    return build_model(cfg.model).cuda()


def _accumulate(model, batches) -> tuple[list[float], list[torch.Tensor]]:
    """Losses and the gradients accumulated over batches [(inputs, targets)] (bf16 autocast)."""
    model.zero_grad(set_to_none=True)
    losses = []
    for inputs, targets in batches:
        with autocast("bf16", "cuda"):
            loss = model(inputs, targets)
        loss.backward()
        losses.append(loss.item())
    return losses, [p.grad.clone() for p in model.parameters()]


@gpu
@needs_cuda
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("T", [65, 256])
def test_gpu_graphed_blocks_accumulate_the_eager_gradients(arch, T):
    eager = _tiny_model(arch, T)
    graphed = copy.deepcopy(eager)
    B, V = 2, eager.cfg.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randint(0, V, (B, T), device="cuda", generator=gen),
                torch.randint(0, V, (B, T), device="cuda", generator=gen)) for _ in range(2)]
    capture_block_graphs(graphed, batches[0][0], lambda: autocast("bf16", "cuda", cache=False))
    want_losses, want_grads = _accumulate(eager, batches)
    for _ in range(2):  # twice: the second accumulation starts from the graphs' state after the first
        losses, grads = _accumulate(graphed, batches)
        worst = max(((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item() for g, w in zip(grads, want_grads))
        print(f"{arch} T={T}: losses {losses} vs eager {want_losses}; worst relative gradient difference {worst:.2e}"
              f"; bitwise {all(torch.equal(g, w) for g, w in zip(grads, want_grads))}")
        assert losses == pytest.approx(want_losses, rel=1e-5)
        assert worst < 1e-4, worst
    # evaluation (eval mode, no gradients) and another shape run the blocks eagerly
    graphed.eval(), eager.eval()
    with torch.no_grad(), autocast("bf16", "cuda"):
        assert torch.equal(graphed(batches[1][0]), eager(batches[1][0]))
    graphed.train(), eager.train()
    short = (batches[0][0][:1, :17], batches[0][1][:1, :17])
    losses_short, grads_short = _accumulate(graphed, [short])  # runs eagerly
    want_short, want_grads_short = _accumulate(eager, [short])
    assert losses_short == want_short and all(torch.equal(g, w) for g, w in zip(grads_short, want_grads_short))


def _cli_train(run_dir: Path, arch: str, steps: int, graphs: bool):
    return start_cli_train(run_dir, [
        f"model.arch={arch}", "model.d_model=256", "model.n_layers=4", "model.n_heads=4", "data.seq_len=256",
        "data.corpus_bytes=2000000", "train.micro_batch_size=4", "train.grad_accum_steps=2", f"train.max_steps={steps}",
        "optim.decay_steps=20", "optim.warmup_steps=2", "train.eval_interval=3", "checkpoint.interval=0",
        "train.precision=bf16", "train.deterministic=true", f"train.cuda_graphs={str(graphs).lower()}",
        "logging.progress=true",
    ])  # fmt: skip


@gpu
@needs_cuda
def test_gpu_cli_train_with_graphs_repeats_eager_and_resumes_bitwise(tmp_path):
    """Each architecture through `sessa-scale train` (bf16, 2 micro-batches per step, evaluation every 3
    steps, train.deterministic): 6 steps with graphs follow the eager run's losses, and 3 + 3 resumed
    steps with graphs equal 6 straight ones bitwise."""
    runs = {}
    for arch in ARCHS:
        runs[arch, "eager"] = _cli_train(tmp_path / f"{arch}-eager", arch, 6, False)
        runs[arch, "graphs"] = _cli_train(tmp_path / f"{arch}-graphs", arch, 6, True)
        runs[arch, "split"] = _cli_train(tmp_path / f"{arch}-split", arch, 3, True)
    outputs = {key: finish_cli_train(proc) for key, proc in runs.items()}
    resumed = {arch: _cli_train(tmp_path / f"{arch}-split", arch, 6, True) for arch in ARCHS}
    for arch in ARCHS:
        out = finish_cli_train(resumed[arch])
        assert "resumed from" in out and "CUDA graphs: 4 blocks captured" in out, out[-2000:]
        assert "CUDA graphs: 4 blocks captured" in outputs[arch, "graphs"]
        eager, graphs, split = (metrics(tmp_path / f"{arch}-{kind}") for kind in ("eager", "graphs", "split"))
        diffs = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(eager, graphs)]
        print(f"{arch}: graphs vs eager, worst relative loss difference over 6 steps {max(diffs):.2e}; "
              f"bitwise {[a['loss'] for a in eager] == [b['loss'] for b in graphs]}")
        assert len(graphs) == 6 and max(diffs) < 1e-3, diffs
        assert [(r["loss"], r["grad_norm"]) for r in graphs] == [(r["loss"], r["grad_norm"]) for r in split], arch
