"""`sessa-scale bench layer`: one SessaLayer vs one block of the project's Transformer, fwd+bwd time and
peak memory.

Both blocks are built as the trained models build them: sessa_scale.models.registry's block builder
for the model section of configs/<arch>/<size>.yaml (default the 350m trio: GELU MLP of 4 D, RoPE,
SDPA attention; Sessa with one feedback head of width D and solver "auto", the Triton solve on CUDA),
with --d-model and --heads overriding the width and the forward heads (default D = 768, 12 heads of
64, the 350m head width).  Parameters are fp32 and the blocks run under the training precision
(--precision bf16: bf16 autocast, as train.precision=bf16); x and the upstream gradient are fp32
(B, T, D) with B = batch_tokens // T, as a block sees them inside the model.

Time, two ways, the blocks taking turns after warm-up rounds (both see the same clocks and host load):
per call, the median of --repeats fwd+bwd calls each synchronized before and after (CUDA-synchronized
wall clock: the host's launch latency counts where the device waits on it, as in a lone layer); back
to back, the median over BACK_TO_BACK_ROUNDS runs of --repeats calls issued without waiting, per call
(the host runs ahead as it does between the layers of a model, so a call costs the device's time);
memory: max_memory_allocated over three warm fwd+bwd calls of one block minus what was allocated
before the first call (parameters and inputs excluded; parameter gradients and the feedback
solve's cached CUDA graphs count).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

import torch
import torch.nn as nn

from sessa_scale.bench import WARM_CALLS, cuda_peak_bytes, emit_report, interleaved_ms
from sessa_scale.config import load_config
from sessa_scale.models.registry import ARCHITECTURES
from sessa_scale.ops.graph_cache import GRAPHS
from sessa_scale.training.precision import autocast

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRECISIONS = ("bf16", "fp32")
ARCHS = ("transformer", "sessa")


def build_block(arch: str, size: str, D: int, heads: int, solver: str) -> nn.Module:
    """Block 0 of configs/<arch>/<size>.yaml's model with width D and `heads` forward heads."""
    overrides = [f"model.d_model={D}", f"model.n_heads={heads}"]
    if arch == "sessa":
        overrides.append(f"model.solver={solver}")
    cfg = load_config(CONFIGS / arch / f"{size}.yaml", overrides)
    return ARCHITECTURES[cfg.model.arch].build_block(cfg.model, 0)


WARMUP_ROUNDS = 3  # untimed rounds of both blocks before the timed ones (the solve's graphs settle on their addresses)
BACK_TO_BACK_ROUNDS = 5  # runs of --repeats calls issued back to back, per block (the median run counts)


def fwd_bwd_step(module: nn.Module, B: int, T: int, D: int, precision: str, device: str):
    """A closure running one fwd+bwd of `module` on fixed random fp32 (B, T, D) inputs under `precision`."""
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(B, T, D, generator=gen, device=device).requires_grad_()
    dy = torch.randn(B, T, D, generator=gen, device=device)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        with autocast(precision, x.device):  # the trainer's precision rule (training/precision.py)
            y = module(x)
        y.backward(dy)

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sessa-scale bench layer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="350m", help="configs/<arch>/<size>.yaml the blocks are built from")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12, help="forward-attention heads (both blocks)")
    ap.add_argument("--seq-lens", default="2048,8192,16384")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--precision", default="bf16", choices=PRECISIONS, help="as train.precision")
    ap.add_argument("--solver", default="auto", help="feedback_solve impl of the SessaLayer (model.solver)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        ap.error("bench layer needs a CUDA device")
    D, H = args.d_model, args.heads
    rows = []
    for T in (int(t) for t in args.seq_lens.split(",")):
        B = max(1, args.batch_tokens // T)
        blocks = {arch: build_block(arch, args.size, D, H, args.solver).to(args.device) for arch in ARCHS}
        steps = {arch: fwd_bwd_step(blocks[arch], B, T, D, args.precision, args.device) for arch in ARCHS}
        peaks = {arch: cuda_peak_bytes(steps[arch], args.device, warm=True) for arch in ARCHS}
        sync = lambda: torch.cuda.synchronize(args.device)  # noqa: E731
        ms = interleaved_ms(steps, args.repeats, sync, WARMUP_ROUNDS)
        b2b = interleaved_ms(steps, BACK_TO_BACK_ROUNDS, sync, calls=args.repeats)
        res = {arch: {"ms": ms[arch], "b2b_ms": b2b[arch], "peak_bytes": peaks[arch]} for arch in ARCHS}
        solve_calls = dict(GRAPHS.counts)  # the feedback solve's forwards and backwards by graph mode
        print(f"T={T} B={B}: {res} solve calls {solve_calls}", file=sys.stderr, flush=True)
        del blocks, steps
        torch.cuda.empty_cache()
        rows.append((T, B, res))
    lines = [
        "# SessaLayer vs the project's Transformer block: fwd+bwd time and peak memory",
        "",
        f"- Machine: {torch.cuda.get_device_name(args.device)}; torch {torch.__version__}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `sessa-scale bench layer {shlex.join(argv if argv is not None else sys.argv[1:])}`"
        " (same as `python -m sessa_scale.bench.layer ...`)",
        f"- Blocks of configs/{{transformer,sessa}}/{args.size}.yaml (model.d_model={D}, model.n_heads={H};"
        f" Sessa: one feedback head of width {D}, solver={args.solver}), fp32 parameters, precision {args.precision}"
        f" ({'bf16 autocast, as training' if args.precision == 'bf16' else 'fp32'}), {args.batch_tokens} tokens per"
        f" step; time per call = median of {args.repeats} synchronized fwd+bwd calls of each block, the blocks taking"
        f" turns after {WARMUP_ROUNDS} untimed rounds; back to back = median over {BACK_TO_BACK_ROUNDS} runs of"
        f" {args.repeats} calls issued without waiting, per call (the host runs ahead, as between a model's"
        f" layers: the device's time); memory = max_memory_allocated over {WARM_CALLS} warm calls of one block minus"
        " what was allocated before the first one (parameter gradients and cached CUDA graphs count)",
        "",
        "| T | B | Transformer ms | Sessa ms | Sessa/Transformer time | Transformer ms back to back"
        " | Sessa ms back to back | Sessa/Transformer back to back | Transformer peak MiB | Sessa peak MiB"
        " | Sessa/Transformer memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for T, B, r in rows:
        t, s = r["transformer"], r["sessa"]
        lines.append(f"| {T} | {B} | {t['ms']:.2f} | {s['ms']:.2f} | {s['ms'] / t['ms']:.2f} | "
                     f"{t['b2b_ms']:.2f} | {s['b2b_ms']:.2f} | {s['b2b_ms'] / t['b2b_ms']:.2f} | "
                     f"{t['peak_bytes'] / 2**20:.0f} | {s['peak_bytes'] / 2**20:.0f} | "
                     f"{s['peak_bytes'] / t['peak_bytes']:.2f} |")
    emit_report("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
