"""`model.vocab_size: auto`: the embedding rows a run needs, from its data.

The vocabulary is the tokenizer's of the run's first data source (data.sources, data.path: its
manifest; no dataset named: the byte-level embedded corpus, 257 tokens). It is padded up to a
multiple of VOCAB_MULTIPLE x parallel.tensor, Megatron-LM's rule (`--make-vocab-size-divisible-by
128`, times the tensor-parallel size): every tensor-parallel rank gets an equal slice of the
embedding and LM head, and their row counts stay multiples of 128 (tensor-core friendly matrix
shapes). The padding rows are never a target, so training pushes their logits down.

Because the padding depends on parallel.tensor, a run started with `auto` records the resolved
number in RUN_DIR/config.yaml; resuming on another tensor-parallel size needs that number set
explicitly (any multiple of the new size works: resuming checks that the model is unchanged).
"""

from __future__ import annotations

from sessa_scale.config.schema import Config

VOCAB_MULTIPLE = 128
AUTO = "auto"


def padded_vocab_size(vocab: int, tensor: int) -> int:
    """vocab rounded up to a multiple of VOCAB_MULTIPLE x tensor."""
    multiple = VOCAB_MULTIPLE * tensor
    return -(-vocab // multiple) * multiple


def data_vocab_size(cfg: Config) -> tuple[int, str]:
    """(tokenizer vocabulary size, where it was read) of the run's data; raises UserError when a
    named dataset has no readable manifest."""
    from sessa_scale.data.tokenizer import ByteTokenizer

    d = cfg.data
    if not d.sources and not d.path:
        return ByteTokenizer.vocab_size, f"the embedded {d.source} corpus (byte-level)"
    from sessa_scale.data.reader import load_manifest

    location = str(d.sources[0]["path"]) if d.sources else d.path
    tokenizer = load_manifest(location)["tokenizer"]
    return int(tokenizer["vocab_size"]), f"{location} (tokenizer {tokenizer['name']})"


def resolve_vocab_size(cfg: Config) -> tuple[str | None, str | None]:
    """Replace model.vocab_size "auto" in cfg by its padded data vocabulary. Returns (how it was
    resolved, problem): both None when vocab_size is a number; problem when it cannot be resolved."""
    from sessa_scale.errors import UserError

    value = cfg.model.vocab_size
    if not isinstance(value, str):
        return None, None
    if value != AUTO:
        return None, f"expected an integer or {AUTO}, got {value!r}"
    if not isinstance(cfg.parallel.tensor, int) or cfg.parallel.tensor < 1:
        return None, "auto pads to a multiple of 128 x parallel.tensor, which must be an integer >= 1"
    try:
        vocab, where = data_vocab_size(cfg)
    except UserError as exc:
        return None, f"auto reads the vocabulary of the run's dataset, which failed: {exc}"
    except (LookupError, TypeError):  # a malformed data.sources, reported by its own check
        return None, "auto reads the vocabulary of the first data source, but data.sources is malformed"
    cfg.model.vocab_size = padded_vocab_size(vocab, cfg.parallel.tensor)
    note = f"auto: {vocab} tokens of {where}, padded to a multiple of {VOCAB_MULTIPLE} x parallel.tensor={cfg.parallel.tensor}"
    return note, None
