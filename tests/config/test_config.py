"""Config loading, inheritance, overrides, validation, serialization, shipped configs and
`sessa-scale params`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sessa_scale.cli import main
from sessa_scale.config import Config, ConfigError, config_from_dict, config_to_dict, load_config, save_config
from sessa_scale.models.registry import count_parameters
from tests.helpers import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))
SIZES = {"125m": 125e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9, "2.7b": 2.7e9, "7b": 7e9}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_error(path, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)  # one paragraph
    return info.value


def test_defaults_are_valid():
    assert load_config(None) == Config()
    assert config_from_dict(config_to_dict(Config()), "defaults") == Config()


def test_tiny_yaml_spells_out_exactly_the_defaults():
    path = CONFIGS / "sessa" / "tiny.yaml"
    assert load_config(path) == Config()
    raw = yaml.safe_load(path.read_text())
    defaults = config_to_dict(Config())
    assert {s: sorted(v) for s, v in raw.items()} == {s: sorted(v) for s, v in defaults.items()}


def test_configs_are_shipped():
    assert {p.stem for p in (CONFIGS / "sessa").glob("*.yaml")} >= {"tiny", *SIZES}


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIGS)) for p in SHIPPED])
def test_every_shipped_config_loads_and_counts(path):
    cfg = load_config(path)
    count = count_parameters(cfg.model)
    assert 0 < count.non_embedding < count.total


@pytest.mark.parametrize("size", sorted(SIZES))
def test_gpu_sizes_inherit_the_gpu_base(size):
    cfg = load_config(CONFIGS / "sessa" / f"{size}.yaml")
    assert cfg.run.name == f"sessa-{size}"
    assert (cfg.train.precision, cfg.data.seq_len, cfg.model.vocab_size) == ("bf16", 2048, 50304)
    assert (cfg.model.init, cfg.model.tie_embeddings, cfg.checkpoint.interval) == ("scaled", True, 1000)
    assert 0 < cfg.optim.min_lr < cfg.optim.lr <= 6e-4


def test_base_inheritance_relative_paths_lists_and_deep_merge(tmp_path):
    write(tmp_path / "common" / "a.yaml", "model:\n  d_model: 64\n  n_layers: 3\ntrain:\n  max_steps: 7\n")
    write(tmp_path / "common" / "b.yaml", "model:\n  n_layers: 5\ndata:\n  seq_len: 32\n")
    top = write(tmp_path / "exp" / "top.yaml", "base: [../common/a.yaml, ../common/b.yaml]\ndata:\n  seq_len: 16\n")
    cfg = load_config(top)
    assert (cfg.model.d_model, cfg.model.n_layers) == (64, 5)  # merged key by key, later base wins
    assert (cfg.train.max_steps, cfg.data.seq_len) == (7, 16)  # the file itself wins over its bases
    assert cfg.model.n_heads == Config().model.n_heads

    chained = write(tmp_path / "exp" / "chained.yaml", "base: top.yaml\nmodel:\n  d_model: 32\n")
    assert load_config(chained).model.d_model == 32
    assert load_config(chained).model.n_layers == 5


def test_base_cycle_and_missing_base(tmp_path):
    write(tmp_path / "a.yaml", "base: sub/b.yaml\n")
    write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\n")
    err = config_error(tmp_path / "a.yaml")
    assert "cycle" in str(err) and "a.yaml" in str(err) and "b.yaml" in str(err)
    assert "cycle" in str(config_error(write(tmp_path / "self.yaml", "base: self.yaml\n")))

    err = config_error(write(tmp_path / "c.yaml", "base: nowhere.yaml\n"))
    assert "c.yaml: base: file not found" in str(err) and "nowhere.yaml" in str(err)
    assert "base: expected a path" in str(config_error(write(tmp_path / "d.yaml", "base: 3\n")))


def test_overrides_types_null_nested_and_order(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  n_kv_heads: 2\n")
    cfg = load_config(
        path,
        [
            "train.max_steps=30",
            "model.n_kv_heads=null",
            "run.name=foo",
            "optim.lr=3e-4",  # YAML reads 3e-4 as a string; float fields accept it
            "model.rope=false",
            "run.dir=/tmp/x",
            "train.max_steps=31",  # later wins
        ],
    )
    assert (cfg.train.max_steps, cfg.model.n_kv_heads, cfg.run.name) == (31, None, "foo")
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert (cfg.model.rope, cfg.run.dir) == (False, "/tmp/x")
    # string fields keep the text as written, even where YAML would read a number or boolean
    assert load_config(None, ["run.name=350", "train.resume=none"]).run.name == "350"
    assert load_config(None, ["run.name=yes"]).run.name == "yes"
    assert load_config(None, ["model={d_model: 64, n_heads: 2}"]).model.n_heads == 2


def test_bad_overrides_are_all_reported():
    err = config_error(None, ["train.max_steps", "=3", "train.max_steps=many", "zero.stage=5"])
    assert len(err.problems) == 4
    assert all(p.startswith("command line: ") for p in err.problems)
    text = str(err)
    assert "'train.max_steps': an override must look like section.key=value" in text
    assert "train.max_steps: expected an integer, got 'many'" in text
    assert "zero.stage: must be 0, 1, 2 or 3, got 5" in text


def test_unknown_keys_get_did_you_mean(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  dmodel: 3\ntrian:\n  max_steps: 3\nmax_steps: 3\noptim:\n  max_steps: 2\n")
    err = config_error(path)
    text = str(err)
    assert len(err.problems) == 4
    assert "c.yaml: model.dmodel: unknown key; did you mean model.d_model?" in text
    assert "c.yaml: trian: unknown section; did you mean train?" in text
    assert "c.yaml: max_steps: unknown section; did you mean train.max_steps" in text
    assert "c.yaml: optim.max_steps: unknown key; did you mean train.max_steps?" in text
    assert "the keys of data are source, seq_len" in str(config_error(None, ["data.zzz=1"]))


def test_every_problem_is_reported_at_once_naming_file_and_key(tmp_path):
    write(tmp_path / "base.yaml", "optim:\n  lr: 0\n")
    path = write(
        tmp_path / "bad.yaml",
        "base: base.yaml\n"
        "model:\n  d_model: big\n  n_heads: 5\n"
        "train:\n  max_steps: 0\n  precision: fp16\n  micro_batch_size: 2.5\n"
        "data:\n  val_fraction: 0.9\n  source: web\n"
        "optim:\n  beta2: 1.0\n  min_lr: -1\n  decay_steps: 10\n  warmup_steps: 20\n"
        "checkpoint:\n  keep: 0\n"
        "logging:\n  wandb_mode: loud\n  progress: 1\n",
    )
    err = config_error(path, ["zero.stage=4", "train.compile_mode=fast"])
    expected = {
        "bad.yaml: model.d_model: expected an integer, got 'big'",
        "bad.yaml: model.n_heads: 5 does not divide",  # from the model registry
        "bad.yaml: train.max_steps: must be >= 1, got 0",
        "bad.yaml: train.precision: must be one of auto, fp32, bf16, got 'fp16'",
        "bad.yaml: train.micro_batch_size: expected an integer, got 2.5",
        "bad.yaml: data.val_fraction: must be in (0, 0.5], got 0.9",
        "bad.yaml: data.source: must be one of stdlib, got 'web'",
        "bad.yaml: optim.beta2: must be in [0, 1), got 1.0",
        "bad.yaml: optim.min_lr: must be >= 0, got -1.0",
        "bad.yaml: optim.decay_steps: must be null",
        "base.yaml: optim.lr: must be > 0, got 0.0",  # set by the base file
        "bad.yaml: checkpoint.keep: must be >= 1, got 0",
        "bad.yaml: logging.wandb_mode: must be one of online, offline, disabled, got 'loud'",
        "bad.yaml: logging.progress: expected true or false, got 1",
        "command line: zero.stage: must be 0, 1, 2 or 3, got 4",
        "command line: train.compile_mode: must be one of default, max-autotune-no-cudagraphs, got 'fast'",
    }
    text = str(err)
    assert text.startswith(f"invalid configuration, {len(err.problems)} problems: (1) ")
    missing = [e for e in expected if e not in text]
    assert not missing, text
    assert len(err.problems) == len(expected)


def test_train_compile_is_a_boolean():
    assert load_config(None).train.compile is False
    assert load_config(None, ["train.compile=true"]).train.compile is True
    assert "command line: train.compile: expected true or false, got 1" in str(config_error(None, ["train.compile=1"]))


def test_model_problems_from_defaults_name_their_source():
    # n_heads stays at its default; the problem names where the model section was last set
    err = config_error(None, ["model.d_model=130"])
    assert err.problems == ["command line: model.n_heads: 4 does not divide d_model=130; use a positive divisor of d_model"]
    err = config_error(None, ["optim.lr=1e-4"])
    assert err.problems == ["command line: optim.min_lr: must be <= optim.lr (0.0001), got 0.0002"]


def test_bad_yaml_reports_line_number(tmp_path):
    err = config_error(write(tmp_path / "syn.yaml", "model:\n  d_model: 64\n   n_heads: 2\n"))
    assert "syn.yaml: line 3" in str(err) and "invalid YAML" in str(err)
    err = config_error(write(tmp_path / "dup.yaml", "model:\n  d_model: 64\n  d_model: 32\n"))
    assert "dup.yaml: line 3" in str(err) and "duplicate key 'd_model'" in str(err)


def test_file_level_errors(tmp_path):
    assert "nope.yaml: config file not found" in str(config_error(tmp_path / "nope.yaml"))
    assert "an override is written" in str(config_error(tmp_path / "train.max_steps"))
    err = config_error(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    assert "list.yaml: the top level must be a mapping of sections" in str(err) and "got a list" in str(err)
    assert load_config(write(tmp_path / "empty.yaml", "# nothing\n")) == Config()
    assert load_config(write(tmp_path / "empty_section.yaml", "model:\n")) == Config()
    err = config_error(write(tmp_path / "scalar_section.yaml", "model: 3\n"))
    assert "model: expected a mapping of model keys, got 3" in str(err)


def test_round_trip_dict_and_yaml(tmp_path):
    cfg = load_config(CONFIGS / "sessa" / "125m.yaml", ["model.n_kv_heads=4", "run.dir=/tmp/r", "optim.decay_steps=5000"])
    d = config_to_dict(cfg)
    assert json.loads(json.dumps(d)) == d  # plain values only (checkpoints embed it)
    assert config_from_dict(d, "checkpoint meta.json") == cfg
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]
    assert config_from_dict({"model": {"d_model": 64}}, "x").model.d_model == 64  # missing keys: defaults


def test_config_from_dict_validates_naming_the_source():
    err = pytest.raises(ConfigError, config_from_dict, {"model": {"d_modle": 64}, "train": {"max_steps": -1}}, "ckpt/meta.json")
    problems = err.value.problems
    assert problems[0].startswith("ckpt/meta.json: model.d_modle: unknown key; did you mean model.d_model?")
    assert problems[1] == "ckpt/meta.json: train.max_steps: must be >= 1, got -1"
    assert "ckpt/meta.json" in str(pytest.raises(ConfigError, config_from_dict, [1], "ckpt/meta.json").value)


def test_params_json(capsys):
    paths = [str(CONFIGS / "sessa" / f"{size}.yaml") for size in SIZES]
    assert main(["params", *paths, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["config"] for r in rows] == paths
    for row, size in zip(rows, SIZES):
        assert set(row) == {"config", "arch", "params", "non_embedding_params", "vs_first"}
        assert row["arch"] == "sessa"
        assert isinstance(row["params"], int) and isinstance(row["non_embedding_params"], int)
        assert row["non_embedding_params"] < row["params"]
        assert abs(row["params"] / SIZES[size] - 1) < 0.10, (size, row["params"])
        assert row["params"] - row["non_embedding_params"] == 50304 * load_config(row["config"]).model.d_model


def test_params_table_and_overrides(capsys):
    assert main(["params", "--json", "model.n_layers=1", "model.tie_embeddings=false"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["config"] == "(defaults)"
    assert row["params"] - row["non_embedding_params"] == 2 * 257 * 128  # embedding + untied head
    assert main(["params", str(CONFIGS / "sessa" / "125m.yaml")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["config", "arch", "params", "exact", "non-embedding", "exact", "vs-first"]
    count = count_parameters(load_config(CONFIGS / "sessa" / "125m.yaml").model)
    assert f"{count.total:,}" in table[1] and f"{count.non_embedding:,}" in table[1]


def test_params_errors_exit_2(capsys, tmp_path):
    assert main(["params", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "missing.yaml: config file not found" in err and err.count("\n") == 1
    assert main(["params", "model.n_layers=1", "--bogus"]) == 2
    assert "unknown option --bogus" in capsys.readouterr().err
    assert main(["params", "model.d_model=big"]) == 2
    assert "command line: model.d_model: expected an integer, got 'big'" in capsys.readouterr().err


def test_the_triton_solver_without_cuda_is_named_as_needing_cuda():
    from sessa_scale.ops.feedback_solve import FEEDBACK_SOLVE_IMPLS

    if "triton" in FEEDBACK_SOLVE_IMPLS:
        pytest.skip("the Triton solver is available here (CUDA, or TRITON_INTERPRET=1)")
    with pytest.raises(ConfigError, match=r"model\.solver: 'triton' needs CUDA .*use auto \(= chunked there\), chunked or dense"):
        load_config(None, ["model.solver=triton"])
    with pytest.raises(ConfigError, match=r"unknown feedback solver 'trition'"):
        load_config(None, ["model.solver=trition"])
