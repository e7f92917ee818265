"""`model.vocab_size: auto`: the dataset tokenizer's vocabulary padded to a multiple of 128 x
parallel.tensor (Megatron-LM's rule), for byte-level, trained-BPE and given-tokenizer.json datasets at
tensor-parallel sizes 1 and 2; the run records the number; explicit sizes are still checked.
(tests/evaluation/test_hf_export.py trains a tp=2 run on 2 CPU processes with auto.)"""

import math

import pytest
import torch
import yaml

from sessa_scale.cli import main
from sessa_scale.config import ConfigError, load_config, load_config_with_sources
from sessa_scale.data import ByteTokenizer, HFTokenizer, write_dataset

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def megatron_padded(vocab: int, tensor: int) -> int:
    """Megatron-LM's _vocab_size_with_padding with make_vocab_size_divisible_by=128."""
    multiple = 128 * tensor
    return math.ceil(vocab / multiple) * multiple


def _texts(n=60):
    gen = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (40,), generator=gen).tolist()) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """{kind: (dataset dir, tokenizer vocabulary)} for byte, trained BPE and a given tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("vocab")
    (root / "in").mkdir()
    for i, text in enumerate(_texts()):
        (root / "in" / f"{i:02d}.txt").write_text(text)
    prep = ["--seq-len", "16", "--val-fraction", "0.1", "--no-progress"]
    assert main(["prep", str(root / "in"), "--out", str(root / "bpe"), "--tokenizer", "bpe", "--bpe-vocab-size", "300", *prep]) == 0
    words = {w: i for i, w in enumerate(["<eos>", "[UNK]", *WORDS, ".", *(f"w{i}" for i in range(700))])}
    given = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    given.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    given.save(str(root / "given.json"))
    assert main(["prep", str(root / "in"), "--out", str(root / "json"), "--tokenizer", str(root / "given.json"), *prep]) == 0
    write_dataset(_texts(), root / "byte", ByteTokenizer(), seq_len=16, val_fraction=0.1)
    return {
        "byte": (root / "byte", ByteTokenizer().vocab_size),
        "bpe": (root / "bpe", HFTokenizer(root / "bpe" / "tokenizer.json").vocab_size),
        "tokenizer.json": (root / "json", HFTokenizer(root / "given.json").vocab_size),
    }


@pytest.mark.parametrize("tensor", [1, 2])
@pytest.mark.parametrize("kind", ["byte", "bpe", "tokenizer.json"])
def test_auto_pads_the_dataset_vocabulary_to_128_x_tensor(datasets, kind, tensor):
    path, vocab = datasets[kind]
    cfg, sources = load_config_with_sources(
        None, [f"data.path={path}", "data.seq_len=16", "model.vocab_size=auto", f"parallel.tensor={tensor}"]
    )
    assert cfg.model.vocab_size == megatron_padded(vocab, tensor) >= vocab
    assert f"auto: {vocab} tokens of {path}" in sources["model.vocab_size"] and "command line" in sources["model.vocab_size"]


def test_the_sizes_differ_where_the_rule_says(datasets):
    assert (datasets["byte"][1], datasets["bpe"][1], datasets["tokenizer.json"][1]) == (257, 300, 715)
    assert [megatron_padded(v, t) for v in (257, 300, 715) for t in (1, 2)] == [384, 512, 384, 512, 768, 768]


def test_auto_without_a_dataset_is_the_byte_level_corpus():
    cfg, sources = load_config_with_sources("configs/sessa/tiny.yaml", ["model.vocab_size=auto", "parallel.tensor=2"])
    assert cfg.model.vocab_size == 512 and "257 tokens of the embedded stdlib corpus" in sources["model.vocab_size"]


def test_a_run_trains_with_the_resolved_size_and_records_it(datasets, tmp_path):
    path, vocab = datasets["tokenizer.json"]
    overrides = [f"run.dir={tmp_path / 'r'}", f"data.path={path}", "data.seq_len=16", "model.vocab_size=auto", "model.d_model=32",
                 "model.n_layers=1", "model.n_heads=2", "train.max_steps=1", "train.micro_batch_size=2",
                 "train.eval_interval=0", "logging.progress=false"]  # fmt: skip
    assert main(["train", *overrides]) == 0
    recorded = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["model"]["vocab_size"]
    from sessa_scale.checkpoint.merge import load_model

    model, cfg, _ = load_model(tmp_path / "r")
    assert recorded == cfg.model.vocab_size == model.embed.weight.shape[0] == megatron_padded(vocab, 1) == 768


def test_bad_auto_values_and_explicit_sizes_are_reported(datasets, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"model.vocab_size: expected an integer or auto, got 'automatic'"):
        load_config(None, ["model.vocab_size=automatic"])
    with pytest.raises(ConfigError, match=r"model.vocab_size: auto reads the vocabulary.*does not exist"):
        load_config(None, ["model.vocab_size=auto", f"data.path={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match=r"model.vocab_size: 257 is not divisible by parallel.tensor=2"):
        load_config(None, ["model.vocab_size=257", "parallel.tensor=2"])
    path, _ = datasets["bpe"]
    assert main(["train", f"data.path={path}", "data.seq_len=16", "model.vocab_size=257", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "has 300 tokens, more than model.vocab_size=257; set model.vocab_size >= 300" in err and "Traceback" not in err
