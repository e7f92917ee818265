"""Tensor + sequence parallelism: tp=2 (2 gloo processes) against tp=1 of the same seed, the
shard/merge arithmetic, and the parallel config checks."""

import pytest
import torch

from sessa_scale.config.schema import ModelConfig
from sessa_scale.distributed.tp_plan import merge_state_dicts, param_layout, shard, tensor_parallel_problems, unshard
from tests.helpers.torchrun import torchrun


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "results.pt"
    torchrun("tp_equivalence.py", str(out))
    return torch.load(out, weights_only=False)


def test_tp2_matches_tp1_loss_logits_and_every_gradient(tp_results):
    assert set(tp_results) == {"fb1_gqa_T17", "fb2_sp_T18", "fb1_sp_T66", "transformer_gelu_T17", "transformer_swiglu_sp_T18",
                               "mamba2_T17", "mamba2_sp_T34"}  # fmt: skip
    for name, r in tp_results.items():
        assert r["tp_loss"] == pytest.approx(r["ref_loss"], abs=1e-5), name
        torch.testing.assert_close(r["tp_logits"], r["ref_logits"], rtol=1e-5, atol=1e-5, msg=name)
        assert set(r["tp_grads"]) == set(r["ref_grads"]), name
        for param, grad in r["ref_grads"].items():
            torch.testing.assert_close(r["tp_grads"][param], grad, rtol=1e-5, atol=1e-5, msg=f"{name}: {param}")
        assert r["replicated_spread"] < 1e-6, name
        assert any("q_proj" in n or "in_proj" in n for n in r["tp_sharded"]) and "embed.weight" in r["tp_sharded"], name


def test_feedback_heads_are_sharded_or_replicated_as_the_spec_says(tp_results):
    one_head, two_heads = tp_results["fb1_gqa_T17"]["tp_sharded"], tp_results["fb2_sp_T18"]["tp_sharded"]
    assert not any("proj_fb" in n or "gamma" in n for n in one_head)  # q_b/k_b/gamma replicated
    assert {"layers.0.mixer.proj_fb.weight", "layers.0.mixer.gamma_ctx.weight", "layers.0.mixer.gamma_bias"} <= set(two_heads)


@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_unshard_round_trip(tp, chunks):
    full = torch.randn(chunks * tp * 5, 7)
    pieces = [shard(full, 0, chunks, r, tp) for r in range(tp)]
    assert torch.equal(unshard(pieces, 0, chunks), full)
    if chunks == 2 and tp == 2:  # W_in's [a | g]: rank 0 holds a[:n/2] and g[:n/2]
        a, g = full.chunk(2)
        assert torch.equal(pieces[0], torch.cat([a[: a.shape[0] // 2], g[: g.shape[0] // 2]]))


def test_param_layout_follows_the_sessa_plan():
    one, many = ModelConfig(), ModelConfig(n_fb_heads=4)
    assert param_layout(one, "layers.3.W_in.weight") == (0, 2)
    assert param_layout(one, "layers.3.W_in.bias") == (0, 2)
    assert param_layout(one, "layers.0.W_out.weight") == (1, 1)
    assert param_layout(one, "layers.0.W_out.bias") is None
    assert param_layout(one, "layers.0.mixer.out_proj.weight") == (1, 1)
    assert param_layout(one, "layers.0.mixer.proj_fb.weight") is None
    assert param_layout(many, "layers.0.mixer.proj_fb.weight") == (0, 2)
    assert param_layout(many, "layers.0.mixer.gamma_bias") == (0, 1)
    assert param_layout(one, "layers.0.ln.weight") is None and param_layout(one, "norm.weight") is None
    assert param_layout(one, "embed.weight") == (0, 1)
    states = [{"embed.weight": torch.full((2, 3), float(r)), "norm.weight": torch.ones(3)} for r in range(2)]
    merged = merge_state_dicts(one, states)
    assert merged["embed.weight"][:, 0].tolist() == [0, 0, 1, 1] and set(merged) == {"embed.weight", "norm.weight"}


def test_tensor_parallel_problems_name_keys_and_fixes():
    assert tensor_parallel_problems(ModelConfig(), 1) == []
    problems = tensor_parallel_problems(ModelConfig(vocab_size=257, n_heads=4, n_kv_heads=1, n_fb_heads=3, d_model=96), 2)
    text = "\n".join(problems)
    for needle in ("model.vocab_size: 257", "model.n_kv_heads: 1", "model.n_fb_heads: 3"):
        assert needle in text
    assert "model.n_heads" not in text and "model.d_model" not in text
    assert tensor_parallel_problems(ModelConfig(vocab_size=258, n_fb_heads=4), 2) == []
    mamba2 = ModelConfig(arch="mamba2", vocab_size=258)
    assert tensor_parallel_problems(mamba2, 2) == ["model.ssm_groups: 1 is not divisible by parallel.tensor=2; use a multiple of 2"]
    assert tensor_parallel_problems(ModelConfig(arch="mamba2", vocab_size=258, ssm_groups=2), 2) == []
    swiglu = ModelConfig(arch="transformer", vocab_size=258, mlp="swiglu", mlp_hidden=330)
    assert tensor_parallel_problems(swiglu, 2) == [] and "model.mlp_hidden: 330" in "".join(tensor_parallel_problems(swiglu, 4))


def test_each_block_communicates_exactly_what_its_layout_needs(tmp_path):
    """Collectives of one block's forward + backward at tp=2 (a 2-block model minus a 1-block one).
    Sessa under SP: forward all-gathers the normed residual over the sequence (attention and the
    feedback solve need every position) and a_bar over the hidden dim (q/k/v and the replicated
    q_b/k_b need every feature; q_b/k_b themselves are computed, never gathered), reduce-scatters f
    over the hidden dim and W_out's output over the sequence; backward runs the transposes (2 + 2);
    all-reduces: the 7 replicated parameters' partial gradients (ln weight/bias, W_out bias, proj_fb
    weight/bias, gamma_ctx, gamma_bias), 3 when the feedback heads are split. Without SP the
    sequence collectives become all-reduces (W_out forward, the norm's backward)."""
    out = tmp_path / "collectives.pt"
    torchrun("tp_collectives.py", str(out))
    counts = torch.load(out, weights_only=False)
    gather, scatter, reduce = "c10d::_allgather_base_", "c10d::_reduce_scatter_base_", "c10d::allreduce_"
    assert counts["sessa_fb1_sp"] == {gather: 4, scatter: 4, reduce: 7}
    assert counts["sessa_fb2_sp"] == {gather: 4, scatter: 4, reduce: 3}
    assert counts["sessa_fb1"] == {gather: 2, scatter: 2, reduce: 2 + 4}
    assert counts["transformer_sp"] == {gather: 4, scatter: 4, reduce: 6}  # 2 norms' weights and biases, 2 Row biases
