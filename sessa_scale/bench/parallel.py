"""`sessa-scale bench parallel`: one GPU against 2 GPUs as data parallel (tp=1, dp=2) and as tensor +
sequence parallel (tp=2, dp=1), same model, same global batch, same seed, DeepSpeed ZeRO-1.

Each layout is a real training run (`torchrun -m sessa_scale train CONFIG ...`, NCCL with NVLink
multicast off: NCCL_NVLS_ENABLE=0) of --steps optimizer steps; the global batch is
micro_batch_size x 2 sequences in every layout (the 1-GPU and tp=2 runs accumulate 2 micro-batches).
The table reports, from the runs' metrics.jsonl: the largest |loss - 1-GPU loss| over the steps,
median tokens/s/GPU, TFLOP/s/GPU and MFU over the steps after --warmup, peak memory (rank 0), and
the DP scaling efficiency = dp=2 tokens/s / (2 x 1-GPU tokens/s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

LAYOUTS = {  # name -> (GPUs, overrides)
    "1 GPU": (1, ["train.grad_accum_steps=2"]),
    "tp=1, dp=2": (2, ["train.grad_accum_steps=1"]),
    "tp=2, dp=1, SP": (2, ["train.grad_accum_steps=2", "parallel.tensor=2", "parallel.sequence_parallel=true"]),
}


def run_layout(name: str, args, out: Path) -> Path:
    gpus, overrides = LAYOUTS[name]
    run_dir = out / name.replace(" ", "").replace(",", "_").replace("=", "")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}", "--master-port=29517",
        "-m", "sessa_scale", "train", args.config, f"run.dir={run_dir}", "train.resume=none",
        f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch_size}", f"train.max_steps={args.steps}",
        "zero.stage=1", "checkpoint.interval=0", "train.eval_interval=0", "logging.progress=false", *overrides,
    ]  # fmt: skip
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONUNBUFFERED="1")
    print(f"# {name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env)
    return run_dir / "metrics.jsonl"


def summarize(metrics: dict[str, list[dict]], warmup: int) -> str:
    """Markdown table from each layout's per-step records (the first layout is the 1-GPU reference)."""
    ref_name = next(iter(metrics))
    ref = {r["step"]: r["loss"] for r in metrics[ref_name]}
    lines = [
        "| layout | max abs loss diff vs 1 GPU | tokens/s/GPU | TFLOP/s/GPU | MFU | peak memory (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    tok = {}
    for name, records in metrics.items():
        timed = [r for r in records if r["step"] > warmup] or records
        tok[name] = statistics.median(r["tokens_per_s_per_gpu"] for r in timed)
        tflops = statistics.median(r["tflops_per_gpu"] for r in timed)
        mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
        mfu = f"{100 * statistics.median(mfus):.1f}%" if mfus else "n/a (unknown GPU)"
        diff = max(abs(r["loss"] - ref[r["step"]]) for r in records)
        peak = max(r["peak_mem_gib"] for r in records)
        lines.append(f"| {name} | {diff:.2e} | {tok[name]:,.0f} | {tflops:.1f} | {mfu} | {peak:.1f} |")
    dp = [n for n in metrics if n.startswith("tp=1, dp=2")]
    if dp:
        lines.append("")
        lines.append(f"DP scaling efficiency (dp=2 tokens/s over 2 x 1-GPU tokens/s): {tok[dp[0]] / tok[ref_name]:.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sessa-scale bench parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/sessa/350m.yaml")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the throughput medians")
    p.add_argument("--out", default="runs/bench_parallel", help="parent of the three run directories")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = p.parse_args(argv)
    out = Path(args.out)
    metrics = {}
    for name in args.layouts:
        path = run_layout(name, args, out)
        metrics[name] = [json.loads(line) for line in path.read_text().splitlines()]
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"{args.config}, T={args.seq_len}, micro-batch {args.micro_batch_size}, ZeRO-1, {args.steps} steps, {device}, "
          f"{datetime.date.today()}; command: sessa-scale bench parallel {shlex.join(argv or sys.argv[1:])}\n")  # fmt: skip
    print(summarize(metrics, args.warmup))
    return 0
