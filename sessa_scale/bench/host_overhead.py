"""Diagnostic: the host's time to issue a training step's forward and backward, per architecture.

A step is host-bound when issuing its launches takes the host longer than the GPU takes to run them
(the idle gaps `sessa_scale.bench.trace_gaps` lists). At a tiny shape (B = 1, T = --seq-len, default
64) every kernel runs for a few microseconds, so the host's time to issue the model's forward and
backward (configs/<arch>/<size>.yaml at full depth, fp32 weights, the trainer's bf16 autocast and
loss) is the wall time of the timed loop before its closing synchronization. Columns: that time per
forward + backward and per layer (the difference between the full model and a one-layer copy,
divided by the other layers), and the GPU's busy time of a real step for comparison where given
(--gpu-busy-ms arch=ms, e.g. from a profiled `sessa-scale train` step). --profile adds the host
operators of one layer by CPU time (torch.profiler; its own overhead inflates every figure).

    python3 -m sessa_scale.bench.host_overhead --archs transformer,sessa,mamba2 [--profile mamba2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sessa_scale.bench import emit_report
from sessa_scale.config import load_config
from sessa_scale.models.registry import build_model
from sessa_scale.training.precision import autocast

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _step_fn(arch: str, size: str, T: int, n_layers: int | None, device: str = "cuda"):
    """(forward + backward of configs/<arch>/<size>.yaml on one random sequence, its layer count)."""
    overrides = [f"data.seq_len={T}"] + ([f"model.n_layers={n_layers}"] if n_layers else [])
    cfg = load_config(CONFIGS / arch / f"{size}.yaml", overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg.model)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, T + 1), device=device)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def fwd_bwd():
        with autocast(cfg.train.precision, device):
            loss = model(inputs, targets)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return fwd_bwd, cfg.model.n_layers


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def host_seconds(fn, calls: int, warmup: int = 3, device: str = "cuda") -> float:
    """Host seconds per call of fn: the loop's wall time before its closing synchronization."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    _synchronize(device)
    return host / calls


def measure(arch: str, size: str, T: int, calls: int, device: str = "cuda") -> dict:
    """Host ms per forward + backward of the full model and of a one-layer copy, and per layer (us)."""
    full, n_layers = _step_fn(arch, size, T, None, device)
    full_s = host_seconds(full, calls, device=device)
    one, _ = _step_fn(arch, size, T, 1, device)
    one_s = host_seconds(one, calls, device=device)
    per_layer = (full_s - one_s) / max(1, n_layers - 1)
    return {"arch": arch, "layers": n_layers, "full_ms": full_s * 1e3, "one_layer_ms": one_s * 1e3,
            "per_layer_us": per_layer * 1e6}


def profile_one_layer(arch: str, size: str, T: int, rows: int = 30, device: str = "cuda") -> str:
    """torch.profiler's host operators of a one-layer model's forward + backward, by CPU time."""
    fn, _ = _step_fn(arch, size, T, 1, device)
    host_seconds(fn, 3, device=device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            fn()
        _synchronize(device)
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=rows)
    return f"### {arch}: host operators of one layer's forward + backward (10 calls, profiler overhead included)\n\n```\n{table}\n```\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m sessa_scale.bench.host_overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="350m", help="configs/<arch>/<size>.yaml")
    ap.add_argument("--archs", default="transformer,sessa,mamba2")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens of the one sequence (tiny: GPU work negligible)")
    ap.add_argument("--calls", type=int, default=20, help="timed forward + backward calls per model")
    ap.add_argument("--gpu-busy-ms", default="", help="arch=ms,...: a real step's GPU busy time, for comparison")
    ap.add_argument("--profile", default="", help="comma-separated archs whose one-layer host operators to list")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a check of this script only")
    ap.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("needs a CUDA device (--device cpu only checks this script)")
    busy = dict(item.split("=") for item in args.gpu_busy_ms.split(",") if item)
    lines = ["# Diagnostic: host time to issue forward + backward (tiny shape: GPU work negligible)", "",
             f"- Machine: {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}; torch {torch.__version__}",
             f"- Command: `python -m sessa_scale.bench.host_overhead {' '.join(argv)}`",
             f"- configs/<arch>/{args.size}.yaml, B = 1, T = {args.seq_len}, bf16 autocast, fp32 weights, "
             f"{args.calls} timed calls after 3", "",
             "| arch | layers | host ms, fwd+bwd | host ms, one-layer model | host us per layer | GPU busy ms of a real step |",
             "|---|---|---|---|---|---|"]
    for arch in args.archs.split(","):
        r = measure(arch, args.size, args.seq_len, args.calls, args.device)
        print(r, file=sys.stderr, flush=True)
        lines.append(f"| {arch} | {r['layers']} | {r['full_ms']:.1f} | {r['one_layer_ms']:.1f} | "
                     f"{r['per_layer_us']:.0f} | {busy.get(arch, '')} |")
    lines.append("")
    for arch in (a for a in args.profile.split(",") if a):
        lines.append(profile_one_layer(arch, args.size, args.seq_len, device=args.device))
    emit_report("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
