"""Analytic FLOP counts against hand counts, the projection terms against torch's FLOP counter on
the real modules, the peak-rate table and the throughput/MFU arithmetic."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sessa_scale.cli import main
from sessa_scale.config.schema import ModelConfig
from sessa_scale.metrics import peak_bf16_flops, peak_bf16_flops_of, throughput
from sessa_scale.models.flops import forward_flops_per_token, training_flops_per_token
from sessa_scale.models.registry import build_model, count_training_flops

# D=4, H=2 (d=2), T=3, V=5, one layer; FLOPs = 2 per multiply-add.
TINY = dict(d_model=4, n_heads=2, n_layers=1, vocab_size=5, tie_embeddings=False)


def test_sessa_hand_count():
    cfg = ModelConfig(arch="sessa", **TINY)
    # per token: W_in 2*4*8=64, q 2*4*4=32, k 32, v 32, proj_fb 2*4*8=64, gamma_ctx 2*4*1=8, out_proj 32, W_out 32
    projections = 3 * (64 + 32 + 32 + 32 + 64 + 8 + 32 + 32)
    # forward attention, t=0,1,2 attends to t+1 keys: per key 2 heads x (2 + 2) MACs (score, value) = 8 MACs = 16 FLOPs
    attention = 16 * (1 + 2 + 3)
    # feedback, t attends to t earlier outputs: per pair D=4 MACs for q_b.k_b and 4 for alpha*s = 16 FLOPs
    feedback = 16 * (0 + 1 + 2)
    head = 3 * 2 * 4 * 5
    assert forward_flops_per_token(cfg, 3) * 3 == projections + attention + feedback + head == 1152
    assert training_flops_per_token(cfg, 3) == count_training_flops(cfg, 3) == 3 * 1152 / 3


def test_sessa_single_attention_head_and_feedback_heads():
    one_head = ModelConfig(arch="sessa", **{**TINY, "n_heads": 1})  # out_proj is the identity: no 32/token
    four_fb = ModelConfig(arch="sessa", **{**TINY, "n_fb_heads": 4})  # gamma_ctx 4 -> 4 outputs: 32 not 8
    base = forward_flops_per_token(ModelConfig(arch="sessa", **TINY), 3)
    assert forward_flops_per_token(one_head, 3) == base - 32
    assert forward_flops_per_token(four_fb, 3) == base + 24  # per-head feedback splits D, same total work


def test_transformer_hand_counts():
    gelu = ModelConfig(arch="transformer", **{**TINY, "n_kv_heads": 1}, mlp_hidden=8)
    # per token: q 32, k,v 2*4*2=16 each, out 32, fc1 2*4*8=64, fc2 64
    per_token = 32 + 16 + 16 + 32 + 64 + 64
    assert forward_flops_per_token(gelu, 3) * 3 == 3 * per_token + 16 * (1 + 2 + 3) + 3 * 40 == 888
    swiglu = ModelConfig(arch="transformer", **TINY, mlp="swiglu", mlp_hidden=8)
    assert forward_flops_per_token(swiglu, 3) * 3 == 3 * (32 + 32 + 32 + 32 + 3 * 64) + 96 + 120


def test_mamba2_hand_count():
    cfg = ModelConfig(arch="mamba2", **TINY, ssm_expand=2, ssm_head_dim=4, ssm_state=2, ssm_groups=1, ssm_conv=2, ssm_chunk=2)
    # E=8, H=2 heads of P=4, N=2, G=1; in_proj 4 -> 2E+2GN+H = 22: 176; conv 2*2*(8+4)=48; out_proj 2*8*4=64
    projections = 3 * (176 + 48 + 64)
    # chunk 0 (2 tokens): 3 causal pairs x (N*G=2 for C.B + P*H=8 for x) MACs = 60 FLOPs; state B^T x 2*2*2*4*2 = 64
    # chunk 1 (1 token): 1 pair x 10 MACs = 20; state 32; carried state decay+add 2*N*P*H = 32; read-out C h 32
    ssd = (60 + 64) + (20 + 32 + 32 + 32)
    assert forward_flops_per_token(cfg, 3) * 3 == projections + ssd + 3 * 40 == 1224


@pytest.mark.parametrize("arch", ["sessa", "transformer", "mamba2"])
def test_projection_terms_match_torch_flop_counter(arch):
    """At T=1 attention/feedback/SSD terms are tiny and known; the rest are the Linear (and conv)
    products, which torch's FLOP counter measures on the real modules."""
    cfg = ModelConfig(arch=arch, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, vocab_size=97, ssm_head_dim=32, ssm_state=16, ssm_chunk=16)
    model, T = build_model(cfg), 17
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 97, (1, T)))
    measured = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in ("aten.addmm", "aten.mm", "aten.convolution"))
    D = cfg.d_model
    mixing = {
        "sessa": 2 * (2 * 2 * D * T * (T + 1) // 2 + 2 * 2 * D * T * (T - 1) // 2),
        "transformer": 2 * (2 * 2 * D * T * (T + 1) // 2),
        "mamba2": 0,
    }[arch]
    if arch == "mamba2":  # the SSD term is everything but the projections and the conv
        from sessa_scale.models.mamba2 import mamba2_layer_flops

        E, N, P = cfg.ssm_expand * D, cfg.ssm_state, cfg.ssm_head_dim
        projections = T * (2 * D * (2 * E + 2 * N + E // P) + 2 * cfg.ssm_conv * (E + 2 * N) + 2 * E * D)
        mixing = 2 * (mamba2_layer_flops(cfg, T) - projections)
        # the implementation's padded causal conv also computes K-1 outputs it then drops (not model work)
        mixing -= cfg.n_layers * 2 * cfg.ssm_conv * (E + 2 * N) * (cfg.ssm_conv - 1)
    # the joint input projection's zero rows, which pad its width to ROW_ALIGN (not model work)
    from sessa_scale.models.attention import ROW_ALIGN

    block = model.layers[0]
    mixer = block.attn if arch == "transformer" else block.mixer
    joint = {"sessa": ("q_proj", "k_proj", "v_proj", "proj_fb", "gamma_ctx"), "transformer": ("q_proj", "k_proj", "v_proj"),
             "mamba2": ("in_proj", "B_proj", "C_proj", "dt_proj")}[arch]
    width = sum(getattr(mixer, name).weight.shape[0] for name in joint)
    mixing -= cfg.n_layers * 2 * D * (-width % ROW_ALIGN) * T
    assert measured == forward_flops_per_token(cfg, T) * T - mixing, (measured, arch)


def test_peak_table_and_unknown_gpus():
    assert peak_bf16_flops_of("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_bf16_flops_of("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops_of("NVIDIA H200") == 989.4e12
    assert peak_bf16_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops_of("NVIDIA GeForce RTX 4090") is None  # unknown: no MFU rather than a guess
    assert peak_bf16_flops(torch.device("cpu")) is None


def test_throughput_arithmetic():
    r = throughput(tokens=1000, seconds=2.0, world=4, flops_per_token=1e9, peak=1e12)
    assert r == {"tokens_per_s": 500.0, "tokens_per_s_per_gpu": 125.0, "tflops_per_gpu": 0.125, "mfu": 0.125}
    assert throughput(1000, 2.0, 4, 1e9, None)["mfu"] is None


def test_training_records_throughput_and_memory(tmp_path):
    args = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.seq_len=32", "data.corpus_bytes=100000",
            "train.micro_batch_size=2", "train.eval_interval=0", "train.max_steps=2", "logging.progress=false"]  # fmt: skip
    assert main(["train", f"run.dir={tmp_path}", *args]) == 0
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["mfu"] is None and record["peak_mem_gib"] > 0  # CPU: no peak rate, RSS as memory
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2)
    expected = record["tokens_per_s_per_gpu"] * training_flops_per_token(cfg, 32) / 1e12
    assert record["tflops_per_gpu"] == pytest.approx(expected)
