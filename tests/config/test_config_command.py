"""`sessa-scale config` (the resolved config with the source of every value, parameters, FLOPs per
token, tokens per step) and `sessa-scale train --dry-run` (model and one batch, no training)."""

import json

import pytest

from sessa_scale.cli import main
from sessa_scale.config import load_config
from sessa_scale.models.registry import count_parameters, count_training_flops

CONFIG = "configs/transformer/125m.yaml"


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_config_json_names_the_source_of_every_value(capsys):
    rc, out, _ = _run(capsys, "config", CONFIG, "train.micro_batch_size=4", "--world-size", "8", "--json")
    r = json.loads(out)
    cfg = load_config(CONFIG, ["train.micro_batch_size=4"])
    assert rc == 0 and r["config"]["model"]["n_layers"] == 12 and r["config"]["train"]["micro_batch_size"] == 4
    assert r["sources"]["model.n_layers"] == CONFIG  # the file itself
    assert r["sources"]["model.d_model"] == "configs/base/125m.yaml"  # a base it inherits
    assert r["sources"]["train.precision"] == "configs/base/gpu.yaml"  # the base's base
    assert r["sources"]["train.micro_batch_size"] == "command line"
    assert r["sources"]["run.seed"] == "defaults"
    assert set(r["sources"]) == {f"{s}.{k}" for s, keys in r["config"].items() for k in keys}
    s = r["summary"]
    assert (s["params"], s["non_embedding_params"]) == tuple(count_parameters(cfg.model))
    assert s["training_flops_per_token"] == count_training_flops(cfg.model, 2048) == 3 * s["forward_flops_per_token"]
    assert s["tokens_per_step"] == 4 * 1 * 8 * 2048 and s["data_parallel"] == 8


def test_config_table_and_world_size_divided_by_tensor(capsys):
    rc, out, _ = _run(capsys, "config", CONFIG, "parallel.tensor=2", "train.grad_accum_steps=3", "--world-size", "8")
    assert rc == 0
    lines = out.splitlines()
    assert any(line.split() == ["parallel.tensor", "2", "#", "command", "line"] for line in lines)
    assert any(line.split()[:2] == ["model.arch", "transformer"] and line.endswith(f"# {CONFIG}") for line in lines)
    assert "tokens per optimizer step: 196,608 = micro_batch_size 8 x grad_accum_steps 3 x 4 data-parallel" in out
    rc, _, err = _run(capsys, "config", CONFIG, "parallel.tensor=2", "--world-size", "3")
    assert rc == 2 and "--world-size 3 is not a positive multiple of parallel.tensor=2" in err


def test_config_reports_invalid_input_like_train(capsys):
    rc, _, err = _run(capsys, "config", CONFIG, "model.n_heads=7")
    assert rc == 2 and "model.n_heads: 7 does not divide d_model=768" in err and "Traceback" not in err


def test_dry_run_builds_the_model_and_one_batch_and_trains_nothing(tmp_path, capsys):
    from sessa_scale.data import ByteTokenizer, write_dataset

    write_dataset([f"document {i} " * 20 for i in range(50)], tmp_path / "ds", ByteTokenizer(), seq_len=17, val_fraction=0.1)
    run_dir = tmp_path / "run"
    args = ["train", CONFIG, f"data.path={tmp_path / 'ds'}", "data.seq_len=17", "train.micro_batch_size=3",
            f"run.dir={run_dir}", "--dry-run"]  # fmt: skip
    rc, out, _ = _run(capsys, *args)
    assert rc == 0 and not run_dir.exists()  # nothing written: no run directory, no checkpoint
    assert "transformer model built" in out and "inputs and targets (3, 17) torch.int64" in out
    assert f"parameters: {count_parameters(load_config(CONFIG).model).total:,}" in out
    rc, _, err = _run(capsys, *args[:-1], "model.vocab_size=200", "--dry-run")
    assert rc == 2 and "set model.vocab_size >= 257" in err


@pytest.mark.parametrize("bad", ["data.path=/nonexistent/dataset", "model.d_model=100"])
def test_dry_run_errors_are_user_errors(bad, capsys):
    rc, _, err = _run(capsys, "train", bad, "--dry-run")
    assert rc == 2 and "Traceback" not in err and err.startswith("sessa-scale train: error:")
