"""`sessa-scale bench layer` compares the blocks the project trains (CPU checks of how it builds and runs
them; the timing itself needs a GPU)."""

from __future__ import annotations

import torch

from sessa_scale.bench.layer import build_block
from sessa_scale.training.precision import autocast
from sessa_scale.models.sessa import SessaLayer
from sessa_scale.models.transformer import MLP, TransformerBlock


def test_blocks_are_the_trained_models_blocks_with_the_requested_width():
    """Both blocks come from the registry's builders on the 350m configs: the project's classes, the
    config's MLP (GELU, 4 D), the requested width and heads, fp32 parameters."""
    transformer = build_block("transformer", "350m", 64, 4, "auto")
    sessa = build_block("sessa", "350m", 64, 4, "chunked")
    assert type(transformer) is TransformerBlock and type(sessa) is SessaLayer
    assert isinstance(transformer.mlp, MLP) and transformer.mlp.kind == "gelu"
    assert transformer.mlp.fc1.out_features == 4 * 64 and transformer.attn.n_heads == 4
    assert sessa.mixer.n_heads == 4 and sessa.mixer.n_fb_heads == 1 and sessa.mixer.solver == "chunked"
    assert all(p.dtype == torch.float32 for m in (transformer, sessa) for p in m.parameters())


def test_training_autocast_runs_the_blocks_in_bf16_over_fp32_parameters():
    x = torch.randn(2, 17, 64, requires_grad=True)
    block = build_block("transformer", "350m", 64, 4, "auto")
    with autocast("bf16", x.device):
        hidden = block.attn.q_proj(block.ln1(x))
        y = block(x)
    assert hidden.dtype == torch.bfloat16 and y.dtype == torch.float32  # residual stream stays fp32
    y.sum().backward()
    assert x.grad.dtype == torch.float32 and block.attn.q_proj.weight.grad.dtype == torch.float32
    with autocast("fp32", x.device):
        assert block.attn.q_proj(x).dtype == torch.float32


def test_interleaved_timing_alternates_the_blocks_and_times_each_after_the_warmup_rounds():
    """The blocks take turns call by call (both see the same clocks and host load); warm-up rounds are
    not timed; each block's median is of its own calls."""
    import time

    from sessa_scale.bench import interleaved_ms

    calls, syncs = [], []

    def step(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds if len(calls) > 6 else 0.2)  # the three warm-up rounds are slow
        return run

    ms = interleaved_ms({"transformer": step("transformer", 0.0), "sessa": step("sessa", 0.02)}, repeats=3,
                        sync=lambda: syncs.append(1), warmup=3)
    assert calls == ["transformer", "sessa"] * 6 and len(syncs) == 2 * len(calls)
    assert ms["transformer"] < 10 and 15 < ms["sessa"] < 100, ms


def test_back_to_back_timing_syncs_only_around_each_run_and_divides_by_its_calls():
    """Each round runs every step `calls` times between two syncs (the host does not wait for the device
    inside a run) and reports the time per call, not per run."""
    import time

    from sessa_scale.bench import interleaved_ms

    events = []

    def step(name, seconds):
        def run():
            events.append(name)
            time.sleep(seconds)
        return run

    ms = interleaved_ms({"transformer": step("transformer", 0.0), "sessa": step("sessa", 0.01)}, repeats=3,
                        sync=lambda: events.append("sync"), calls=4)
    run = ["sync"] + ["transformer"] * 4 + ["sync", "sync"] + ["sessa"] * 4 + ["sync"]
    assert events == run * 3
    assert ms["transformer"] < 5 and 9 < ms["sessa"] < 30, ms
