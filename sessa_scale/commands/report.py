"""`sessa-scale report RUN_DIR [RUN_DIR ...] --out DIR`: compare runs in a Markdown table and plots."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="compare runs: Markdown table and PNG plots",
        description="Read each RUN_DIR's config.yaml, metrics.jsonl and eval/*.json (written by `sessa-scale eval` "
        "and `probe`) and write DIR/report.md (final losses, eval metrics, tokens/s, parameters), DIR/report.json "
        "and PNGs: loss vs tokens, accuracy vs context length, influence vs lag.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for report.md and the plots")


def run(args: argparse.Namespace) -> int:
    from sessa_scale.evaluation.report import write_report

    report = write_report(args.run_dirs, args.out)
    print(report["markdown"])
    print(f"sessa-scale report: wrote {args.out}/report.md and {len(report['plots'])} plot(s)", file=sys.stderr)
    return 0
