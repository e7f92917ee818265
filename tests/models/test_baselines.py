"""The Transformer and Mamba-2 baselines: cached decoding against the parallel forward for all three
architectures, exact parameter counts by hand, the shipped matched trios, init and validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sessa_scale.config import load_config
from sessa_scale.config.schema import ModelConfig
from sessa_scale.models import build_model, count_parameters, validate_model_config
from sessa_scale.models.transformer import default_mlp_hidden
from tests.helpers import REPO_ROOT
from tests.helpers.op_counter import OpCounter

CONFIGS = REPO_ROOT / "configs"
TRIO_SIZES = ("125m", "350m", "1.3b")
ARCHS = ("sessa", "transformer", "mamba2")

TINY = ModelConfig(
    vocab_size=37, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, n_fb_heads=2, gamma_max=0.95,
    ssm_state=8, ssm_head_dim=16, ssm_groups=2, ssm_chunk=16,
)


def tiny(**overrides) -> ModelConfig:
    return dataclasses.replace(TINY, **overrides)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("T, n_prefill", [(12, 1), (12, 2), (17, 5), (20, 17)])
def test_prefill_and_decode_match_the_parallel_forward(arch, T, n_prefill):
    """float64: prefill of n_prefill tokens, then one token at a time, gives the parallel forward's
    logits (n_prefill = 1, 2 are shorter than the Mamba-2 conv window; T = 20 > ssm_chunk)."""
    torch.manual_seed(0)
    model = build_model(tiny(arch=arch)).double().eval()
    tokens = torch.randint(0, TINY.vocab_size, (2, T))
    with torch.no_grad():
        full = model(tokens)
        cache = model.init_cache(2, max_len=T)
        logits, cache = model.prefill(tokens[:, :n_prefill], cache)
        steps = [logits]
        for t in range(n_prefill, T):
            step, cache = model.decode_step(tokens[:, t], cache)
            steps.append(step[:, None])
    assert full.dtype == torch.float64 and full.shape == (2, T, TINY.vocab_size)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ["transformer", "mamba2"])
def test_generate_greedy_matches_full_recompute(arch):
    torch.manual_seed(1)
    model = build_model(tiny(arch=arch)).double().eval()
    prompt = torch.randint(0, TINY.vocab_size, (2, 3))
    out = model.generate(prompt, max_new_tokens=5, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq, out)


def test_mamba2_scan_implementations_agree_in_the_model():
    torch.manual_seed(2)
    tokens = torch.randint(0, TINY.vocab_size, (2, 37))
    outs = []
    for scan in ("chunked", "sequential"):
        torch.manual_seed(3)
        outs.append(build_model(tiny(arch="mamba2", ssm_scan=scan)).double()(tokens))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-10)


def test_mamba2_mixer_runs_one_input_gemm_and_one_conv_with_the_separate_modules_results():
    """in_proj, B_proj, C_proj, dt_proj run as one GEMM and conv_x, conv_B, conv_C as one conv,
    forward and backward (before: 4 GEMMs and 3 convs), with what each module gives on its own."""
    from sessa_scale.models.mamba2 import Mamba2Mixer, causal_conv1d_silu_torch

    torch.manual_seed(0)
    mixer = Mamba2Mixer(32, d_state=8, head_dim=16, n_groups=2, chunk_size=16, kernels="torch").double()
    u = torch.randn(2, 19, 32, dtype=torch.float64, requires_grad=True)
    with OpCounter() as fwd:
        z, xbc, dt_raw, _ = mixer._project(u)
        conv_out = mixer.causal_conv(xbc)
    with OpCounter() as bwd:
        (z.sum() + conv_out.square().sum() + dt_raw.sum()).backward()
    assert fwd.ops["mm"] + fwd.ops["addmm"] == 1 and fwd.ops["convolution"] == 1, fwd.ops
    assert bwd.ops["mm"] == 2 and bwd.ops["convolution_backward"] == 1, bwd.ops
    with torch.no_grad():
        z_ref, x_ref = mixer.in_proj(u).chunk(2, dim=-1)
        conv_in = {"conv_x": x_ref, "conv_B": mixer.B_proj(u), "conv_C": mixer.C_proj(u)}
        ref = [causal_conv1d_silu_torch(v, getattr(mixer, n).weight.flatten(1).t(), getattr(mixer, n).bias) for n, v in conv_in.items()]
        torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(dt_raw, mixer.dt_proj(u), rtol=0, atol=1e-12)
        torch.testing.assert_close(conv_out, torch.cat(ref, dim=-1), rtol=0, atol=1e-12)


def test_mamba2_ssm_keep_states_reaches_every_mixer_and_may_change_on_resume():
    """model.ssm_keep_states (a bool in the YAML / key=value config) is every mixer's keep_states (the
    Triton scan's SSDConfig.keep_states: tests/ops/test_ssd_keep_states.py runs it), and, shaping no
    weight, may differ between a checkpoint and the run that resumes it."""
    from sessa_scale.config.loader import ConfigError
    from sessa_scale.config.schema import RUNTIME_MODEL_KEYS

    for keep in (True, False):
        model = build_model(tiny(arch="mamba2", ssm_keep_states=keep))
        assert [block.mixer.keep_states for block in model.layers] == [keep] * TINY.n_layers
    assert load_config(CONFIGS / "mamba2" / "350m.yaml", ["model.ssm_keep_states=false"]).model.ssm_keep_states is False
    with pytest.raises(ConfigError, match="model.ssm_keep_states: expected true or false, got 'maybe'"):
        load_config(None, ["model.ssm_keep_states=maybe"])
    assert "ssm_keep_states" in RUNTIME_MODEL_KEYS


def test_baselines_train_a_step_with_finite_grads():
    for arch in ("transformer", "mamba2"):
        torch.manual_seed(0)
        model = build_model(tiny(arch=arch, mlp="swiglu"))
        tokens = torch.randint(0, TINY.vocab_size, (2, 9))
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()), arch


def transformer_params_by_hand(cfg: ModelConfig) -> int:
    """Non-embedding parameters: per layer 2 LayerNorms (4D), q D^2+D, k and v D*kv+kv each, out
    D^2+D, MLP (gelu: 2 D h + h + D; swiglu: 3 D h + 2 h + D); plus the final LayerNorm (2D)."""
    D = cfg.d_model
    kv = (cfg.n_kv_heads or cfg.n_heads) * (D // cfg.n_heads)
    h = cfg.mlp_hidden or default_mlp_hidden(D, cfg.mlp)
    mlp = 2 * D * h + h + D if cfg.mlp == "gelu" else 3 * D * h + 2 * h + D
    return cfg.n_layers * (4 * D + D * D + D + 2 * (D * kv + kv) + D * D + D + mlp) + 2 * D


def mamba2_params_by_hand(cfg: ModelConfig) -> int:
    """Non-embedding parameters: per layer LayerNorm 2D, in_proj D (2E + 2GN + H), conv (E + 2GN)(k + 1),
    dt_bias, A_log, D (H each), gated norm E, out_proj E D; plus the final LayerNorm (2D)."""
    D = cfg.d_model
    E = cfg.ssm_expand * D
    H, GN = E // cfg.ssm_head_dim, cfg.ssm_groups * cfg.ssm_state
    per_layer = 2 * D + D * (2 * E + 2 * GN + H) + (E + 2 * GN) * (cfg.ssm_conv + 1) + 3 * H + E + E * D
    return cfg.n_layers * per_layer + 2 * D


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(arch="transformer"),
        tiny(arch="transformer", mlp="swiglu", tie_embeddings=False),
        tiny(arch="transformer", mlp_hidden=40, n_kv_heads=None),
        ModelConfig(arch="transformer", vocab_size=50304, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=4),
    ],
)
def test_transformer_parameter_counts_match_the_formula(cfg):
    counted = count_parameters(cfg)
    V, D = cfg.vocab_size, cfg.d_model
    assert counted.non_embedding == transformer_params_by_hand(cfg)
    assert counted.total == counted.non_embedding + V * D * (1 if cfg.tie_embeddings else 2)


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(arch="mamba2"),
        tiny(arch="mamba2", ssm_groups=1, ssm_conv=3, ssm_expand=1, tie_embeddings=False),
        ModelConfig(arch="mamba2", vocab_size=50304, d_model=2048, n_layers=48),
    ],
)
def test_mamba2_parameter_counts_match_the_formula(cfg):
    counted = count_parameters(cfg)
    assert counted.non_embedding == mamba2_params_by_hand(cfg)
    assert counted.total == counted.non_embedding + cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    if cfg.d_model <= 64:
        assert counted.total == sum(p.numel() for p in build_model(cfg).parameters())


def test_swiglu_default_width_keeps_the_gelu_parameter_count():
    for D in (768, 1024, 2048):
        gelu = count_parameters(ModelConfig(arch="transformer", d_model=D, n_heads=16, n_layers=2))
        swiglu = count_parameters(ModelConfig(arch="transformer", d_model=D, n_heads=16, n_layers=2, mlp="swiglu"))
        assert abs(swiglu.non_embedding / gelu.non_embedding - 1) < 0.01


def _trio(size: str):
    return {arch: load_config(CONFIGS / arch / f"{size}.yaml") for arch in ARCHS}


@pytest.mark.parametrize("size", TRIO_SIZES)
def test_shipped_trios_are_matched_within_two_percent(size):
    """Same width, vocabulary, sequence length, tokens, optimizer and schedule; non-embedding
    parameters within 2% of Sessa's; only the architecture-specific model keys differ."""
    trio = _trio(size)
    sessa = trio["sessa"]
    ref = count_parameters(sessa.model).non_embedding
    for arch, cfg in trio.items():
        assert cfg.model.arch == arch and cfg.run.name == f"{arch}-{size}"
        assert (cfg.model.d_model, cfg.model.vocab_size, cfg.model.tie_embeddings, cfg.model.init) == (
            sessa.model.d_model, sessa.model.vocab_size, sessa.model.tie_embeddings, sessa.model.init)
        for section in ("data", "optim", "train", "checkpoint", "zero"):
            assert getattr(cfg, section) == getattr(sessa, section), (arch, section)
        ratio = count_parameters(cfg.model).non_embedding / ref
        assert abs(ratio - 1) <= 0.02, f"{arch}-{size}: {ratio:.4f} of Sessa's non-embedding parameters"


def test_params_prints_a_trio_side_by_side(capsys):
    from sessa_scale.cli import main

    paths = [str(CONFIGS / arch / "350m.yaml") for arch in ARCHS]
    assert main(["params", "--json", *paths]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert [r["arch"] for r in rows] == list(ARCHS)
    assert all(abs(r["vs_first"] - 1) <= 0.02 for r in rows) and rows[0]["vs_first"] == 1.0
    assert main(["params", *paths]) == 0
    table = capsys.readouterr().out
    assert "vs-first" in table and "mamba2" in table


def test_scaled_init_of_the_baselines():
    for arch, outputs in (("transformer", ("attn.out_proj", "mlp.fc2")), ("mamba2", ("mixer.out_proj",))):
        torch.manual_seed(0)
        model = build_model(tiny(arch=arch, d_model=128, n_heads=4, init="scaled", n_layers=4))
        block = model.layers[0]
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear):
                expected = 0.02 / math.sqrt(8) if name in outputs else 0.02
                assert module.weight.double().std().item() == pytest.approx(expected, rel=0.1), (arch, name)
        if arch == "mamba2":
            dt = torch.nn.functional.softplus(block.mixer.dt_bias)
            assert 1e-3 * 0.99 <= dt.min() and dt.max() <= 0.1 * 1.01
            assert torch.all(-torch.exp(block.mixer.A_log) <= -1) and torch.all(block.mixer.D == 1)


def test_validation_of_baseline_keys():
    assert validate_model_config(tiny(arch="mamba2")) == []
    problems = validate_model_config(tiny(arch="mamba2", ssm_head_dim=24, ssm_chunk=48, mlp="relu", ssm_scan="cuda"))
    keys = sorted(p.split(":", 1)[0] for p in problems)
    assert keys == ["model.mlp", "model.ssm_chunk", "model.ssm_head_dim", "model.ssm_scan"]
    assert "'swiglu'" in next(p for p in problems if p.startswith("model.mlp"))
    groups = validate_model_config(tiny(arch="mamba2", ssm_groups=3))
    assert len(groups) == 1 and groups[0].startswith("model.ssm_groups")
    assert validate_model_config(tiny(arch="transformer", ssm_groups=3)) == []  # SSM keys only bind mamba2
    wide = validate_model_config(tiny(arch="mamba2", ssm_conv=9))  # the Triton conv holds up to 8 taps
    assert len(wide) == 1 and wide[0].startswith("model.ssm_conv: 9 exceeds") and "ssm_kernels=torch" in wide[0]
    assert validate_model_config(tiny(arch="mamba2", ssm_conv=9, ssm_kernels="torch")) == []
    assert [p.split(":")[0] for p in validate_model_config(tiny(mlp_hidden=0, ssm_state=2.5))] == [
        "model.ssm_state", "model.mlp_hidden"]


@pytest.mark.parametrize("arch", ["transformer", "mamba2"])
def test_baselines_train_resume_exactly_and_generate_through_the_cli(arch, tmp_path, capsys):
    """The same trainer, checkpoint and generate paths as Sessa: 3 + 3 resumed steps log exactly the
    losses of 6 straight steps, and the run samples."""
    import json

    from sessa_scale.cli import main

    small = [
        f"model.arch={arch}", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.ssm_state=16",
        "model.ssm_head_dim=16", "model.ssm_chunk=16", "data.seq_len=40", "data.corpus_bytes=200000",
        "train.micro_batch_size=4", "train.eval_interval=0", "optim.warmup_steps=2", "optim.decay_steps=6",
        "checkpoint.interval=3", "logging.progress=false",
    ]

    def train(run_dir, steps):
        assert main(["train", f"run.dir={run_dir}", *small, f"train.max_steps={steps}"]) == 0
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    straight = train(tmp_path / "straight", 6)
    train(tmp_path / "split", 3)
    assert train(tmp_path / "split", 6) == straight
    assert straight[-1] < straight[0]
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "split"), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_gated_rmsnorm_gradients_through_its_recomputation():
    from sessa_scale.models.mamba2 import GatedRMSNorm

    torch.manual_seed(0)
    norm = GatedRMSNorm(6, group_size=3).double()
    norm.weight.data.uniform_(0.5, 1.5)
    y, z = (torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(norm, (y, z))
    h = y * torch.nn.functional.silu(z)
    for g in (slice(0, 3), slice(3, 6)):  # each group of 3 channels normalized on its own
        expected = h[..., g] / torch.sqrt(h[..., g].pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight[g]
        torch.testing.assert_close(norm(y, z)[..., g], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ("transformer", "sessa"))
def test_attention_input_projections_run_as_one_gemm_with_the_separate_modules_results(arch):
    """q, k, v (and Sessa's proj_fb and gamma_ctx, an odd width padded to aligned rows) read the same
    input: one GEMM forward and two backward (before: one per module), equal to each module's own
    output. A ZeRO-3 partitioned weight (attribute ds_id) falls back to one call per module."""
    from sessa_scale.models.attention import project

    torch.manual_seed(0)
    block = build_model(tiny(arch=arch)).double().layers[0]
    mixer = block.attn if arch == "transformer" else block.mixer
    linears = [mixer.q_proj, mixer.k_proj, mixer.v_proj] + ([mixer.proj_fb, mixer.gamma_ctx] if arch == "sessa" else [])
    x = torch.randn(2, 17, 32, dtype=torch.float64, requires_grad=True)
    with OpCounter() as fwd:
        outputs = project(x, linears)
    with OpCounter() as bwd:
        sum(o.square().sum() for o in outputs).backward()
    assert fwd.ops["mm"] + fwd.ops["addmm"] == 1 and bwd.ops["mm"] == 2, (fwd.ops, bwd.ops)
    with torch.no_grad():
        for out, linear in zip(outputs, linears):
            torch.testing.assert_close(out, linear(x), rtol=0, atol=1e-12)
    with OpCounter() as layer_fwd:
        mixer(torch.randn(2, 17, 32, dtype=torch.float64))
    assert layer_fwd.ops["mm"] + layer_fwd.ops["addmm"] == 2, layer_fwd.ops  # and out_proj
    mixer.k_proj.weight.ds_id = 0
    with OpCounter() as fallback:
        project(x, linears)
    assert fallback.ops["mm"] + fallback.ops["addmm"] == len(linears), fallback.ops


def test_sessa_feedback_projections_split_from_the_joint_product_without_a_stack_in_the_backward():
    """q_b and k_b are parts of the joint product's one split: the mixer's backward assembles their
    gradients in its one concatenation (split from proj_fb's output instead, they were stacked first),
    and they equal proj_fb's halves.  Under a fallback (ZeRO-3 weight) each output is split, not
    concatenated first."""
    from sessa_scale.models.attention import project

    torch.manual_seed(0)
    mixer = build_model(tiny(arch="sessa")).double().layers[0].mixer
    x = torch.randn(2, 17, 32, dtype=torch.float64, requires_grad=True)
    y = mixer(x)
    with OpCounter() as bwd:
        y.square().sum().backward()
    assert bwd.ops["cat"] == 1 and bwd.ops["stack"] == 0, bwd.ops
    _, _, _, q_b, k_b, _ = mixer._project(x, torch.arange(17))
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([q_b.flatten(-2), k_b.flatten(-2)], -1), mixer.proj_fb(x), rtol=0,
                                   atol=1e-12)
    linears = [mixer.q_proj, mixer.k_proj, mixer.v_proj, mixer.proj_fb, mixer.gamma_ctx]
    widths = [m.weight.shape[0] for m in linears]
    sizes = widths[:3] + [widths[3] // 2] * 2 + widths[4:]
    mixer.k_proj.weight.ds_id = 0
    with OpCounter() as fallback:
        parts = project(x, linears, sizes=sizes)
    assert fallback.ops["cat"] == 0 and [p.shape[-1] for p in parts] == sizes, fallback.ops
    with torch.no_grad():
        torch.testing.assert_close(parts[4], mixer.proj_fb(x)[..., sizes[3]:], rtol=0, atol=1e-12)
        crossing = project(x, linears[:2], sizes=[16, sum(widths[:2]) - 16])  # a part across two: concatenated first
        torch.testing.assert_close(crossing[1], torch.cat([mixer.q_proj(x)[..., 16:], mixer.k_proj(x)], -1))


def test_attention_input_projections_stay_separate_under_torch_compile():
    """Inductor turns the fused projection's gradient into a slow kernel: compiled graphs keep one
    product per module (eager fuses them, the test above)."""
    from sessa_scale.models.attention import project

    linears = [torch.nn.Linear(8, 8) for _ in range(3)]
    traced = []

    def backend(gm, example_inputs):
        traced.append(sum(n.op == "call_function" and n.target is torch._C._nn.linear for n in gm.graph.nodes))
        return gm

    outputs = torch.compile(lambda x: project(x, linears), backend=backend)(torch.randn(2, 3, 8))
    assert traced == [3] and [o.shape[-1] for o in outputs] == [8, 8, 8]
