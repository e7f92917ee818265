"""`sessa-scale bench train`: training speed of the matched trio measured on the path users run.

Each row is a real `sessa-scale train` run (a subprocess: DeepSpeed engine, the data loader on the
prepared embedded corpus, train.precision=bf16, fused AdamW, gradient clipping and norm, metrics)
of configs/<arch>/<size>.yaml at data.seq_len = T with micro-batch B = batch_tokens // (T * grad_accum)
accumulated --grad-accum times per optimizer step, --steps
optimizer steps, evaluation and checkpoints off (checkpoint.save=false). The figures are read from
the run's metrics.jsonl: medians over the steps after --warmup of tokens/s/GPU, step time and MFU
(the trainer's FLOP count, sessa_scale.models.flops, correct for each architecture), and the peak
memory. A Transformer row also shows MFU under the full T x T attention square (Megatron/PaLM).

Diagnostic, beside it (--bare-archs, default all): the same model's bare forward/backward/optimizer step
outside DeepSpeed and the data loader (sessa_scale.bench.models, random tokens, same B and T, same
precision, optimizer and compile setting), in its own subprocess; 'trainer / bare' is how much of
the bare step's speed the trainer keeps.
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

from sessa_scale.bench import emit_report

REPO = Path(__file__).resolve().parents[2]


def trainer_command(
    arch: str, size: str, T: int, B: int, steps: int, compiled: bool, run_dir: Path, extra: list[str], grad_accum: int = 1
) -> list[str]:
    """The `sessa-scale train` command line of one row: micro-batch B, grad_accum micro-batches per step."""
    return [
        sys.executable, "-m", "sessa_scale", "train", str(REPO / "configs" / arch / f"{size}.yaml"),
        f"run.dir={run_dir}", "train.resume=none", f"data.seq_len={T}", f"train.micro_batch_size={B}",
        f"train.grad_accum_steps={grad_accum}", f"train.max_steps={steps}", "train.precision=bf16",
        f"train.compile={str(compiled).lower()}", "train.eval_interval=0", "checkpoint.save=false",
        "logging.progress=false", *extra,
    ]  # fmt: skip


def summarize_metrics(records: list[dict], warmup: int) -> dict:
    """Medians over the steps after `warmup` (all steps if there are no others) and the peak memory."""
    timed = [r for r in records if r["step"] > warmup] or records
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s_per_gpu"] for r in timed),
        "step_s": statistics.median(r["step_time_s"] for r in timed),
        "tflops": statistics.median(r["tflops_per_gpu"] for r in timed),
        "mfu": statistics.median(mfus) if mfus else None,
        "peak_gib": max(r["peak_mem_gib"] for r in records),
        "steps": len(timed),
    }


def run_trainer(arch: str, T: int, B: int, compiled: bool, args) -> dict:
    run_dir = args.runs_dir / f"{arch}-T{T}-B{B}{'-compiled' if compiled else ''}-{datetime.datetime.now():%H%M%S}"
    cmd = trainer_command(arch, args.size, T, B, args.steps, compiled, run_dir, args.train_overrides, args.grad_accum)
    print(f"# {shlex.join(cmd)}", file=sys.stderr, flush=True)
    result = subprocess.run(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-2000:]
        oom = "OutOfMemoryError" in tail or "out of memory" in tail
        print(tail, file=sys.stderr)
        return {"error": "out of memory" if oom else f"exit {result.returncode}"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {**summarize_metrics(records, args.warmup), "run_dir": str(run_dir)}


def run_bare(arch: str, T: int, B: int, compiled: bool, args) -> dict:
    """The diagnostic bare step (sessa_scale.bench.models) in a fresh process."""
    out = args.runs_dir / f"bare-{arch}-T{T}-B{B}{'-compiled' if compiled else ''}.json"
    cmd = [
        sys.executable, "-m", "sessa_scale.bench.models", "--size", args.size, "--archs", arch, "--seq-lens", str(T),
        "--batch-tokens", str(B * T), "--steps", str(args.steps - args.warmup), "--warmup", str(args.warmup),
        "--json", str(out), *(["--compile"] if compiled else []),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        return {"error": f"exit {result.returncode}"}
    row = json.loads(out.read_text())[0]
    return {"error": "out of memory"} if row["oom"] else {"tokens_per_s": B * T / row["step_s"], "step_s": row["step_s"]}


def format_report(rows: list[dict], args, argv: list[str], device: str) -> str:
    lines = [
        f"# Training speed of the matched {args.size} trio through `sessa-scale train`",
        "",
        f"- Machine: {device}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `sessa-scale bench train {shlex.join(argv)}`",
        f"- Each row: `sessa-scale train configs/<arch>/{args.size}.yaml` for {args.steps} steps (bf16 inside the"
        f" DeepSpeed engine, ZeRO 0, fused AdamW, clipping, the data loader on the prepared embedded corpus, byte-level"
        f" tokens), medians over steps {args.warmup + 1}-{args.steps} from its metrics.jsonl.",
        "- MFU: the trainer's FLOP count (sessa_scale/models/flops.py: every matrix product over the causal"
        " triangle, Sessa's feedback solve and Mamba-2's SSD included) over the GPU's dense bf16 peak;"
        " 'full square' counts the Transformer's whole T x T attention square (Megatron/PaLM).",
        "- Diagnostic: 'bare step' is the same model's forward/backward/clip/AdamW outside DeepSpeed and the"
        " loader (sessa_scale.bench.models, random tokens); 'trainer / bare' is the fraction of its speed the"
        " trainer keeps.",
        "",
        f"| arch | T | {'B x accumulation' if args.grad_accum > 1 else 'B'} | compile | tokens/s/GPU | step ms | TFLOP/s | MFU | MFU, full square | vs Transformer"
        " | peak GiB | diagnostic: bare step tokens/s | trainer / bare |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["T"], r["compile"]): r for r in rows if r["arch"] == "transformer" and "error" not in r["trainer"]}
    for r in rows:
        tr, bare = r["trainer"], r.get("bare", {})
        micro = f"{r['B']} x {args.grad_accum}" if args.grad_accum > 1 else r["B"]
        head = f"| {r['arch']} | {r['T']} | {micro} | {'yes' if r['compile'] else 'no'} |"
        if "error" in tr:
            lines.append(f"{head} {tr['error']} |" + " |" * 8)
            continue
        mfu = f"{tr['mfu']:.1%}" if tr["mfu"] is not None else "n/a"
        square = ""
        if r["arch"] == "transformer" and tr["mfu"] is not None:
            square = f"{tr['mfu'] * r['flops_full_square'] / r['flops']:.1%}"
        ref = base.get((r["T"], r["compile"]))
        ratio = f"{tr['tokens_per_s'] / ref['trainer']['tokens_per_s']:.2f}x" if ref else ""
        bare_tok = bare.get("error") or (f"{bare['tokens_per_s']:,.0f}" if bare else "")
        kept = f"{tr['tokens_per_s'] / bare['tokens_per_s']:.1%}" if bare and "error" not in bare else ""
        lines.append(
            f"{head} {tr['tokens_per_s']:,.0f} | {1e3 * tr['step_s']:.1f} | {tr['tflops']:.0f} | {mfu} | {square} |"
            f" {ratio} | {tr['peak_gib']:.1f} | {bare_tok} | {kept} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="sessa-scale bench train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="350m", help="trio size: configs/<arch>/<size>.yaml")
    ap.add_argument("--archs", default="transformer,sessa,mamba2")
    ap.add_argument("--seq-lens", default="2048,8192")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="tokens per optimizer step (B = this // (T * grad accumulation))")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step (train.grad_accum_steps)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=4, help="first steps left out of the medians (compilation, allocator warm-up)")
    ap.add_argument("--compile", choices=("no", "yes", "both"), default="both", help="train.compile rows")
    ap.add_argument("--bare-archs", default=None, help="architectures that get the diagnostic bare-step column (default: all of --archs; '' for none)")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/bench_train"), help="parent of the runs' directories")
    ap.add_argument("--out", type=Path, help="also write the Markdown table here")
    ap.add_argument("train_overrides", nargs="*", help="extra key=value overrides for every run (e.g. model.solver=chunked)")
    args = ap.parse_intermixed_args(argv)  # options may follow the overrides
    if args.grad_accum < 1:
        ap.error(f"--grad-accum must be >= 1, got {args.grad_accum}")
    if args.steps <= args.warmup:
        ap.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    import torch

    from sessa_scale.config import load_config
    from sessa_scale.models.registry import count_training_flops
    from sessa_scale.models.transformer import full_square_attention_extra

    if not torch.cuda.is_available():
        ap.error("bench train measures GPU training; it needs a CUDA device")
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    bare_archs = set((args.archs if args.bare_archs is None else args.bare_archs).split(","))
    rows = []
    for T in (int(t) for t in args.seq_lens.split(",")):
        B = max(1, args.batch_tokens // (T * args.grad_accum))
        for compiled in modes:
            for arch in args.archs.split(","):
                model_cfg = load_config(REPO / "configs" / arch / f"{args.size}.yaml", [f"data.seq_len={T}"]).model
                row = {"arch": arch, "T": T, "B": B, "compile": compiled, "flops": count_training_flops(model_cfg, T)}
                if arch == "transformer":  # the Megatron/PaLM convention, for its 'MFU, full square' column
                    row["flops_full_square"] = row["flops"] + full_square_attention_extra(model_cfg, T)
                row["trainer"] = run_trainer(arch, T, B, compiled, args)
                if arch in bare_archs:
                    row["bare"] = run_bare(arch, T, B, compiled, args)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    emit_report(format_report(rows, args, argv, torch.cuda.get_device_name()), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
