"""`sessa-scale bench solve`: fwd+bwd time and peak memory of feedback-solve implementations.

For each (layout, T, impl) one point: inputs q, k: (B, T, H, D); gamma: (B, T, H); f: (B, T, H, D)
(layout "HxD": H heads with Dk = Dv = D), then s = impl(q, k, gamma, f, 1/sqrt(D)) and
s.backward(upstream). Reported: the median time of --repeats fwd+bwd calls and the op's PEAK memory:

* CUDA: max_memory_allocated() over three warm fwd+bwd calls minus memory_allocated() before the
  first call (the inputs), so memory an op keeps between calls or captures among them (the Triton
  solve's CUDA graphs) counts (``bench.cuda_peak_bytes``).
* CPU (Linux): one fwd+bwd runs in a fresh Python subprocess, which allocates the inputs, resets
  the kernel's peak-RSS mark (/proc/self/clear_refs), reads the peak RSS (VmHWM), runs the call
  and reads it again; the difference is the growth of peak RSS caused by the op. VmHWM is the
  process's own high-water mark; ru_maxrss is not used because it also keeps the RSS inherited
  from the forking parent at exec, and without the reset, transient allocations made at import
  or warm-up would hide part of the op's peak.
  The subprocess sets MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns every freed block of
  64 KiB or more to the OS at once; otherwise RSS keeps freed temporaries and overstates the peak
  by an allocator-dependent amount. Times on CPU are taken in this process (default allocator).

Implementations whose memory is quadratic in T are skipped when their estimate exceeds
--max-quadratic-gib. To add an implementation, register it in FEEDBACK_SOLVE_IMPLS (a yardstick: in IMPLS).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

from sessa_scale.bench import WARM_CALLS, cuda_peak_bytes, emit_report, interleaved_ms
from sessa_scale.bench.baselines import fla_deltaformer_solve, sdpa_flash_same_shape
from sessa_scale.ops.feedback_solve import FEEDBACK_SOLVE_IMPLS
from sessa_scale.ops.ssd import fla_available

# name -> callable(q, k, gamma, f, scale) -> s: the solve's implementations (FEEDBACK_SOLVE_IMPLS:
# dense, chunked, and triton where it runs) and the yardsticks of bench/baselines.py: SDPA flash
# attention of the same shape, fla-core's DeltaFormer (the same solve with beta = -gamma). The one
# registry of the solve benches (this one and solve_quick.py).
IMPLS: dict[str, Callable[..., torch.Tensor]] = dict(FEEDBACK_SOLVE_IMPLS)
if torch.cuda.is_available():
    IMPLS["sdpa_flash"] = sdpa_flash_same_shape
    if fla_available():
        IMPLS["fla_deltaformer"] = fla_deltaformer_solve
# Implementations with T^2 memory: peak bytes ~= factor * B * H * T^2 * compute element size
# (dense: 6.3 measured on CPU in float32).
QUADRATIC_MEMORY_FACTOR: dict[str, float] = {"dense": 6.5}
SKIPPED = "skipped (T^2 memory)"
# The yardsticks support head dims up to MAX_HEAD_DIM.
MAX_HEAD_DIM: dict[str, int] = {"sdpa_flash": 256, "fla_deltaformer": 256}
UNSUPPORTED = "n/a (head dim > 256)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def fwd_bwd(solve: Callable[..., torch.Tensor], inputs: list[torch.Tensor], upstream: torch.Tensor) -> None:
    """One fwd+bwd of solve(q, k, gamma, f, 1/sqrt(Dk)) (inputs from make_inputs; earlier gradients dropped)."""
    for t in inputs:
        t.grad = None
    q, k, gamma, f = inputs
    solve(q, k, gamma, f, 1.0 / math.sqrt(q.shape[-1])).backward(upstream)


def make_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str):
    """[q, k, gamma, f] (B, T, H, D) / (B, T, H) requiring gradients, and the upstream gradient of s."""
    gen = torch.Generator(device).manual_seed(0)
    shape = (B, T, H, D)
    q, k, f = (torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(3))
    gamma = 0.9 * torch.tanh(torch.randn(shape[:3], generator=gen, device=device)).to(dtype)
    upstream = torch.randn(shape, generator=gen, device=device).to(dtype)
    return [t.requires_grad_() for t in (q, k, gamma, f)], upstream


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # reported in kB


def measure(impl: str, B: int, T: int, H: int, D: int, dtype: str, device: str, repeats: int) -> dict:
    """One point, in this process: {"ms": median of `repeats` fwd+bwd milliseconds (None if 0),
    "peak_bytes": peak memory of a fwd+bwd (CUDA: a warm one, with what the op keeps between calls;
    CPU: the first, meaningful only in a fresh process)}."""
    torch_dtype = DTYPES[dtype]
    fwd_bwd(IMPLS[impl], *make_inputs(1, min(T, 128), H, D, torch_dtype, device))  # load code paths
    inputs, upstream = make_inputs(B, T, H, D, torch_dtype, device)
    gc.collect()
    if device.startswith("cuda"):
        peak = cuda_peak_bytes(lambda: fwd_bwd(IMPLS[impl], inputs, upstream), device, warm=True)
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # peak RSS := current RSS
        base = _peak_rss_bytes()
        fwd_bwd(IMPLS[impl], inputs, upstream)
        peak = _peak_rss_bytes() - base
    step = {impl: lambda: fwd_bwd(IMPLS[impl], inputs, upstream)}
    ms = interleaved_ms(step, repeats, lambda: _sync(device))[impl] if repeats else None
    return {"ms": ms, "peak_bytes": peak}


def _measure_point(**point) -> dict:
    """`measure` on CUDA; on CPU, peak memory from a fresh subprocess and time from this process."""
    if point["device"].startswith("cuda"):
        return measure(**point)
    code = "import json, sys; from sessa_scale.bench.solve import measure; "
    code += "print(json.dumps(measure(**json.loads(sys.argv[1]))))"
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    args = [sys.executable, "-c", code, json.dumps({**point, "repeats": 0})]
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark point {point} failed:\n{proc.stderr[-2000:]}")
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
    return {"ms": measure(**point)["ms"], "peak_bytes": peak}


def _parse_layouts(text: str) -> list[tuple[int, int]]:
    try:
        layouts = [tuple(int(x) for x in item.split("x")) for item in text.split(",")]
    except ValueError:
        layouts = []
    if not layouts or any(len(lay) != 2 or min(lay) < 1 for lay in layouts):
        raise argparse.ArgumentTypeError(f"layouts must look like '1x256,6x128' (HxD); got {text!r}")
    return layouts


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = "no GPU" if not torch.cuda.is_available() else "GPU not used"
    return f"{cores}-core CPU ({platform.machine()}, {torch.get_num_threads()} torch threads), {gpu}"


def _fmt_ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}" if num is not None and den else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sessa-scale bench solve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", default="chunked,dense", help=f"comma-separated, from {list(IMPLS)}")
    parser.add_argument("--seq-lens", default="4096,8192,16384", help="comma-separated T values")
    parser.add_argument("--layouts", default="1x64", type=_parse_layouts, help="HxD list, e.g. 1x256,6x128")
    parser.add_argument("--batch-tokens", type=int, default=0, help="B = max(1, this // T); 0: B = 1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3, help="timed fwd+bwd calls per point (median)")
    parser.add_argument("--max-quadratic-gib", type=float, default=8.0, help="skip T^2 impls above this estimate")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    unknown = [name for name in impls if name not in IMPLS]
    if unknown:
        parser.error(f"unknown impls {unknown}; choose from {list(IMPLS)}")
    seq_lens = [int(t) for t in args.seq_lens.split(",")]
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    compute_bytes = 8 if args.dtype == "float64" else 4

    rows, results = [], {}
    for H, D in args.layouts:
        for T in seq_lens:
            B = max(1, args.batch_tokens // T)
            for impl in impls:
                estimate = QUADRATIC_MEMORY_FACTOR.get(impl, 0.0) * B * H * T * T * compute_bytes
                if estimate > args.max_quadratic_gib * 2**30:
                    results[H, D, T, impl] = None
                    continue
                if D > MAX_HEAD_DIM.get(impl, D):
                    results[H, D, T, impl] = UNSUPPORTED
                    continue
                point = dict(impl=impl, B=B, T=T, H=H, D=D, dtype=args.dtype, device=args.device, repeats=args.repeats)
                results[H, D, T, impl] = _measure_point(**point)
                print(f"{H}x{D} T={T} {impl}: {results[H, D, T, impl]}", file=sys.stderr, flush=True)
            rows.append((H, D, T, B))

    report = [
        "# Feedback solve: fwd+bwd time and peak memory",
        "",
        f"- Machine: {_machine(args.device)}; torch {torch.__version__}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `sessa-scale bench solve {shlex.join(argv if argv is not None else sys.argv[1:])}`"
        " (same as `python -m sessa_scale.bench.solve ...`)",
        f"- dtype {args.dtype}; layout HxD = H heads with Dk = Dv = D; time = median of {args.repeats} fwd+bwd calls",
        "- Peak memory of the op: " + (f"max_memory_allocated over {WARM_CALLS} warm fwd+bwd calls minus the inputs (cached CUDA graphs count)" if args.device.startswith("cuda") else
            "growth of peak RSS (VmHWM, reset after allocating inputs) over one fwd+bwd, in a fresh subprocess"
            " per point with MALLOC_MMAP_THRESHOLD_=65536 (freed blocks >= 64 KiB go back to the OS)"),
        "",
        *_tables(impls, rows, results),
    ]
    emit_report("\n".join(report), args.out)
    return 0


def _tables(impls: list[str], rows: list[tuple[int, int, int, int]], results: dict) -> list[str]:
    """Markdown lines: the timing/memory table (ratios vs impls[0]) and the memory growth per T step."""
    first = impls[0]
    header = ["layout (HxD)", "B", "T"] + [f"{i} {c}" for i in impls for c in ("ms", "peak MiB")]
    header += [f"{i}/{first} {c}" for i in impls[1:] for c in ("time", "mem")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for H, D, T, B in rows:
        cells = [f"{H}x{D}", str(B), str(T)]
        for impl in impls:
            r = results[H, D, T, impl]
            if isinstance(r, str):
                cells += [r, "-"]
                continue
            cells += [SKIPPED, "-"] if r is None else [f"{r['ms']:.1f}", f"{r['peak_bytes'] / 2**20:.1f}"]
        for impl in impls[1:]:
            a, b = results[H, D, T, impl], results[H, D, T, first]
            a, b = (None if isinstance(x, str) else x for x in (a, b))
            for key in ("ms", "peak_bytes"):
                cells.append(_fmt_ratio(a and a[key], b and b[key]))
        lines.append("| " + " | ".join(cells) + " |")

    growth = ["| layout (HxD) | T | " + " | ".join(f"{i} peak mem x" for i in impls) + " |"]
    growth.append("|" + "---|" * (2 + len(impls)))
    for (H, D, T0, _), (H1, D1, T1, _) in zip(rows, rows[1:]):
        if (H, D) == (H1, D1):
            peaks = [[(r if isinstance(r, dict) else {}).get("peak_bytes")
                      for r in (results[H, D, t, i] for t in (T1, T0))] for i in impls]
            cells = [_fmt_ratio(*pair) for pair in peaks]
            growth.append(f"| {H}x{D} | {T0} -> {T1} (x{T1 / T0:g}) | " + " | ".join(cells) + " |")

    return [
        *lines,
        "",
        "Peak-memory growth between consecutive T (linear memory: x2 per doubling of T; quadratic: x4):",
        "",
        *growth,
        "",
    ]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
