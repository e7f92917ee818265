"""From the `data:` config to the trainer's streams: resolve the sources (data.path, data.sources
or the embedded corpus), check them against each other and the model, and build the training
stream and the fixed validation batches of one data-parallel rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sessa_scale.config import Config, DataConfig
from sessa_scale.data.corpus import prepare_stdlib
from sessa_scale.data.loader import SampleSequence, ShardStream, StreamSpec, eval_batches
from sessa_scale.data.reader import SplitInfo, is_local, load_manifest, open_split, resolve
from sessa_scale.data.tokenizer import ByteTokenizer, HFTokenizer
from sessa_scale.errors import UserError


@dataclass
class TokenCorpus:
    """The validation split of the configured data as one token stream (for evaluation)."""

    val: torch.Tensor  # (N,) int64: the split's documents in order, EOS after each (the packed tail excluded)
    vocab_size: int
    eos_id: int
    description: str


@dataclass
class TrainingData:
    train: ShardStream
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    tokenizer: dict  # the manifest's tokenizer identity (shared by all sources)
    description: str


def resolve_sources(cfg: Config) -> list[tuple[str, float]]:
    """(location, weight) of every source; prepares the embedded corpus when no dataset is named."""
    d = cfg.data
    if d.sources:
        return [(str(s["path"]), float(s.get("weight", 1.0))) for s in d.sources]
    if d.path:
        return [(d.path, 1.0)]
    return [(str(prepare_stdlib(d)), 1.0)]


def _first_location(d: DataConfig) -> str:
    return str(d.sources[0]["path"]) if d.sources else d.path or str(prepare_stdlib(d))


def tokenizer_for(d: DataConfig):
    """The tokenizer a run's data was prepared with (ByteTokenizer, or HFTokenizer from the
    dataset's tokenizer.json), e.g. to encode prompts and decode samples of a trained model."""
    if not d.sources and not d.path:
        return ByteTokenizer()
    location = _first_location(d)
    tok = load_manifest(location)["tokenizer"]
    if tok["kind"] == "byte":
        return ByteTokenizer()
    if not is_local(location):
        raise UserError(f"{location}: decoding needs its tokenizer.json on local disk; copy the dataset directory here")
    return HFTokenizer(resolve(location, tok.get("file") or "tokenizer.json"), tok.get("eos_token"))


def load_corpus(d: DataConfig) -> TokenCorpus:
    """The validation tokens of the first source of `d` (data.sources, data.path or the embedded
    corpus), re-joined from its packed samples in key order (consecutive samples share a token)."""
    location = _first_location(d)
    info = open_split(location, "val")
    sequence = SampleSequence(StreamSpec([info], [1.0], shuffle=False, verify=d.verify_checksums))
    _, samples = sequence.read(0, info.num_samples)
    val = torch.cat([samples[0], samples[1:, 1:].reshape(-1)])
    tok = info.tokenizer
    return TokenCorpus(val, tok["vocab_size"], tok["eos_id"], f"{location} (val, {val.numel():,} tokens, {tok['name']})")


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two tokenizer identities (manifest "tokenizer" entries) encode text the same way:
    kind, name, vocabulary size, EOS id, and the tokenizer.json hash when both have one."""
    keys = ["kind", "name", "vocab_size", "eos_id"] + (["sha256"] if a.get("sha256") and b.get("sha256") else [])
    return all(a.get(k) == b.get(k) for k in keys)


def run_tokenizer(d: DataConfig) -> dict:
    """The tokenizer identity of a run's data (byte-level for the embedded corpus, else its first
    source's manifest entry), for runs whose checkpoints predate recording it."""
    if not d.sources and not d.path:
        return ByteTokenizer().identity()
    return load_manifest(_first_location(d))["tokenizer"]


def check_eval_data(location: str, data_tokenizer: dict, model_tokenizer: dict, vocab_size: int) -> None:
    """A dataset scored by a trained model must be tokenized as the model's training data was (and
    fit its vocabulary); raises a UserError naming both tokenizers otherwise."""
    def show(tok: dict) -> str:
        return f"{tok.get('name')} ({tok.get('kind')}, vocab {tok.get('vocab_size')}, eos {tok.get('eos_id')})"

    if not same_tokenizer(data_tokenizer, model_tokenizer) or data_tokenizer["vocab_size"] > vocab_size:
        raise UserError(
            f"--data {location} is tokenized with {show(data_tokenizer)}, but the model was trained on "
            f"{show(model_tokenizer)} (model.vocab_size={vocab_size}): its losses would be meaningless. Pass a dataset "
            "prepared with the model's tokenizer (`sessa-scale prep ... --tokenizer` with the run's tokenizer.json), "
            "or leave out --data to score the run's own validation data."
        )


def check_sources(cfg: Config, locations: list[str], manifests: list[dict]) -> None:
    """Every source must match data.seq_len, share one tokenizer, and fit model.vocab_size.
    All problems are reported in one UserError."""
    problems = []
    first = manifests[0]["tokenizer"]
    for where, m in zip(locations, manifests):
        if m["seq_len"] != cfg.data.seq_len:
            problems.append(
                f"{where} was prepared with --seq-len {m['seq_len']}, the run has data.seq_len={cfg.data.seq_len}: "
                f"set data.seq_len={m['seq_len']} or re-run prep with --seq-len {cfg.data.seq_len}"
            )
        tok = m["tokenizer"]
        if tok["vocab_size"] > cfg.model.vocab_size:
            problems.append(
                f"{where}: its tokenizer ({tok['name']}) has {tok['vocab_size']} tokens, more than "
                f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size >= {tok['vocab_size']}"
            )
        if not same_tokenizer(tok, first):
            problems.append(
                f"{where} uses tokenizer {tok['name']} (vocab {tok['vocab_size']}, eos {tok['eos_id']}) but "
                f"{locations[0]} uses {first['name']} (vocab {first['vocab_size']}, eos {first['eos_id']}); "
                "blended sources must share one tokenizer"
            )
    if problems:
        raise UserError("data: " + "; ".join(problems))


def _describe(locations: list[str], weights: list[float], infos: list[SplitInfo]) -> str:
    total = sum(weights)
    parts = [
        f"{loc} ({info.num_samples:,} samples{f', weight {w / total:.3f}' if len(locations) > 1 else ''})"
        for loc, w, info in zip(locations, weights, infos)
    ]
    return f"{', '.join(parts)}; tokenizer {infos[0].tokenizer['name']}"


def build_training_data(cfg: Config, dp_rank: int, dp_size: int, pin_memory: bool = False) -> TrainingData:
    """The training stream (seeded by run.seed) and validation batches of rank dp_rank."""
    d, t = cfg.data, cfg.train
    sources = resolve_sources(cfg)
    locations = [loc for loc, _ in sources]
    weights = [w for _, w in sources]
    manifests = [load_manifest(loc) for loc in locations]
    check_sources(cfg, locations, manifests)
    train = [open_split(loc, "train", m) for loc, m in zip(locations, manifests)]
    stream = ShardStream(
        StreamSpec(train, weights, cfg.run.seed, d.shuffle_buffer, True, d.verify_checksums, locations),
        t.micro_batch_size,
        t.grad_accum_steps,
        dp_rank,
        dp_size,
        d.num_workers,
        d.prefetch,
        pin_memory,
    )
    val_batches = []
    if t.eval_interval:
        with_val = [i for i, m in enumerate(manifests) if m["splits"]["val"]["samples"] > 0]
        if not with_val:
            raise UserError(
                f"data: no source has a validation split ({', '.join(locations)}); re-run prep with --val-fraction > 0 "
                "or set train.eval_interval=0"
            )
        val = StreamSpec(
            [open_split(locations[i], "val", manifests[i]) for i in with_val],
            [weights[i] for i in with_val],
            cfg.run.seed,
            shuffle=False,
            verify=d.verify_checksums,
        )
        val_batches = eval_batches(val, t.micro_batch_size, t.eval_batches, dp_rank, dp_size)
    return TrainingData(stream, val_batches, manifests[0]["tokenizer"], _describe(locations, weights, train))
