"""A fourth architecture plugs in as one spec and one registration: a toy Sessa/attention hybrid
(even blocks Sessa layers, odd blocks Transformer blocks) defined here is validated, built, counted
and trained through the same registry paths as the built-in three."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from sessa_scale.config import ConfigError, load_config
from sessa_scale.config.schema import ModelConfig
from sessa_scale.distributed.tp_plan import tensor_parallel_problems
from sessa_scale.models import ARCHITECTURES, ArchSpec, SessaLayer, TransformerBlock, build_model, register_architecture
from sessa_scale.models.flops import forward_flops_per_token
from sessa_scale.models.registry import count_parameters, count_training_flops, validate_model_config
from sessa_scale.models.sessa import build_sessa_block, sessa_layer_flops
from sessa_scale.models.spec import Problem, is_int
from sessa_scale.models.transformer import build_transformer_block, transformer_layer_flops


def build_hybrid_block(cfg: ModelConfig, layer_idx: int):
    return (build_sessa_block if layer_idx % 2 == 0 else build_transformer_block)(cfg, layer_idx)


def hybrid_layer_flops(cfg: ModelConfig, T: int) -> int:
    return (sessa_layer_flops(cfg, T) + transformer_layer_flops(cfg, T)) // 2  # both even: exact


def validate_hybrid(cfg: ModelConfig) -> list[Problem]:
    if is_int(cfg.n_layers) and cfg.n_layers % 2:
        return [("n_layers", f"{cfg.n_layers} is odd; the hybrid alternates Sessa and attention blocks, use an even number")]
    return []


HYBRID = ArchSpec(name="hybrid", build_block=build_hybrid_block, layer_flops=hybrid_layer_flops, validate=validate_hybrid)

TINY = ModelConfig(arch="hybrid", vocab_size=37, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden=48)


@pytest.fixture
def hybrid():
    register_architecture(HYBRID)
    yield HYBRID
    del ARCHITECTURES[HYBRID.name]


def test_an_unregistered_architecture_is_rejected():
    assert "hybrid" not in ARCHITECTURES
    assert [p.split(":")[0] for p in validate_model_config(TINY)] == ["model.arch"]
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(dataclasses.replace(HYBRID, name="sessa"))


def test_the_spec_validates_builds_and_counts(hybrid):
    assert validate_model_config(TINY) == []
    odd = dataclasses.replace(TINY, n_layers=3)
    assert validate_model_config(odd) == [
        "model.n_layers: 3 is odd; the hybrid alternates Sessa and attention blocks, use an even number"]  # fmt: skip
    with pytest.raises(ConfigError, match="command line: model.n_layers: 3 is odd"):
        load_config(None, ["model.arch=hybrid", "model.n_layers=3"])
    with pytest.raises(ConfigError, match="model.arch: 'hybrid' has no tensor-parallel plan"):
        load_config(None, ["model.arch=hybrid", "model.vocab_size=258", "parallel.tensor=2"])
    assert tensor_parallel_problems(TINY, 2) == ["model.arch: 'hybrid' has no tensor-parallel plan; set parallel.tensor=1"]

    model = build_model(TINY)
    assert [type(block) for block in model.layers] == [SessaLayer, TransformerBlock] * 2
    # Parameters: the built model's, and half of the all-Sessa plus the all-Transformer model (same
    # embedding, norm and head; half of each one's blocks).
    sessa, transformer = (dataclasses.replace(TINY, arch=arch) for arch in ("sessa", "transformer"))
    total = count_parameters(TINY).total
    assert total == sum(p.numel() for p in model.parameters())
    assert 2 * total == count_parameters(sessa).total + count_parameters(transformer).total
    for T in (1, 17, 63, 130):
        both = forward_flops_per_token(sessa, T) + forward_flops_per_token(transformer, T)
        assert math.isclose(2 * forward_flops_per_token(TINY, T), both, rel_tol=1e-12)
        assert count_training_flops(TINY, T) == 3 * forward_flops_per_token(TINY, T) > 0


def test_the_trainer_trains_and_samples_it(hybrid, tmp_path, capsys):
    """Two training steps through `sessa-scale train` (config validation, build_model, the trainer,
    a checkpoint), then `sessa-scale generate` rebuilding the model from that checkpoint."""
    from sessa_scale.cli import main

    run = tmp_path / "run"
    args = ["model.arch=hybrid", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.seq_len=17",
            "data.corpus_bytes=100000", "train.micro_batch_size=2", "train.eval_interval=0", "train.max_steps=2",
            "logging.progress=false", f"run.dir={run}"]  # fmt: skip
    assert main(["train", *args]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert load_config(run / "config.yaml").model.arch == "hybrid"
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "4"]) == 0  # rebuilt from the checkpoint
    assert capsys.readouterr().out.startswith("def ")
    pytest.importorskip("transformers")
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2  # no HF classes: a clear error, no traceback
    err = capsys.readouterr().err
    assert "'hybrid' model, which has no Hugging Face classes" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()
