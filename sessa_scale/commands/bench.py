"""`sessa-scale bench train|solve|ssd|layer|data|parallel [options]`: benchmark tables (see docs/benchmarks/)."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "solve": "sessa_scale.bench.solve",  # the feedback solve: implementations side by side
    "ssd": "sessa_scale.bench.ssd",  # Mamba-2's SSD scan alone vs SDPA flash of the same token count
    "layer": "sessa_scale.bench.layer",  # a whole SessaLayer vs a Transformer block
    "train": "sessa_scale.bench.train",  # training speed of a matched trio through `sessa-scale train`
    "data": "sessa_scale.bench.data",  # prep and loader throughput on CPU
    "parallel": "sessa_scale.bench.parallel",  # 1 GPU vs 2 GPUs as dp=2 and as tp=2 + SP (torchrun)
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="print benchmark tables",
        description="Run a benchmark; `sessa-scale bench NAME --help` lists its options.",
    )
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("bench_args", nargs=argparse.REMAINDER)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHMARKS[args.name]).main(args.bench_args)
