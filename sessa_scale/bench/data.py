"""`sessa-scale bench data`: CPU throughput of the data pipeline, printed as markdown tables.

- prep: `data_prep.prep.prepare` on a JSONL corpus of --mb MB of Python standard-library sources
  (real text, repeated to size), byte-level and with a BPE trained on it (--bpe-vocab-size), with
  --workers processes; MB/s = input text bytes / wall seconds (BPE: training included, and alone).
- loader: `ShardStream` over the byte-level dataset at --seq-len, micro-batches of --micro-batch
  samples, with 0 / 1 / 2 DataLoader workers; tokens/s = input tokens delivered / wall seconds over
  --steps steps after one warm-up step (worker start included in the warm-up).

Timings depend on what else runs on the machine: the header records the load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from sessa_scale.bench import emit_report


def _corpus(path: Path, megabytes: float) -> int:
    """Write a JSONL file of stdlib sources (one document per file, repeated) of ~megabytes MB."""
    from sessa_scale.data.corpus import stdlib_documents

    docs = [d.decode("utf-8", "replace") for d in stdlib_documents(16_000_000)]
    target, written = int(megabytes * 1e6), 0
    with open(path, "w") as fh:
        while written < target:
            for doc in docs:
                fh.write(json.dumps({"text": doc}) + "\n")
                written += len(doc.encode())
                if written >= target:
                    break
    return written


def _prep_row(name: str, corpus: Path, out: Path, text_bytes: int, **kw) -> dict:
    from sessa_scale.data_prep.prep import prepare

    start = time.perf_counter()
    m = prepare([str(corpus)], str(out), progress=False, overwrite=True, **kw)
    seconds = time.perf_counter() - start
    tokens = sum(s["tokens"] for s in m["splits"].values())
    return {"run": name, "MB": text_bytes / 1e6, "s": seconds, "MB/s": text_bytes / 1e6 / seconds, "tokens": tokens, "tokens/s": tokens / seconds}


def _loader_row(path: Path, workers: int, micro_batch: int, steps: int) -> dict:
    from sessa_scale.data import ShardStream, StreamSpec
    from sessa_scale.data.loader import inputs_and_targets
    from sessa_scale.data.reader import open_split

    stream = ShardStream(StreamSpec([open_split(path, "train")], [1.0], seed=0), micro_batch, num_workers=workers, prefetch=4)
    stream.next_step()
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        for block in stream.next_step():
            tokens += inputs_and_targets(block)[0].numel()
    seconds = time.perf_counter() - start
    stream.close()
    return {"workers": workers, "steps": steps, "tokens": tokens, "s": seconds, "tokens/s": tokens / seconds}


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:,.2f}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else str(v))  # noqa: E731
    return "\n".join(
        ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sessa-scale bench data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=32, help="corpus size in MB of text (default 32)")
    p.add_argument("--workers", type=int, default=2, help="prep worker processes (default 2)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--bpe-vocab-size", type=int, default=32768)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=200, help="loader steps timed per worker setting")
    p.add_argument("--out", default=None, help="also write the report (markdown) here")
    args = p.parse_args(argv)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text_bytes = _corpus(tmp / "corpus.jsonl", args.mb)
        common = dict(seq_len=args.seq_len, val_fraction=0.005, workers=args.workers)
        prep = [_prep_row("byte", tmp / "corpus.jsonl", tmp / "byte", text_bytes, **common)]
        prep.append(_prep_row("bpe (train + encode)", tmp / "corpus.jsonl", tmp / "bpe", text_bytes, tokenizer="bpe", bpe_vocab_size=args.bpe_vocab_size, **common))
        start = time.perf_counter()
        from sessa_scale.data_prep.inputs import expand_inputs
        from sessa_scale.data_prep.prep import train_bpe

        train_bpe(expand_inputs([str(tmp / "corpus.jsonl")]), tmp / "tok.json", args.bpe_vocab_size, "text", "error", 256 * 2**20)
        train_s = time.perf_counter() - start
        prep.append({"run": "bpe (training alone)", "MB": text_bytes / 1e6, "s": train_s, "MB/s": text_bytes / 1e6 / train_s, "tokens": 0, "tokens/s": 0.0})
        prep.append(_prep_row("bpe (encode with that tokenizer.json)", tmp / "corpus.jsonl", tmp / "bpe2", text_bytes, tokenizer=str(tmp / "tok.json"), **common))
        loader = [_loader_row(tmp / "byte", w, args.micro_batch, args.steps) for w in (0, 1, 2)]
    report = "\n".join(
        [
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPU cores; "
            f"load average before/after: {load_before} / {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            f"- Command: `sessa-scale bench data {shlex.join(argv if argv is not None else sys.argv[1:])}`",
            f"- Corpus: {text_bytes / 1e6:.1f} MB of Python standard-library sources as JSONL; seq_len {args.seq_len}; "
            f"{args.workers} prep workers; loader micro-batch {args.micro_batch} x {args.seq_len} tokens",
            "",
            "Prep throughput:",
            "",
            _table(prep),
            "",
            "Loader throughput (one rank, tokens delivered to the training loop):",
            "",
            _table(loader),
        ]
    )
    emit_report(report, args.out)
    return 0
