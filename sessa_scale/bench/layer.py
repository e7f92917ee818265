"""`sessa-scale bench layer`: one SessaLayer vs one Transformer block, fwd+bwd time and peak memory.

Both at the same width D, heads and tokens per step (B = batch_tokens // T), in --dtype
(default bfloat16, parameters and activations), on CUDA by default:

* SessaLayer (sessa_scale/models/sessa.py, spec-exact; feedback solve impl from --solver,
  "auto" = the Triton kernels on CUDA), one feedback head of width D (the paper's setting).
* Transformer block (defined here for the benchmark): pre-norm LayerNorm -> causal multi-head
  attention with RoPE through SDPA (q/k/v/out projections with bias) -> residual; LayerNorm ->
  GELU MLP 4D -> residual.

Time: median of --repeats fwd+bwd calls (CUDA-synchronized wall clock, after warm-up);
memory: max_memory_allocated during a warm fwd+bwd minus what was allocated before the first
call (so the feedback solve's cached CUDA graphs count).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from sessa_scale.bench import cuda_peak_bytes, emit_report
from sessa_scale.models.attention import apply_rope, causal_attention, rope_inv_freq
from sessa_scale.models.sessa import SessaLayer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then + MLP(LN(.)), MLP = Linear(D,4D)-GELU-Linear(4D,D)."""

    def __init__(self, D: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, D // n_heads
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.register_buffer("rope_inv_freq", rope_inv_freq(self.head_dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        pos = torch.arange(T, device=x.device)
        q = apply_rope(q, pos, self.rope_inv_freq).to(v.dtype)
        k = apply_rope(k, pos, self.rope_inv_freq).to(v.dtype)
        x = x + self.proj(causal_attention(q, k, v).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def measure(module: nn.Module, B: int, T: int, D: int, dtype: torch.dtype, device: str, repeats: int) -> dict:
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(B, T, D, generator=gen, device=device).to(dtype).requires_grad_()
    dy = torch.randn(B, T, D, generator=gen, device=device).to(dtype)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(dy)

    peak = cuda_peak_bytes(step, warm=True)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(times), "peak_bytes": peak}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sessa-scale bench layer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12, help="forward-attention heads (both blocks)")
    ap.add_argument("--seq-lens", default="2048,8192,16384")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--solver", default="auto", help="feedback_solve impl of the SessaLayer")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        ap.error("bench layer needs a CUDA device")
    dtype, D, H = DTYPES[args.dtype], args.d_model, args.heads
    rows = []
    for T in (int(t) for t in args.seq_lens.split(",")):
        B = max(1, args.batch_tokens // T)
        res = {}
        for name, mod in (("transformer", TransformerBlock(D, H)), ("sessa", SessaLayer(D, H, solver=args.solver))):
            mod = mod.to(device=args.device, dtype=dtype)
            res[name] = measure(mod, B, T, D, dtype, args.device, args.repeats)
            print(f"T={T} B={B} {name}: {res[name]}", file=sys.stderr, flush=True)
            del mod
            torch.cuda.empty_cache()
        rows.append((T, B, res))
    lines = [
        "# SessaLayer vs Transformer block: fwd+bwd time and peak memory",
        "",
        f"- Machine: {torch.cuda.get_device_name(args.device)}; torch {torch.__version__}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `sessa-scale bench layer {shlex.join(argv if argv is not None else sys.argv[1:])}`"
        " (same as `python -m sessa_scale.bench.layer ...`)",
        f"- D={D}, {H} forward heads, one feedback head of width {D}, solver={args.solver}, {args.dtype},"
        f" {args.batch_tokens} tokens per step; time = median of {args.repeats} fwd+bwd calls;"
        " memory = max_memory_allocated of a warm call minus what was allocated before the first one (cached CUDA"
        " graphs count)",
        "",
        "| T | B | Transformer ms | Sessa ms | Sessa/Transformer time | Transformer peak MiB | Sessa peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for T, B, r in rows:
        t, s = r["transformer"], r["sessa"]
        lines.append(f"| {T} | {B} | {t['ms']:.2f} | {s['ms']:.2f} | {s['ms'] / t['ms']:.2f} | "
                     f"{t['peak_bytes'] / 2**20:.0f} | {s['peak_bytes'] / 2**20:.0f} |")
    report = "\n".join(lines) + "\n"
    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
