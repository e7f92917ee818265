"""Quick GPU timing, config sweeps and kernel profiles of the feedback solve (used by kernels/gpu_check.sh).

    python -m sessa_scale.bench.solve_quick --layouts 6x128,1x768 --seq-lens 2048,8192 [--impls triton,sdpa_flash,dense]
    python -m sessa_scale.bench.solve_quick --layouts 6x128 --seq-lens 8192 --configs "default;FWD_BM=64;BWD_WARPS=4"
    python -m sessa_scale.bench.solve_quick --layouts 6x128,1x768 --seq-lens 16384 --profile
    python -m sessa_scale.bench.solve_quick --layouts 6x128 --seq-lens 16384 --profile --configs "default;BWD_WARPS=4"

Implementations: the registry of ``sessa-scale bench solve`` (bench/solve.py IMPLS).
B = batch_tokens // T; bf16 inputs; fwd+bwd median ms via triton.testing.do_bench, peak memory over
three warm fwd+bwd calls (as ``sessa-scale bench solve``).  --configs: the Triton solve under each config
(SolveConfig fields as in SESSA_TRITON_CFG, "default" = the defaults), in this process.  --profile: the
GPU kernels of three Triton fwd+bwd calls by total time (torch.profiler), against their wall time, under
each of --configs when given, with the host's time to issue a call beside the call's synchronized time.
Markdown tables go to stdout and, with --out, to a file.  The committed benchmark tables come from
`sessa-scale bench solve` / `bench layer`.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import triton

from sessa_scale.bench import cuda_peak_bytes, emit_report
from sessa_scale.bench.solve import IMPLS, MAX_HEAD_DIM, QUADRATIC_MEMORY_FACTOR, fwd_bwd, make_inputs
from sessa_scale.ops.feedback_triton import SolveConfig, feedback_solve_triton, parse_config
from sessa_scale.ops.graph_cache import GRAPHS, clear_graphs


def fwd_bwd_fn(name, B, T, H, D, dtype=torch.bfloat16, cfg=None):
    """A closure running one fwd+bwd of ``IMPLS[name]`` (the Triton solve under ``cfg`` when given)
    on fixed random inputs on CUDA (as ``sessa-scale bench solve``)."""
    solve = IMPLS[name] if cfg is None else functools.partial(feedback_solve_triton, config=cfg)
    inputs, upstream = make_inputs(B, T, H, D, dtype, "cuda")
    return lambda: fwd_bwd(solve, inputs, upstream)


def point(fn) -> tuple[float, int]:
    """(median ms, warm peak bytes) of a fwd+bwd closure."""
    peak = cuda_peak_bytes(fn, warm=True)
    return triton.testing.do_bench(fn, warmup=20, rep=60, return_mode="median"), peak


def host_and_synchronized_ms(fn, calls: int = 7) -> tuple[float, float]:
    """Medians over `calls` fwd+bwd calls, each begun on an idle GPU: the host's time to issue the call
    (until fn returns) and the call's synchronized time.  Close together: the host sets the pace."""
    host, synchronized = [], []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append(t1 - t0)
        synchronized.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(host), 1e3 * statistics.median(synchronized)


def profile(fn, calls: int = 3, top: int = 14) -> list[str]:
    """Markdown rows: the host's issue time and the synchronized time of a call
    (host_and_synchronized_ms), the GPU kernels of `calls` fwd+bwd calls by total time, the wall
    time under the profiler, and how the solve's forwards and backwards ran (graph_cache.GRAPHS.counts
    over all 9 + `calls` calls)."""
    clear_graphs()
    fn()
    fn()  # compiled, and captured where CUDA graphs apply
    host, synchronized = host_and_synchronized_ms(fn)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / calls
    per_kernel, launches = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name if len(e.name) < 48 else e.name[:45] + "..."
            per_kernel[name] += e.time_range.elapsed_us() / calls
            launches[name] += 1
    total = sum(per_kernel.values())
    graph_calls = ", ".join(f"{k} {v}" for k, v in sorted(GRAPHS.counts.items())) or "none"
    rows = [f"| host issue per call (no profiler) | {host:.2f} ms | synchronized {synchronized:.2f} ms |",
            f"| wall per call (profiled) | {1e3 * wall:.2f} ms | GPU busy {total / 1e3:.2f} ms |",
            f"| forwards and backwards by graph mode | {graph_calls} | |"]
    for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]:
        rows.append(f"| `{name}` | {us / 1e3:.3f} ms | {launches[name] // calls} per call |")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default="6x128,16x64,1x768,1x2048")
    ap.add_argument("--seq-lens", default="2048,8192,16384,32768")
    ap.add_argument("--impls", default=",".join(n for n in ("triton", "sdpa_flash", "fla_deltaformer", "dense") if n in IMPLS),
                    help=f"comma-separated, from {list(IMPLS)}")
    ap.add_argument("--configs", default="", help='";"-separated Triton configs to sweep ("default" = the defaults; a list may not begin with "-")')
    ap.add_argument("--profile", action="store_true", help="kernel-time tables of the Triton solve")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--max-dense-gib", type=float, default=30.0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    configs = a.configs.split(";") if a.configs else []
    impls = ["triton"] if a.profile or configs else a.impls.split(",")
    lines = []
    for lay in a.layouts.split(","):
        H, D = (int(x) for x in lay.split("x"))
        for T in (int(t) for t in a.seq_lens.split(",")):
            B = max(1, a.batch_tokens // T)
            sweep = [(c, parse_config("" if c in ("default", "-") else c, SolveConfig())) for c in configs]
            if a.profile:
                for label, cfg in sweep or [("default", None)]:
                    table = ["", f"### {lay}, T={T}, B={B}, config {label}", "", "| kernel | time per call | launches |",
                             "|---|---|---|", *profile(fwd_bwd_fn("triton", B, T, H, D, cfg=cfg))]
                    lines += table
                    print("\n".join(table), flush=True)
                    torch.cuda.empty_cache()
                continue
            for label, cfg in sweep or [(n, None) for n in impls]:
                name = "triton" if configs else label
                too_wide = D > MAX_HEAD_DIM.get(name, D)
                if too_wide or QUADRATIC_MEMORY_FACTOR.get(name, 0.0) * B * H * T * T * 4 > a.max_dense_gib * 2**30:
                    continue
                try:
                    ms, peak = point(fwd_bwd_fn(name, B, T, H, D, cfg=cfg))
                except Exception as e:  # report and go on
                    print(f"{lay} T={T} {label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                else:
                    lines.append(f"| {lay} | {T} | {B} | {label} | {ms:.3f} | {peak / 2**20:.0f} |")
                    print(lines[-1], flush=True)
                torch.cuda.empty_cache()
    head = [] if a.profile else ["| layout | T | B | impl / config | fwd+bwd ms | peak MiB |", "|" + "---|" * 6]
    emit_report("\n".join(head + lines) + "\n", a.out)


if __name__ == "__main__":
    main()
