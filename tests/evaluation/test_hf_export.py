"""`sessa-scale export` and the transformers model classes: tiny trained runs of every architecture
exported and loaded with AutoModelForCausalLM (trust_remote_code) give our logits and our greedy
generations (also for left-padded batches and past the cache's first capacity); the tokenizer files
reproduce the run's tokenizer; a tp=2 checkpoint exports the weights of the same run at tp=1;
`model.init_from` starts training from an export. Skipped without the `hf` extra."""

import json

import pytest
import torch

pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")
pytest.importorskip("safetensors", reason="needs the hf extra: pip install -e '.[hf]'")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from sessa_scale.cli import main  # noqa: E402
from sessa_scale.data import ByteTokenizer, HFTokenizer  # noqa: E402
from sessa_scale.checkpoint.merge import load_model  # noqa: E402
from tests.helpers.torchrun import torchrun  # noqa: E402

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.seq_len=32", "data.corpus_bytes=200000",
    "train.micro_batch_size=4", "train.max_steps=4", "train.eval_interval=0", "optim.warmup_steps=1",
    "logging.progress=false",
]  # fmt: skip
ARCH_ARGS = {
    "sessa": ["model.arch=sessa"],
    "transformer": ["model.arch=transformer", "model.n_kv_heads=1"],
    "mamba2": ["model.arch=mamba2", "model.ssm_state=16", "model.ssm_head_dim=16", "model.ssm_chunk=16"],
}
CLASSES = {"sessa": "SessaForCausalLM", "transformer": "TransformerBaselineForCausalLM", "mamba2": "Mamba2BaselineForCausalLM"}
TEXTS = ["def f(x):\n    return x + 1\n", "  two  spaces\tand a tab", "héllo ünïcode 日本語 🎉", "", "\x00\x7f\r\n"]


def bpe_dataset(root):
    """A dataset prepared with a BPE trained on a small corpus (its tokenizer.json inside)."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    gen = torch.Generator().manual_seed(0)
    (root / "in").mkdir(parents=True)
    for i in range(60):
        idx = torch.randint(0, len(words), (int(torch.randint(20, 80, (1,), generator=gen)),), generator=gen)
        (root / "in" / f"{i:03d}.txt").write_text(" ".join(words[j] for j in idx.tolist()) + ".\n")
    args = ["prep", str(root / "in"), "--out", str(root / "ds"), "--tokenizer", "bpe", "--bpe-vocab-size", "300"]
    assert main([*args, "--seq-len", "32", "--val-fraction", "0.1", "--no-progress"]) == 0
    return root / "ds"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs of each architecture; mamba2 on a BPE dataset with model.vocab_size=auto."""
    root = tmp_path_factory.mktemp("hf")
    bpe = bpe_dataset(root / "bpe")
    out = {}
    for arch, args in ARCH_ARGS.items():
        data = [f"data.path={bpe}", "model.vocab_size=auto"] if arch == "mamba2" else []
        assert main(["train", f"run.dir={root / arch}", *TINY, *args, *data]) == 0
        out[arch] = root / arch
    return out


def export(run, out) -> None:
    assert main(["export", str(run), "--out", str(out)]) == 0


def greedy(model, prompt: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
    """transformers greedy decoding without stopping at EOS (sessa_scale's generate never stops)."""
    return model.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=None, **kwargs)


@pytest.mark.parametrize("arch", list(ARCH_ARGS))
def test_exported_model_gives_our_logits_and_greedy_generations(runs, arch, tmp_path):
    export(runs[arch], tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    ours, cfg, _ = load_model(runs[arch])
    assert type(hf).__name__ == CLASSES[arch] and hf.dtype == torch.float32 and not hf.training
    tok = ByteTokenizer() if cfg.data.path is None else HFTokenizer(cfg.data.path + "/tokenizer.json")
    gen = torch.Generator().manual_seed(1)

    def prompts(*shape):  # token ids of the tokenizer, without its EOS (the pad id: it would be taken for padding)
        ids = torch.randint(0, tok.vocab_size - 1, shape, generator=gen)
        return ids + (ids >= tok.eos_id).long()

    with torch.no_grad():
        for T in (1, 17, 65):
            x = prompts(2, T)
            torch.testing.assert_close(hf(x).logits, ours(x), rtol=0, atol=1e-5)
    for T in (1, 17):
        x = prompts(2, T)
        assert torch.equal(greedy(hf, x, 20), ours.generate(x, 20, temperature=0))
    # a batch padded on the left decodes each row as if alone; 140 new tokens outgrow the first cache
    short, long, eos = prompts(1, 5), prompts(1, 17), tok.eos_id
    batch = torch.cat([torch.cat([torch.full((1, 12), eos), short], 1), long])
    mask = (torch.arange(17)[None] >= torch.tensor([[12], [0]])).long()
    out = greedy(hf, batch, 140, attention_mask=mask)
    assert torch.equal(out[0, 12:], ours.generate(short, 140, temperature=0)[0])
    assert torch.equal(out[1], ours.generate(long, 140, temperature=0)[0])


@pytest.mark.parametrize("arch", list(ARCH_ARGS))
def test_beam_search_on_left_padded_prompts_equals_the_cache_free_forward(arch):
    """The cache's beam reordering and the per-padding groups against transformers re-running the whole
    sequence each step (use_cache=False: padded rows are run unpadded by the forward itself)."""
    import dataclasses

    from sessa_scale.config.schema import ModelConfig
    from sessa_scale.hf.configuration import CONFIG_CLASSES
    from sessa_scale.hf.modeling import CAUSAL_LM_CLASSES

    torch.manual_seed(0)
    small = ModelConfig(arch=arch, d_model=32, n_layers=2, n_heads=2, ssm_state=16, ssm_head_dim=16, ssm_chunk=16)
    hf = CAUSAL_LM_CLASSES[arch](CONFIG_CLASSES[arch](sessa_scale_model=dataclasses.asdict(small), eos_token_id=256)).eval()
    x = torch.randint(0, 256, (3, 7))
    mask = (torch.arange(7)[None] >= torch.tensor([[3], [0], [1]])).long()
    kwargs = dict(attention_mask=mask, max_new_tokens=9, num_beams=3, num_return_sequences=2, do_sample=False,
                  pad_token_id=256, return_dict_in_generate=True, output_scores=True)  # fmt: skip
    cached, recomputed = hf.generate(x, **kwargs), hf.generate(x, use_cache=False, **kwargs)
    assert cached.sequences.shape == (6, 16) and torch.equal(cached.sequences, recomputed.sequences)
    # the beams' scores: log-probabilities computed from the reordered states (an untrained model's argmax
    # would rarely notice a state left with the wrong beam, its probabilities do)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, rtol=0, atol=1e-5)


def test_byte_level_tokenizer_files_reproduce_the_byte_tokenizer(runs, tmp_path):
    export(runs["sessa"], tmp_path / "hf")
    tok, ours = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True), ByteTokenizer()
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == ours.encode(text) and tok.decode(ids) == text
        assert tok(text).input_ids == [ours.eos_id, *ours.encode(text)]  # EOS before a document, as in training
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (256, 256, 256)
    assert tok.decode([104, 0xC3]) == ours.decode([104, 0xC3]) == "h\ufffd"  # invalid UTF-8 -> U+FFFD


def test_bpe_tokenizer_is_exported_with_its_ids_and_eos(runs, tmp_path):
    export(runs["mamba2"], tmp_path / "hf")
    _, cfg, _ = load_model(runs["mamba2"])
    ours = HFTokenizer(f"{cfg.data.path}/tokenizer.json")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    for text in ["alpha beta gamma.", "mu lambda zeta kappa iota", *TEXTS]:
        assert tok(text, add_special_tokens=False).input_ids == ours.encode(text)
        assert tok(text).input_ids == [ours.eos_id, *ours.encode(text)]
    assert tok.eos_token == ours.eos_token and tok.eos_token_id == ours.eos_id
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 384 and ours.vocab_size <= 384  # auto: padded to a multiple of 128
    meta = json.loads((tmp_path / "hf" / "sessa_scale.json").read_text())
    assert meta["tokenizer"] == ours.identity() and meta["step"] == 4


def test_export_refuses_a_non_empty_directory_and_a_missing_checkpoint(runs, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["export", str(runs["sessa"]), "--out", str(tmp_path / "taken")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_tp2_checkpoint_exports_the_weights_of_the_same_run_at_tp1(tmp_path):
    # Both runs start from the same seeded full init (tp=2 splits it); a step with a negligible learning
    # rate keeps them equal, so the export must merge the two ranks' shards back into exactly tp=1's
    # layout. (With a real learning rate, AdamW's first steps turn 1e-8 gradient differences between the
    # layouts into lr-sized weight differences, which would hide nothing about the merge.)
    common = [*TINY, "train.max_steps=1", "optim.lr=1e-12", "optim.min_lr=0", "optim.warmup_steps=0"]
    torchrun("train.py", f"run.dir={tmp_path / 'tp2'}", "parallel.tensor=2", "model.vocab_size=auto", *common)
    assert main(["train", f"run.dir={tmp_path / 'tp1'}", "model.vocab_size=512", *common]) == 0  # auto at tp=2: 257 -> 512
    export(tmp_path / "tp2", tmp_path / "hf2")
    export(tmp_path / "tp1", tmp_path / "hf1")
    tp2, tp1 = load_file(tmp_path / "hf2" / "model.safetensors"), load_file(tmp_path / "hf1" / "model.safetensors")
    assert set(tp2) == set(tp1) and "model.layers.0.W_in.weight" in tp1 and "model.lm_head.weight" not in tp1
    for name, value in tp1.items():
        torch.testing.assert_close(tp2[name], value, rtol=0, atol=1e-7, msg=name)
    assert tp2["model.embed.weight"].shape == (512, 32)


def test_init_from_starts_training_from_an_export(runs, tmp_path, capsys):
    export(runs["sessa"], tmp_path / "hf")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    # a step with a negligible learning rate leaves the exported weights; without init_from they are a fresh init
    still = [*TINY, "train.max_steps=1", "optim.lr=1e-12", "optim.min_lr=0", "optim.warmup_steps=0"]
    assert main(["train", f"run.dir={tmp_path / 'from'}", f"model.init_from={tmp_path / 'hf'}", *still]) == 0
    assert main(["train", f"run.dir={tmp_path / 'fresh'}", "run.seed=7", *still]) == 0
    export(tmp_path / "from", tmp_path / "from_hf")
    export(tmp_path / "fresh", tmp_path / "fresh_hf")
    started, fresh = load_file(tmp_path / "from_hf" / "model.safetensors"), load_file(tmp_path / "fresh_hf" / "model.safetensors")
    for name, value in exported.items():
        torch.testing.assert_close(started[name], value, rtol=0, atol=1e-7, msg=name)
    assert (fresh["model.embed.weight"] - exported["model.embed.weight"]).abs().max() > 1e-2

    capsys.readouterr()
    bad = main(["train", f"run.dir={tmp_path / 'bad'}", f"model.init_from={tmp_path / 'hf'}", *still, "model.d_model=64"])
    err = capsys.readouterr().err
    assert bad == 2 and "model.d_model: the export has 32, this config 64" in err and "Traceback" not in err
    assert main(["train", f"run.dir={tmp_path / 'bad2'}", f"model.init_from={tmp_path / 'missing'}", *still]) == 2
    assert "does not exist" in capsys.readouterr().err
