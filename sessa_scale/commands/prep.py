"""`sessa-scale prep INPUT [INPUT ...] --out DIR [options]`: tokenize corpora into a dataset
directory of webdataset shards + manifest (see data_prep/ and sessa_scale/data/dataset.py)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prep",
        help="tokenize text/JSONL/Parquet into webdataset shards",
        description="Tokenize plain-text files (one document each), JSONL (--text-field), Parquet (a text column) "
        "and directories of them into DIR: train-*.tar / val-*.tar shards of packed (seq_len + 1)-token samples and "
        "manifest.json. Train on it with data.path=DIR. The same inputs and --seed give byte-identical shards.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories (.jsonl/.json/.ndjson, .parquet, else text; .gz ok)")
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    p.add_argument("--tokenizer", default="byte", metavar="byte|bpe|PATH", help="byte (default), bpe (train on the corpus), or a tokenizer.json")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per training sequence (must equal data.seq_len); default 2048")
    p.add_argument("--val-fraction", type=float, default=0.005, help="fraction of documents held out for validation; default 0.005")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer processes; default min(8, CPUs)")
    p.add_argument("--seed", type=int, default=0, help="seeds the validation split; default 0")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text; default text")
    p.add_argument("--on-invalid", choices=("error", "skip"), default="error", help="invalid UTF-8: stop (default) or skip and count")
    p.add_argument("--on-empty", choices=("skip", "error"), default="skip", help="empty/whitespace documents: skip and count (default) or stop")
    p.add_argument("--bpe-vocab-size", type=int, default=32768, help="vocabulary of a trained BPE (incl. EOS); default 32768")
    p.add_argument("--bpe-train-bytes", type=int, default=256 * 2**20, help="train the BPE on the first N bytes of text; default 256 MiB")
    p.add_argument("--eos-token", default=None, help="end-of-document token of a tokenizer.json (default: <|endoftext|>, </s>, ...)")
    p.add_argument("--shard-mb", type=float, default=64, help="target shard size in MiB; default 64")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from sessa_scale.data_prep.prep import prepare
    from sessa_scale.errors import UserError
    from sessa_scale.filesystem import writable_dir

    problems = []
    if args.seq_len < 1:
        problems.append(f"--seq-len must be >= 1, got {args.seq_len}")
    if not 0 <= args.val_fraction < 1:
        problems.append(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.workers < 1:
        problems.append(f"--workers must be >= 1, got {args.workers}")
    if args.shard_mb <= 0:
        problems.append(f"--shard-mb must be > 0, got {args.shard_mb}")
    if problems:
        raise UserError("; ".join(problems))
    parent = Path(args.out).absolute().parent  # the dataset is written next to --out, then renamed
    writable_dir(parent, f"{parent}, the directory of --out {args.out}")
    start = time.perf_counter()
    m = prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        workers=args.workers,
        seed=args.seed,
        text_field=args.text_field,
        on_invalid=args.on_invalid,
        on_empty=args.on_empty,
        bpe_vocab_size=args.bpe_vocab_size,
        bpe_train_bytes=args.bpe_train_bytes,
        eos_token=args.eos_token,
        shard_bytes=int(args.shard_mb * 2**20),
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    st, tok = m["stats"], m["tokenizer"]
    splits = "; ".join(
        f"{name}: {s['samples']:,} samples in {len(s['shards'])} shard(s) ({s['documents']:,} documents, {s['tokens']:,} tokens)"
        for name, s in m["splits"].items()
    )
    print(
        f"wrote {args.out}: {splits}; tokenizer {tok['name']} (vocab {tok['vocab_size']}, eos {tok['eos_id']}); skipped "
        f"{st['empty_skipped']} empty and {st['invalid_utf8_skipped']} invalid-UTF-8 document(s); "
        f"{st['input_bytes'] / 1e6:.1f} MB in {seconds:.1f} s ({st['input_bytes'] / 1e6 / max(seconds, 1e-9):.2f} MB/s)",
        file=sys.stderr,
    )
    return 0
