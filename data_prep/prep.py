"""`sessa-scale prep`: input corpora -> a tokenized dataset directory (sessa_scale/data/dataset.py).

Worker processes read and tokenize units (inputs.py) in parallel; the parent receives them in
input order and packs and writes the shards, so the output depends only on the inputs, the
tokenizer, seq_len, val_fraction and seed, never on --workers. Tokenizers: `byte` (256 bytes +
EOS), a Hugging Face tokenizer.json, or `bpe`: a byte-level BPE trained on the corpus with the
`tokenizers` library (first --bpe-train-bytes of text) and saved as DIR/tokenizer.json.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
import os
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sessa_scale.data_prep.inputs import Unit, expand_inputs, read_documents
from sessa_scale.data.dataset import DEFAULT_SHARD_BYTES, DatasetWriter, token_dtype
from sessa_scale.data.tokenizer import ByteTokenizer, HFTokenizer
from sessa_scale.errors import UserError

BPE_EOS = "<|endoftext|>"

_worker: dict = {}


def train_bpe(units: list[Unit], out: Path, vocab_size: int, text_field: str, on_invalid: str, max_bytes: int) -> Path:
    """Train a byte-level BPE (EOS = <|endoftext|>) on the first max_bytes of text; saves out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        seen = 0
        for unit in units:
            for doc in read_documents(unit, text_field, on_invalid):
                if doc.text and doc.text.strip():
                    yield doc.text
                    seen += len(doc.raw)
                    if seen >= max_bytes:
                        return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    tok.save(str(out))
    return out


def _init_worker(tokenizer_path: str | None, eos_token: str | None, text_field: str, on_invalid: str, on_empty: str) -> None:
    if tokenizer_path is not None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker.update(
        tokenizer=HFTokenizer(tokenizer_path, eos_token) if tokenizer_path else ByteTokenizer(),
        text_field=text_field,
        on_invalid=on_invalid,
        on_empty=on_empty,
    )


def tokenize_unit(unit: Unit) -> tuple[list[np.ndarray], dict] | str:
    """Tokens of each kept document of a unit (no EOS) and counts; or a UserError message."""
    tok = _worker["tokenizer"]
    dtype = token_dtype(tok.vocab_size)
    stats = {"input_bytes": 0, "documents": 0, "empty_skipped": 0, "invalid_utf8_skipped": 0}
    texts: list[str] = []
    raws: list[bytes] = []
    try:
        for doc in read_documents(unit, _worker["text_field"], _worker["on_invalid"]):
            stats["input_bytes"] += len(doc.raw)
            if doc.text is None:
                stats["invalid_utf8_skipped"] += 1
            elif not doc.text.strip():
                if _worker["on_empty"] == "error":
                    raise UserError(
                        f"{doc.where}: empty document; remove it or pass --on-empty skip (skipped ones are counted)"
                    )
                stats["empty_skipped"] += 1
            else:
                texts.append(doc.text)
                raws.append(doc.raw)
    except UserError as exc:
        return str(exc)
    stats["documents"] = len(texts)
    if isinstance(tok, ByteTokenizer):
        return [np.frombuffer(r, dtype=np.uint8).astype(dtype) for r in raws], stats
    return [np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(texts)], stats


def _results(units: list[Unit], workers: int, init_args: tuple):
    """tokenize_unit of every unit, in order. Workers come from a forkserver (never a fork of
    this process, whose tokenizers/pyarrow threads could deadlock a child), at most 2 units per
    worker in flight; a worker that dies raises BrokenProcessPool instead of hanging."""
    if workers <= 1:
        _init_worker(*init_args)
        yield from map(tokenize_unit, units)
        return
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["sessa_scale.data_prep.prep"])
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init_args) as pool:
        pending: deque = deque()
        for unit in units:
            pending.append(pool.submit(tokenize_unit, unit))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def prepare(
    inputs: list[str],
    out: str,
    tokenizer: str = "byte",
    seq_len: int = 2048,
    val_fraction: float = 0.005,
    workers: int = 1,
    seed: int = 0,
    text_field: str = "text",
    on_invalid: str = "error",
    on_empty: str = "skip",
    bpe_vocab_size: int = 32768,
    bpe_train_bytes: int = 256 * 2**20,
    eos_token: str | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Prepare a dataset directory at `out`; returns its manifest."""
    units = expand_inputs(inputs)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path: str | None = None
        if tokenizer == "bpe":
            if bpe_vocab_size < 257:
                raise UserError(f"--bpe-vocab-size must be >= 257 (256 byte tokens + EOS), got {bpe_vocab_size}")
            tokenizer_path = str(train_bpe(units, Path(tmp) / "tokenizer.json", bpe_vocab_size, text_field, on_invalid, bpe_train_bytes))
            eos_token = BPE_EOS
        elif tokenizer != "byte":
            tokenizer_path = tokenizer
        tok = HFTokenizer(tokenizer_path, eos_token) if tokenizer_path else ByteTokenizer()
        writer = DatasetWriter(out, tok.identity(), seq_len, val_fraction, seed, shard_bytes, tokenizer_path, overwrite)
        stats = {"input_bytes": 0, "documents": 0, "empty_skipped": 0, "invalid_utf8_skipped": 0}
        bar = tqdm(total=sum(u.size for u in units), unit="B", unit_scale=True, desc="prep", disable=not progress)
        doc_index = 0
        try:
            for unit, result in zip(units, _results(units, workers, (tokenizer_path, eos_token, text_field, on_invalid, on_empty))):
                if isinstance(result, str):
                    raise UserError(result)
                docs, unit_stats = result
                for doc in docs:
                    writer.add(doc, doc_index)
                    doc_index += 1
                for k, v in unit_stats.items():
                    stats[k] += v
                bar.update(unit.size)
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        return writer.close(stats, require_val=val_fraction > 0)
