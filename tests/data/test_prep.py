"""`sessa-scale prep`: inputs (text, directories, JSONL, Parquet), tokenizers (byte, trained BPE,
a tokenizer.json), determinism across runs and worker counts, and bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from sessa_scale.cli import main
from sessa_scale.data.reader import load_manifest, open_split
from sessa_scale.data.tokenizer import HFTokenizer
from tests.helpers.shards import tar_samples

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _corpus(root, n=40, seed=0):
    """A directory of text files and a JSONL file with a blank line and an empty document."""
    rng = np.random.default_rng(seed)
    (root / "txt").mkdir(parents=True)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 80)))) + "\n" for _ in range(n)]
    for i, t in enumerate(texts[: n // 2]):
        (root / "txt" / f"{i:03d}.txt").write_text(t)
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts[n // 2 :])]
    (root / "docs.jsonl").write_text("\n".join(lines[:3] + ["", json.dumps({"text": "  "})] + lines[3:]) + "\n")
    return texts


def _prep(*args):
    return main(["prep", *[str(a) for a in args], "--no-progress"])


def _shard_bytes(path):
    m = load_manifest(path)
    return {s["file"]: (path / s["file"]).read_bytes() for split in m["splits"].values() for s in split["shards"]}


def test_byte_prep_is_deterministic_across_runs_and_workers(tmp_path):
    texts = _corpus(tmp_path / "in")
    inputs = [tmp_path / "in" / "txt", tmp_path / "in" / "docs.jsonl"]
    assert _prep(*inputs, "--out", tmp_path / "a", "--seq-len", 17, "--val-fraction", 0.2, "--workers", 1, "--shard-mb", 0.01) == 0
    assert _prep(*inputs, "--out", tmp_path / "b", "--seq-len", 17, "--val-fraction", 0.2, "--workers", 2, "--shard-mb", 0.01) == 0
    a, b = _shard_bytes(tmp_path / "a"), _shard_bytes(tmp_path / "b")
    assert len(a) > 2 and a == b
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    m = load_manifest(tmp_path / "a")
    assert m["stats"]["empty_skipped"] == 1 and m["stats"]["documents"] == len(texts)
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == len(texts)
    # every kept document in input order (sorted files, then JSONL lines), EOS after each, packed
    for split in ("train", "val"):
        docs = [t.encode() + b"\0" for i, t in enumerate(texts) if _is_val(i, m) == (split == "val")]
        stream = np.concatenate([np.frombuffer(d, dtype=np.uint8).astype(np.int64) for d in docs])
        stream[np.cumsum([len(d) for d in docs]) - 1] = 256
        samples = tar_samples(tmp_path / "a", split)
        assert [samples[k].tolist() for k in sorted(samples)] == [
            stream[i * 17 : i * 17 + 18].tolist() for i in range((len(stream) - 1) // 17)
        ]


def _is_val(i, m):
    from sessa_scale.data.dataset import is_validation

    return is_validation(m["seed"], i, m["val_fraction"])


def test_bpe_is_trained_saved_and_deterministic(tmp_path):
    texts = _corpus(tmp_path / "in", n=60)
    args = [tmp_path / "in", "--tokenizer", "bpe", "--bpe-vocab-size", 300, "--seq-len", 9, "--val-fraction", 0.1]
    assert _prep(*args, "--out", tmp_path / "a", "--workers", 2) == 0
    assert _prep(*args, "--out", tmp_path / "b", "--workers", 1) == 0
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    m = load_manifest(tmp_path / "a")
    tok = HFTokenizer(tmp_path / "a" / "tokenizer.json")
    assert m["tokenizer"]["vocab_size"] == tok.vocab_size <= 300 and m["tokenizer"]["eos_id"] == tok.eos_id
    assert m["tokenizer"]["file"] == "tokenizer.json" and m["tokenizer"]["sha256"] == tok.sha256
    first = tar_samples(tmp_path / "a", "val")[0].tolist()
    text = texts[30]  # document 0: docs.jsonl sorts before txt/
    assert tok.decode(first) == text[: len(tok.decode(first))] and len(tok.decode(first)) > 9  # merges happened
    # a user-supplied tokenizer.json gives the same tokens as the trained one
    assert _prep(tmp_path / "in", "--tokenizer", tmp_path / "a" / "tokenizer.json", "--seq-len", 9, "--val-fraction", 0.1, "--out", tmp_path / "c") == 0
    assert _shard_bytes(tmp_path / "c") == _shard_bytes(tmp_path / "a")


def test_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"row {i} " + "x" * i for i in range(50)]
    pq.write_table(pa.table({"body": texts, "n": list(range(50))}), tmp_path / "t.parquet", row_group_size=16)
    assert _prep(tmp_path / "t.parquet", "--text-field", "body", "--out", tmp_path / "ds", "--seq-len", 8, "--val-fraction", 0) == 0
    m = load_manifest(tmp_path / "ds")
    assert m["splits"]["train"]["documents"] == 50
    assert m["splits"]["train"]["tokens"] == sum(len(t) + 1 for t in texts)
    assert open_split(tmp_path / "ds", "train").num_samples == (m["splits"]["train"]["tokens"] - 1) // 8
    assert _prep(tmp_path / "t.parquet", "--out", tmp_path / "x", "--seq-len", 8) == 2  # no column "text"


def test_large_jsonl_is_chunked_without_losing_or_repeating_lines(tmp_path, monkeypatch):
    import sessa_scale.data_prep.inputs as inputs

    monkeypatch.setattr(inputs, "CHUNK_BYTES", 100)
    lines = [json.dumps({"text": f"document {i} " + "y" * (i % 37)}) for i in range(60)]
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    units = inputs.expand_inputs([str(tmp_path / "big.jsonl")])
    assert len(units) > 10
    docs = [d.text for u in units for d in inputs.read_documents(u, "text", "error")]
    assert docs == [json.loads(line)["text"] for line in lines]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sessa_scale", "prep", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_bad_inputs_are_clear_errors_or_counted_skips(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("fine text " * 20)
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1 " * 10)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "wrong field"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "surrogate.jsonl").write_text('{"text": "a \\ud800 b"}\n')

    result = _cli(tmp_path / "good.txt", tmp_path / "bad.txt", "--out", tmp_path / "o1", "--seq-len", 8, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bad.txt: invalid UTF-8 at byte 3" in result.stderr and "--on-invalid skip" in result.stderr
    assert not (tmp_path / "o1").exists() and not list(tmp_path.glob("o1.partial*"))

    capsys.readouterr()
    assert _prep(tmp_path / "good.txt", tmp_path / "bad.txt", tmp_path / "surrogate.jsonl", tmp_path / "empty.txt",
                 "--on-invalid", "skip", "--out", tmp_path / "o2", "--seq-len", 8, "--val-fraction", 0) == 0
    stats = load_manifest(tmp_path / "o2")["stats"]
    assert (stats["invalid_utf8_skipped"], stats["empty_skipped"], stats["documents"]) == (2, 1, 1)
    assert "skipped 1 empty and 2 invalid-UTF-8" in capsys.readouterr().err

    cases = [
        ((tmp_path / "empty.txt", "--on-empty", "error"), "empty document"),
        ((tmp_path / "bad.jsonl",), "bad.jsonl:line 2: no string field 'text' (fields: txt)"),
        ((tmp_path / "broken.jsonl",), "broken.jsonl:line 2: not valid JSON"),
        ((tmp_path / "surrogate.jsonl",), "invalid UTF-8"),
        ((tmp_path / "missing.txt", tmp_path / "gone"), "input(s) not found"),
        ((tmp_path / "good.txt", "--tokenizer", tmp_path / "nope.json"), "does not exist"),
        ((tmp_path / "good.txt", "--tokenizer", tmp_path / "good.txt"), "not a valid Hugging Face tokenizer.json"),
        ((tmp_path / "good.txt", "--seq-len", 0, "--val-fraction", 2), "--seq-len must be >= 1"),
        ((tmp_path / "good.txt", "--seq-len", 8), "the train split holds 0 document(s)"),
    ]
    for i, (args, needle) in enumerate(cases):
        assert _prep(*args, "--out", tmp_path / f"e{i}") == 2, needle
        err = capsys.readouterr().err
        assert needle in err, (needle, err)
    assert _prep(tmp_path / "good.txt", "--out", tmp_path / "o2", "--val-fraction", 0) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_training_on_a_bpe_dataset_and_generating_with_its_tokenizer(tmp_path, capsys):
    _corpus(tmp_path / "in", n=80)
    assert _prep(tmp_path / "in", "--tokenizer", "bpe", "--bpe-vocab-size", 300, "--seq-len", 16, "--val-fraction", 0.1, "--out", tmp_path / "ds") == 0
    run = tmp_path / "run"
    common = [f"run.dir={run}", f"data.path={tmp_path / 'ds'}", "data.seq_len=16", "model.d_model=32", "model.n_layers=1",
              "model.n_heads=2", "train.micro_batch_size=4", "train.eval_batches=1", "logging.progress=false"]
    assert main(["train", *common, "model.vocab_size=300", "train.max_steps=2", "train.eval_interval=2"]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "alpha beta", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("alpha beta")
    from sessa_scale.config import load_config
    from sessa_scale.data.setup import tokenizer_for

    tok = tokenizer_for(load_config(str(run / "config.yaml")).data)  # what generate decoded with
    assert isinstance(tok, HFTokenizer) and tok.sha256 == load_manifest(tmp_path / "ds")["tokenizer"]["sha256"]
