"""Training on 2 CPU processes (gloo, torchrun): ZeRO stages against stage 0, tensor + sequence
parallel ZeRO-3 against one process, and resuming on a different data- or tensor-parallel size
through DeepSpeed universal checkpoints. Small model, few steps: the whole file takes ~2 min on 2
cores (the first DeepSpeed start JIT-builds a comm op, ~60 s, cached afterwards)."""

import json

import pytest

from sessa_scale.checkpoint.universal import needs_universal
from sessa_scale.cli import main
from sessa_scale.errors import UserError
from tests.helpers.torchrun import torchrun

SMALL = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=258", "data.seq_len=32",
    "data.corpus_bytes=200000", "train.micro_batch_size=4", "train.eval_interval=0", "optim.warmup_steps=2",
    "optim.decay_steps=10", "logging.progress=false", "checkpoint.interval=3",
]  # fmt: skip


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _train2(run_dir, *overrides) -> dict[int, float]:
    torchrun("train.py", f"run.dir={run_dir}", *SMALL, *overrides)
    return _losses(run_dir)


def _train1(run_dir, *overrides) -> dict[int, float]:
    assert main(["train", f"run.dir={run_dir}", *SMALL, *overrides]) == 0
    return _losses(run_dir)


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    """dp=2 runs of 6 steps at ZeRO stages 0-3 (checkpoints at steps 3 and 6)."""
    root = tmp_path_factory.mktemp("dp2")
    return {stage: (root / f"z{stage}", _train2(root / f"z{stage}", f"zero.stage={stage}", "train.max_steps=6")) for stage in range(4)}


def test_zero_stages_1_2_3_match_stage_0_over_5_steps(dp2):
    base = dp2[0][1]
    assert base[5] < base[1]
    for stage in (1, 2, 3):
        curve = dp2[stage][1]
        assert [curve[s] for s in range(1, 6)] == pytest.approx([base[s] for s in range(1, 6)], rel=1e-5), stage


@pytest.mark.parametrize("stage", [0, 1])
def test_dp2_resumes_at_dp1_and_continues_the_loss_curve(dp2, tmp_path, stage):
    run_dir, straight = dp2[stage]
    # the same global batch on one rank: 2 accumulated micro-batches instead of 2 ranks
    resumed = _train1(
        tmp_path / "dp1", f"zero.stage={stage}", "train.max_steps=6", "train.grad_accum_steps=2",
        f"train.resume={run_dir / 'checkpoints' / 'step_00000003'}",
    )  # fmt: skip
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([straight[s] for s in (4, 5, 6)], rel=1e-5)
    assert (run_dir / "checkpoints" / "step_00000003" / "universal").is_dir() == (stage > 0)


def test_tp2_sequence_parallel_zero2_matches_one_process_and_resumes_at_tp1(tmp_path):
    tp2 = _train2(
        tmp_path / "tp2", "parallel.tensor=2", "parallel.sequence_parallel=true", "zero.stage=2", "train.max_steps=6"
    )
    single = _train1(tmp_path / "tp1", "zero.stage=2", "train.max_steps=6", "checkpoint.interval=0")
    assert [tp2[s] for s in range(1, 7)] == pytest.approx([single[s] for s in range(1, 7)], rel=1e-5)
    resumed = _train1(
        tmp_path / "tp1_resumed", "zero.stage=2", "train.max_steps=6",
        f"train.resume={tmp_path / 'tp2' / 'checkpoints' / 'step_00000003'}",
    )  # fmt: skip
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([tp2[s] for s in (4, 5, 6)], rel=1e-5)


def test_tensor_size_change_at_zero_stage_0_is_a_clear_error(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"step": 3, "parallel": {"tensor": 2, "data": 1}}))
    assert not needs_universal(tmp_path, 2, 4, zero_stage=0)  # DP changes need nothing at stage 0
    assert needs_universal(tmp_path, 2, 4, zero_stage=1) and needs_universal(tmp_path, 1, 1, zero_stage=2)
    with pytest.raises(UserError, match="zero.stage=1"):
        needs_universal(tmp_path, 1, 1, zero_stage=0)
    with pytest.raises(UserError, match="ZeRO-3 universal restore"):
        needs_universal(tmp_path, 1, 1, zero_stage=3)
    assert not needs_universal(tmp_path, 2, 1, zero_stage=3)


def test_world_size_not_divisible_by_tensor_is_a_user_error(tmp_path, capsys):
    assert main(["train", f"run.dir={tmp_path / 'r'}", *SMALL, "parallel.tensor=2"]) == 2
    assert "does not divide the world size 1" in capsys.readouterr().err


def test_generate_loads_a_tensor_parallel_checkpoint_merged(tmp_path):
    import torch

    from sessa_scale.checkpoint.merge import load_model

    _train2(tmp_path / "tp2", "parallel.tensor=2", "train.max_steps=1")
    model, cfg, checkpoint = load_model(tmp_path / "tp2")
    shards = [torch.load(checkpoint / f"mp_rank_0{r}_model_states.pt", weights_only=False)["module"] for r in range(2)]
    w_in = torch.cat([shards[0]["layers.0.W_in.weight"].chunk(2)[0], shards[1]["layers.0.W_in.weight"].chunk(2)[0]])
    assert torch.equal(model.layers[0].W_in.weight[:32], w_in)  # the a-half, rows of rank 0 then rank 1
    assert model.embed.weight.shape == (258, 32) and model.lm_head.weight is model.embed.weight
