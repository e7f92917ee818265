"""`sessa-scale synth`, `eval`, `probe` and `report` end to end on a tiny trained run: JSON output,
results saved into the run directory, plots written, and user errors."""

import json
import shutil

import pytest

from sessa_scale.cli import main

TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "data.seq_len=64",
    "train.micro_batch_size=4",
    "train.max_steps=3",
    "train.eval_interval=3",
    "train.eval_batches=1",
    "logging.progress=false",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny Sessa run trained on MQAR data written by `synth`."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "mqar-data"
    argv = ["synth", "mqar", "--num-pairs", "4,8", "--num-examples", "300", "--seed", "0"]
    assert main([*argv, "--out", str(data), "--seq-len", "64", "--val-fraction", "0.1"]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["seq_len"] == 64 and manifest["splits"]["val"]["samples"] > 0
    assert main(["train", f"run.dir={root / 'run'}", f"data.path={data}", *TINY]) == 0
    return root / "run"


def _json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_ppl_at_several_context_lengths(run_dir, capsys):
    r = _json(capsys, "eval", str(run_dir), "--task", "ppl", "--context-lengths", "8,32,65", "--max-tokens", "600", "--json")
    assert [x["context_length"] for x in r["lengths"]] == [8, 32, 65] and "mqar-data (val" in r["data"]
    for x in r["lengths"]:
        assert 0 < x["loss"] < 10 and x["ppl"] == pytest.approx(2.718281828 ** x["loss"], rel=1e-6)
        assert x["tokens"] % x["context_length"] == 0 and x["tokens"] <= 600 + x["context_length"]
    assert r["step"] == 3 and r["arch"] == "sessa"
    assert json.loads((run_dir / "eval" / "ppl.json").read_text()) == r


def test_eval_synthetic_tasks_and_answers_file(run_dir, tmp_path, capsys):
    mqar = _json(capsys, "eval", str(run_dir), "--task", "mqar", "--num-pairs", "3,6", "--num-examples", "4", "--json")
    assert mqar["n"] == 4 * (3 + 6) and mqar["chance"] == 0.1
    assert [x["n"] for x in mqar["by_length"]] == [12, 24]
    passkey = _json(
        capsys, "eval", str(run_dir), "--task", "passkey", "--lengths", "100,150", "--depths", "0,1",
        "--num-examples", "2", "--digits", "3", "--json",
    )
    assert passkey["n"] == 8 and [x["length"] for x in passkey["by_length"]] == [100, 150]

    records = tmp_path / "mqar.jsonl"
    assert main(["eval", "--task", "mqar", "--num-pairs", "3,6", "--num-examples", "4", "--write-jsonl", str(records)]) == 0
    answers = _json(capsys, "eval", str(run_dir), "--task", "answers", "--file", str(records), "--name", "mq", "--json")
    assert (answers["n"], answers["correct"], answers["by_length"]) == (mqar["n"], mqar["correct"], mqar["by_length"])
    assert (run_dir / "eval" / "mq.json").is_file()


@pytest.mark.parametrize(
    "task, options",
    [
        ("mqar", ["--num-pairs", "2,5", "--num-queries", "3", "--num-examples", "17", "--seed", "3"]),
        ("passkey", []),  # every task option at its default
    ],
)
def test_synth_writes_the_task_and_eval_write_data_is_its_alias(task, options, tmp_path, capsys):
    """`synth` writes exactly the dataset and records that write_dataset / write_records make of the
    task set; the older `eval --write-data/--write-jsonl` spelling writes byte-identical files."""
    from sessa_scale.data import ByteTokenizer, write_dataset
    from sessa_scale.evaluation.tasks import mqar_set, passkey_set, write_records

    dataset = ["--seq-len", "17", "--val-fraction", "0.2"]
    new, old = tmp_path / "new", tmp_path / "old"
    assert main(["synth", task, *options, *dataset, "--out", str(new), "--jsonl", str(tmp_path / "new.jsonl")]) == 0
    assert "sessa-scale synth: wrote" in capsys.readouterr().err
    alias = ["eval", "--task", task, *options, *dataset, "--write-data", str(old), "--write-jsonl", str(tmp_path / "old.jsonl")]
    assert main(alias) == 0
    assert "`sessa-scale synth TASK --out DIR --jsonl FILE` is the new spelling" in capsys.readouterr().err

    tasks = mqar_set(3, 17, [2, 5], 3) if task == "mqar" else passkey_set(1, 8, [256, 512, 1024], [0.0, 0.25, 0.5, 0.75, 1.0])
    write_dataset(tasks.documents, tmp_path / "ref", ByteTokenizer(), 17, 0.2, seed=3 if task == "mqar" else 1)
    write_records(tasks.records, tmp_path / "ref.jsonl")
    files = sorted(f.name for f in (tmp_path / "ref").iterdir())
    assert len(files) >= 3  # manifest, train and val shards
    for out in (new, old):
        assert sorted(f.name for f in out.iterdir()) == files
        for name in files:
            assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), (out, name)
        assert (tmp_path / f"{out.name}.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


def test_synth_overwrites_nothing_without_overwrite(tmp_path, capsys):
    records, data = tmp_path / "mqar.jsonl", tmp_path / "data"
    argv = ["synth", "mqar", "--num-pairs", "3", "--num-examples", "5", "--seq-len", "17"]
    assert main([*argv, "--jsonl", str(records), "--out", str(data)]) == 0
    saved = records.read_bytes(), (data / "manifest.json").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--seed", "2", "--jsonl", str(records)]) == 2
    assert main([*argv, "--seed", "2", "--out", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"--jsonl {records} already exists; pass --overwrite" in err and "Traceback" not in err
    assert (records.read_bytes(), (data / "manifest.json").read_bytes()) == saved
    assert main([*argv, "--seed", "2", "--jsonl", str(records), "--out", str(data), "--overwrite"]) == 0
    assert records.read_bytes() != saved[0] and (data / "manifest.json").read_bytes() != saved[1]


def test_probe_model_and_uniform(run_dir, tmp_path, capsys):
    r = _json(capsys, "probe", str(run_dir), "--sequences", "1", "--lags", "10", "--json")
    assert r["length"] == 64 and r["fit_range"] == [4, 60] and r["arch"] == "sessa"
    assert (run_dir / "eval" / "probe.png").stat().st_size > 10_000
    u = _json(capsys, "probe", "--uniform", "--gamma", "0.6", "--length", "512", "--out", str(tmp_path / "u.png"), "--json")
    assert abs(u["beta"] - 0.4) < 0.02 and u["fit_range"] == [32, 508]
    assert (tmp_path / "u.png").stat().st_size > 10_000


def test_report_compares_runs(run_dir, tmp_path, capsys):
    main(["probe", str(run_dir), "--sequences", "1", "--lags", "10"])
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    capsys.readouterr()
    assert main(["report", str(run_dir), str(other), "--out", str(tmp_path / "rep")]) == 0
    table = (tmp_path / "rep" / "report.md").read_text()
    assert "| run | arch | params |" in table and "| other | sessa |" in table
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["final_loss"] == metrics[-1]["loss"] and rows[0]["steps"] == 3
    for name in ("loss_vs_tokens", "influence_vs_lag"):
        assert (tmp_path / "rep" / f"{name}.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["probe"], "either a RUN_DIR_OR_CHECKPOINT or --uniform"),
        (["probe", "--uniform"], "needs --gamma"),
        (["probe", "--uniform", "--gamma", "1.5"], "strictly between 0 and 1"),
        (["eval", "--task", "mqar"], "needs a RUN_DIR_OR_CHECKPOINT"),
        (["eval", "nowhere", "--task", "ppl"], "does not exist"),
        (["eval", "--task", "passkey", "--depths", "2", "--write-jsonl", "x.jsonl"], "outside [0, 1]"),
        (["eval", "--task", "ppl", "--write-jsonl", "x.jsonl"], "synthetic tasks"),
        (["synth", "mqar"], "needs somewhere to write: --out DIR"),
        (["synth", "passkey", "--depths", "0,2", "--out", "ds"], "outside [0, 1]"),
        (["synth", "mqar", "--num-examples", "0", "--jsonl", "x.jsonl"], "--num-examples must be >= 1"),
        (["synth", "mqar", "--seq-len", "0", "--out", "ds"], "seq_len must be >= 1"),
        (["report", "nowhere", "--out", "rep"], "not a run directory"),
    ],
)
def test_user_errors_are_one_paragraph(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("vocab", [257, 300])  # the model's size (silently wrong), larger (IndexError)
def test_eval_data_with_another_tokenizer_is_refused_and_overwrites_nothing(run_dir, tmp_path, capsys, vocab):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(40):
        (texts / f"{i}.txt").write_text(f"document {i}: " + "alpha beta gamma delta " * (i % 7 + 3))
    other = tmp_path / "bpe"
    argv = ["prep", str(texts), "--out", str(other), "--tokenizer", "bpe", "--bpe-vocab-size", str(vocab)]
    assert main([*argv, "--seq-len", "64", "--val-fraction", "0.2", "--no-progress"]) == 0
    main(["eval", str(run_dir), "--task", "ppl", "--context-lengths", "32", "--max-tokens", "200"])
    saved = (run_dir / "eval" / "ppl.json").read_bytes()
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--task", "ppl", "--data", str(other), "--max-tokens", "200"]) == 2
    err = capsys.readouterr().err
    assert f"--data {other} is tokenized with" in err and "but the model was trained on byte" in err
    assert "Traceback" not in err and (run_dir / "eval" / "ppl.json").read_bytes() == saved


def test_report_to_an_unwritable_out_is_one_paragraph(run_dir, capsys):
    assert main(["report", str(run_dir), "--out", "/proc/nope/report"]) == 2
    assert "cannot create --out /proc/nope/report (in /proc): no such file or directory (ENOENT)" in capsys.readouterr().err
