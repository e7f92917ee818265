"""`sessa-scale synth mqar|passkey [--out DIR] [--jsonl FILE] [task options]`: write a synthetic task
as a byte-level training dataset (train with data.path=DIR) and/or as prompt/answer records (for
`eval --task answers`). No checkpoint is needed.

The task options (add_task_arguments, task_set) are shared with `eval --task mqar|passkey`, which
generates the same examples to score; `eval --write-data DIR` / `--write-jsonl FILE` is the older
spelling of this command and runs write_task below."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sessa_scale.errors import UserError

SYNTHETIC_TASKS = ("mqar", "passkey")


def list_of(kind):
    """argparse type: "a,b,c" -> [kind(a), kind(b), kind(c)]."""

    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


def add_task_arguments(g) -> None:
    """The options that define an mqar / passkey task set (read by task_set)."""
    g.add_argument("--num-examples", type=int, default=None,
                   help="examples per setting (default: 64 for mqar, 8 for passkey; e.g. 20000 to write training data)")
    g.add_argument("--seed", type=int, default=1, help="task seed (default 1; train on another seed than you evaluate)")
    g.add_argument("--num-pairs", type=list_of(int), default=[4, 8, 16], metavar="N,N,...",
                   help="mqar: key-value pairs in the context, one setting each (default 4,8,16)")
    g.add_argument("--num-queries", type=int, default=None, help="mqar: queried keys per context (default: all)")
    g.add_argument("--key-len", type=int, default=1, help="mqar: letters per key (default 1)")
    g.add_argument("--value-len", type=int, default=1, help="mqar: digits per value (default 1)")
    g.add_argument("--lengths", type=list_of(int), default=[256, 512, 1024], metavar="L,L,...",
                   help="passkey: prompt lengths in characters = byte tokens (default 256,512,1024)")
    g.add_argument("--depths", type=list_of(float), default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="D,D,...",
                   help="passkey: needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    g.add_argument("--digits", type=int, default=5, help="passkey: digits of the key (default 5)")


def add_dataset_arguments(g, flag: str) -> None:
    """--seq-len and --val-fraction of the training dataset written to `flag` (--out, --write-data)."""
    g.add_argument("--seq-len", type=int, default=256, help=f"{flag}: tokens per training sequence (default 256)")
    g.add_argument("--val-fraction", type=float, default=0.02,
                   help=f"{flag}: fraction of examples held out for validation (default 0.02)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic task (mqar, passkey) as a training dataset or prompt/answer records",
        description="Generate multi-query associative recall (mqar) or passkey retrieval examples from --seed and "
        "the task options alone, and write them as a byte-level training dataset (--out DIR: train with "
        "data.path=DIR data.seq_len=N) and/or as prompt/answer JSONL records (--jsonl FILE: score with `eval --task "
        "answers --file FILE`). `eval --task mqar|passkey` generates the same examples from the same options. "
        "`eval --write-data DIR` / `--write-jsonl FILE` is the older spelling of this command.",
    )
    p.add_argument("task", choices=SYNTHETIC_TASKS)
    p.add_argument("--out", default=None, metavar="DIR", help="write the examples as a byte-level training dataset")
    p.add_argument("--jsonl", default=None, metavar="FILE", help="write the task's prompt/answer records")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out DIR or --jsonl FILE")
    add_dataset_arguments(p, "--out")
    add_task_arguments(p.add_argument_group("task"))


def task_set(args: argparse.Namespace):
    """The TaskSet (sessa_scale.evaluation.tasks) that args.task and the task options describe."""
    from sessa_scale.evaluation.tasks import mqar_set, passkey_set

    if args.task == "mqar":
        n = 64 if args.num_examples is None else args.num_examples
        return mqar_set(args.seed, n, args.num_pairs, args.num_queries, args.key_len, args.value_len)
    n = 8 if args.num_examples is None else args.num_examples
    return passkey_set(args.seed, n, args.lengths, args.depths, args.digits)


def write_task(args: argparse.Namespace, out: str | None, jsonl: str | None, overwrite: bool, command: str) -> int:
    """Write task_set(args) as a training dataset to `out` and/or as records to `jsonl` (either may
    be None), reporting on stderr as `sessa-scale COMMAND`. overwrite: replace a non-empty `out`."""
    from sessa_scale.evaluation.tasks import write_records

    tasks = task_set(args)
    if out:
        from sessa_scale.data import ByteTokenizer, write_dataset

        manifest = write_dataset(
            tasks.documents, out, ByteTokenizer(), args.seq_len, args.val_fraction, seed=args.seed, overwrite=overwrite
        )
        counts = ", ".join(f"{split} {manifest['splits'][split]['samples']:,}" for split in ("train", "val"))
        print(
            f"sessa-scale {command}: wrote {len(tasks.documents):,} {args.task} examples to {out} "
            f"(samples of {args.seq_len} tokens: {counts}); train with data.path={out} data.seq_len={args.seq_len}",
            file=sys.stderr,
        )
    if jsonl:
        write_records(tasks.records, jsonl)
        print(f"sessa-scale {command}: wrote {len(tasks.records)} {args.task} records to {jsonl}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.num_examples is not None and args.num_examples < 1:
        raise UserError(f"--num-examples must be >= 1, got {args.num_examples}")
    if not args.out and not args.jsonl:
        raise UserError(
            f"synth {args.task} needs somewhere to write: --out DIR (a training dataset) and/or --jsonl FILE "
            "(prompt/answer records)"
        )
    if args.jsonl and Path(args.jsonl).exists() and not args.overwrite:
        raise UserError(f"--jsonl {args.jsonl} already exists; pass --overwrite to replace it or choose another file")
    return write_task(args, args.out, args.jsonl, args.overwrite, "synth")
