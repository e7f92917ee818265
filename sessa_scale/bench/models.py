"""Diagnostic: the bare training step of a matched trio (Sessa, Transformer, Mamba-2) outside
DeepSpeed and the data loader, and the Transformer's MFU, as a Markdown table. The headline training
speed is `sessa-scale bench train` (real `sessa-scale train` runs), which runs this module beside
each row (`python -m sessa_scale.bench.models ... --json FILE`) to show what the trainer adds.

For each architecture and T: configs/<arch>/<size>.yaml with data.seq_len = T, built on CUDA with
fp32 weights; one training step = bf16 autocast forward with the model's own loss (model(inputs,
targets): cross-entropy on random tokens, as the trainer's lm_loss), backward, gradient clipping and
the project's AdamW from sessa_scale.training.optimizer.build_optimizer (fused on CUDA), as the trainer
does (without DeepSpeed, so that this runs where DeepSpeed is not installed). --compile compiles the
model with the trainer's train.compile helper (sessa_scale.training.compile). B = batch_tokens // T
sequences per step. Time: CUDA-synchronized wall clock of --steps steps after --warmup steps;
memory: max_memory_allocated over the measured steps (weights, grads and AdamW state included).

Both a full step and forward + loss + backward alone are timed.
MFU (Transformer only) divides the analytic model FLOPs of sessa_scale.models.flops (every matrix
product, causal attention over its triangle, forward + backward = 3x forward, LM head included) by the
GPU's dense bf16 peak (sessa_scale.metrics.PEAK_BF16_TFLOPS; an unknown GPU gets no MFU). The
Megatron/PaLM convention counts the full T x T attention square; that figure is shown too, because the
"up to 47%" anchor uses it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from sessa_scale.bench import emit_report
from sessa_scale.config import load_config
from sessa_scale.metrics import peak_bf16_flops_of
from sessa_scale.models.registry import build_model, count_parameters, count_training_flops
from sessa_scale.models.transformer import full_square_attention_extra
from sessa_scale.training.compile import compile_for_training
from sessa_scale.training.optimizer import build_optimizer
from sessa_scale.training.precision import autocast

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _seconds_per_call(fn, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def measure(arch: str, size: str, T: int, batch_tokens: int, steps: int, warmup: int, compile_model: bool) -> dict:
    """Seconds per fwd+bwd and per full training step, and peak memory, of configs/<arch>/<size>.yaml
    at sequence length T."""
    cfg = load_config(CONFIGS / arch / f"{size}.yaml", [f"data.seq_len={T}"])
    B = max(1, batch_tokens // T)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    if compile_model:
        torch._dynamo.reset()  # each row compiles afresh (no recompile limit reached across rows)
        compile_for_training(model)
    tokens = torch.randint(0, cfg.model.vocab_size, (B, T + 1), device="cuda")
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # as the data loader delivers them

    def fwd_bwd():
        with autocast(cfg.train.precision, "cuda"):
            loss = model(inputs, targets)  # the trainer's lm_loss
        loss.backward()

    def fwd_bwd_only():
        fwd_bwd()
        optimizer.zero_grad(set_to_none=True)

    def train_step():
        fwd_bwd()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    row = {
        "arch": arch, "T": T, "B": B, "oom": False, "params": count_parameters(cfg.model).total,
        "optimizer": "fused AdamW" if optimizer.param_groups[0].get("fused") else "foreach AdamW",
    }
    try:
        for _ in range(warmup):
            train_step()
        torch.cuda.reset_peak_memory_stats()
        row["fwd_bwd_s"] = _seconds_per_call(fwd_bwd_only, steps)
        row["step_s"] = _seconds_per_call(train_step, steps)
        row["peak_bytes"] = torch.cuda.max_memory_allocated()
    except torch.cuda.OutOfMemoryError:
        row["oom"] = True
    finally:
        del model, optimizer
        torch.cuda.empty_cache()
    if arch == "transformer":
        row["flops_per_token"] = count_training_flops(cfg.model, T)
        row["flops_per_token_full_square"] = row["flops_per_token"] + full_square_attention_extra(cfg.model, T)
    return row


def format_report(rows: list[dict], args, argv: list[str], peak: float | None) -> str:
    device = torch.cuda.get_device_name()
    lines = [
        f"# Training throughput of the matched {args.size} trio",
        "",
        f"- Machine: {device}; torch {torch.__version__}; peak bf16 {peak / 1e12:.1f} TFLOP/s" if peak
        else f"- Machine: {device}; torch {torch.__version__}; peak bf16 unknown (no MFU)",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `python -m sessa_scale.bench.models {shlex.join(argv)}` (diagnostic; the training speed is `sessa-scale bench train`)",
        f"- One step = the trainer's: bf16-autocast forward with the model's loss (cross-entropy over float32 logits)"
        f" + backward + grad clip + the trainer's AdamW (build_optimizer: fused on CUDA), fp32 weights,"
        f" {args.batch_tokens} tokens per step (B = {args.batch_tokens} // T; halved after an out-of-memory row); 'fwd+bwd' times forward + loss +"
        f" backward alone. Means of {args.steps} calls after {args.warmup} warm-up steps;"
        f" {'torch.compile as train.compile=true' if args.compile else 'eager (train.compile=false, the default)'}; peak memory over the timed calls.",
        "- MFU: analytic model FLOPs (sessa_scale.models.flops: all matrix products, causal attention, LM head) over"
        " the peak; 'MFU, full square' counts the whole T x T attention square as Megatron/PaLM do.",
        "",
        "| arch | T | B | params | fwd+bwd ms | fwd+bwd tokens/s | step ms | step tokens/s | step vs Transformer"
        " | peak GiB | step TFLOP/s | MFU fwd+bwd | MFU step | MFU step, full square | tokens/step | compile | optimizer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["T"]: r for r in rows if r["arch"] == "transformer" and not r["oom"]}
    compiled = "yes" if args.compile else "no"
    for r in rows:
        if r["oom"]:
            lines.append(f"| {r['arch']} | {r['T']} | {r['B']} | {r['params'] / 1e6:.1f}M | out of memory |" + " |" * 9
                         + f" {r['B'] * r['T']} | {compiled} | {r['optimizer']} |")
            continue
        tokens = r["B"] * r["T"]
        ratio = f"{base[r['T']]['step_s'] / r['step_s']:.2f}" if r["T"] in base else ""
        tflops = mfu_fb = mfu = mfu_sq = ""
        if "flops_per_token" in r:
            tflops = f"{r['flops_per_token'] * tokens / r['step_s'] / 1e12:.0f}"
            if peak:
                mfu_fb = f"{r['flops_per_token'] * tokens / r['fwd_bwd_s'] / peak:.1%}"
                mfu = f"{r['flops_per_token'] * tokens / r['step_s'] / peak:.1%}"
                mfu_sq = f"{r['flops_per_token_full_square'] * tokens / r['step_s'] / peak:.1%}"
        lines.append(
            f"| {r['arch']} | {r['T']} | {r['B']} | {r['params'] / 1e6:.1f}M | {1e3 * r['fwd_bwd_s']:.1f} | "
            f"{tokens / r['fwd_bwd_s']:,.0f} | {1e3 * r['step_s']:.1f} | {tokens / r['step_s']:,.0f} | {ratio} | "
            f"{r['peak_bytes'] / 2**30:.1f} | {tflops} | {mfu_fb} | {mfu} | {mfu_sq} | {tokens} | {compiled} | {r['optimizer']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m sessa_scale.bench.models", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="350m", help="trio size: configs/<arch>/<size>.yaml")
    ap.add_argument("--archs", default="transformer,sessa,mamba2")
    ap.add_argument("--seq-lens", default="2048,8192")
    ap.add_argument("--batch-tokens", type=int, default=16384,
                    help="tokens per step (B = this // T); a model that runs out of memory is retried with half")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model, as train.compile=true does in the trainer (default: eager)")
    ap.add_argument("--out", type=Path, help="also write the Markdown table here")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here (for sessa-scale bench train)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("bench models needs a CUDA device")
    rows = []
    for T in (int(t) for t in args.seq_lens.split(",")):
        for arch in args.archs.split(","):
            batch_tokens = args.batch_tokens
            while True:  # out of memory: record it, then retry with half the tokens per step (B >= 1)
                rows.append(measure(arch, args.size, T, batch_tokens, args.steps, args.warmup, args.compile))
                print(rows[-1], file=sys.stderr, flush=True)
                if not rows[-1]["oom"] or batch_tokens // 2 < T:
                    break
                batch_tokens //= 2
    if args.json:
        args.json.write_text(json.dumps(rows))
    report = format_report(rows, args, argv, peak_bf16_flops_of(torch.cuda.get_device_name()))
    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
