"""`sessa-scale bench ssd`: Mamba-2's SSD scan alone, fwd and fwd+bwd time and peak memory, against
SDPA flash attention of the same token count, as a Markdown table.

Shapes from the matched trio of --size: the SSD from configs/mamba2/<size>.yaml (H = expand d_model /
head_dim heads of width P, state N, G groups, the chunk of model.ssm_chunk), attention from
configs/transformer/<size>.yaml (its heads and head width, causal). B = batch_tokens // T sequences;
inputs in --dtype (x, B, C; dt and A in float32, as the model's softplus and A_log make them).
Implementations (--impls):

* triton: ours (kernels/ssd.py); "triton@32" runs it with chunk 32 instead of the config's.
* chunked: the PyTorch chunked scan (recomputed in backward), what `auto` ran on Hopper before.
* fla: fla-core's chunk_simple_gla, where installed and not flagged as wrong on this GPU.
* sdpa_flash: causal SDPA, flash backend, the Transformer's heads.
* conv: the Mamba-2 mixer's three causal depthwise convs + SiLU as the model runs them (one conv over [x | B | C]).
* mamba2_block, transformer_block: one residual block of each model as built for training (float32
  parameters, bf16 autocast, as `bench models`); the report adds n_layers x block time per model,
  so the scan's and the convs' shares of a Mamba-2 layer show next to the Transformer's layer.

Time: median of triton.testing.do_bench over --rep ms; memory: cuda_peak_bytes of three warm fwd+bwd
calls beyond the inputs. "rel. err." compares the impl's y with the chunked scan's in float32 on the same
inputs (relative L2). A point that fails shows "FAILED" in the table, its traceback goes to stderr,
and the command exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from sessa_scale.bench import WARM_CALLS, cuda_peak_bytes, emit_report
from sessa_scale.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEVICE = "cuda"  # the CPU smoke test of this module's plumbing sets "cpu"


def _shapes(size: str) -> dict:
    m = load_config(CONFIGS / "mamba2" / f"{size}.yaml").model
    t = load_config(CONFIGS / "transformer" / f"{size}.yaml").model
    return {"H": m.ssm_expand * m.d_model // m.ssm_head_dim, "P": m.ssm_head_dim, "N": m.ssm_state,
            "G": m.ssm_groups, "chunk": m.ssm_chunk, "conv": m.ssm_conv, "attn_heads": t.n_heads,
            "attn_dim": t.d_model // t.n_heads, "mamba2": m, "transformer": t}


def _block_point(arch: str, B: int, T: int, s: dict, dtype: torch.dtype):
    """One block of `arch` (float32 parameters) under autocast to dtype: (fwd, fwd+bwd)."""
    from sessa_scale.models.registry import ARCHITECTURES

    cfg = s[arch]
    block = ARCHITECTURES[arch].build_block(cfg, 0).to(DEVICE)
    gen = torch.Generator(DEVICE).manual_seed(0)
    u = torch.randn(B, T, cfg.d_model, generator=gen, device=DEVICE).requires_grad_()

    def fwd():
        with torch.autocast(DEVICE, dtype=dtype):
            return block(u)

    return fwd, lambda: fwd().float().square().mean().backward()


def _ssd_inputs(B, T, s, dtype):
    gen = torch.Generator(DEVICE).manual_seed(0)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=DEVICE).to(dt)

    x, Bm, Cm = rand(B, T, s["H"], s["P"]), rand(B, T, s["G"], s["N"]), rand(B, T, s["G"], s["N"])
    dt = F.softplus(rand(B, T, s["H"], dt=torch.float32) - 3.0)
    A = -torch.exp(torch.rand(s["H"], generator=gen, device=DEVICE) * 2.7)
    return [t.requires_grad_() for t in (x, dt, A, Bm, Cm)], rand(B, T, s["H"], s["P"])


def _point(impl: str, B: int, T: int, s: dict, dtype: torch.dtype):
    """-> (forward fn, fwd+bwd fn, forward output or None for y-less impls)."""
    from sessa_scale.ops.ssd import ssd_scan

    if impl == "sdpa_flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        gen = torch.Generator(DEVICE).manual_seed(0)
        q, k, v = (torch.randn(B, s["attn_heads"], T, s["attn_dim"], generator=gen, device=DEVICE).to(dtype)
                   .requires_grad_() for _ in range(3))
        do = torch.randn_like(q)

        def fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return fwd, lambda: fwd().backward(do), None
    if impl in ("mamba2_block", "transformer_block"):
        return (*_block_point(impl.removesuffix("_block"), B, T, s, dtype), None)
    if impl == "conv":
        from sessa_scale.models.mamba2 import build_mamba2_block

        mixer = build_mamba2_block(s["mamba2"], 0).mixer.to(DEVICE)
        gen = torch.Generator(DEVICE).manual_seed(0)
        channels = mixer.conv_weights()[0].shape[1]
        conv_in = torch.randn(B, T, channels, generator=gen, device=DEVICE).to(dtype).requires_grad_()

        def fwd():
            with torch.autocast(DEVICE, dtype=dtype):
                return mixer.causal_conv(conv_in)

        def fwd_bwd():
            out = fwd()
            out.backward(out)

        return fwd, fwd_bwd, None
    name, _, chunk = impl.partition("@")
    (x, dt, A, Bm, Cm), dy = _ssd_inputs(B, T, s, dtype)
    chunk = int(chunk or s["chunk"])

    def fwd():
        return ssd_scan(x, dt, A, Bm, Cm, chunk_size=chunk, impl=name)[0]

    return fwd, lambda: fwd().backward(dy), (x, dt, A, Bm, Cm)


def _rel_err_vs_chunked(y: torch.Tensor, inputs, chunk: int) -> float:
    from sessa_scale.ops.ssd_reference import ssd_chunked

    with torch.no_grad():
        x, dt, A, Bm, Cm = (t.detach().float() for t in inputs)
        ref = ssd_chunked(x, dt, A, Bm, Cm, chunk_size=chunk)[0]
    return ((y.float() - ref).norm() / ref.norm()).item()


def measure(impl: str, B: int, T: int, s: dict, dtype: torch.dtype, rep: int) -> dict:
    import triton

    fwd, fwd_bwd, inputs = _point(impl, B, T, s, dtype)
    fwd_bwd()  # compile / warm up
    row = {"fwd_ms": triton.testing.do_bench(fwd, rep=rep, return_mode="median"),
           "ms": triton.testing.do_bench(fwd_bwd, rep=rep, return_mode="median"),
           "peak_bytes": cuda_peak_bytes(fwd_bwd, warm=True)}
    if inputs is not None and impl != "chunked":
        with torch.no_grad():
            row["rel_err"] = _rel_err_vs_chunked(fwd(), inputs, s["chunk"])
    return row


def available_impls() -> dict[str, str]:
    """impl -> why it cannot run here ("" when it can)."""
    from sessa_scale.ops.ssd import fla_available, simple_gla_backward_is_broken, triton_available

    fla = "" if fla_available() and not simple_gla_backward_is_broken() else (
        "fla-core not installed" if not fla_available() else "fla flags its backward as wrong on this GPU")
    return {"triton": "" if triton_available() else "triton not installed", "chunked": "", "fla": fla,
            "sdpa_flash": "", "conv": "", "mamba2_block": "", "transformer_block": ""}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="sessa-scale bench ssd", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="350m", help="shapes from configs/{mamba2,transformer}/<size>.yaml")
    ap.add_argument("--seq-lens", default="2048,8192,16384")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="B = max(1, this // T)")
    ap.add_argument("--impls", default="sdpa_flash,triton,chunked,fla,conv,mamba2_block,transformer_block",
                    help="comma-separated: triton[@CHUNK], chunked, fla, sdpa_flash, conv, mamba2_block,"
                         " transformer_block (ratios are vs the first)")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--rep", type=int, default=100, help="milliseconds of timed calls per point (do_bench)")
    ap.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("bench ssd needs a CUDA device")
    impls = args.impls.split(",")
    reasons = available_impls()
    unknown = [i for i in impls if i.partition("@")[0] not in reasons]
    if unknown:
        ap.error(f"unknown impls {unknown}; choose from triton[@CHUNK], {', '.join(list(reasons)[1:])}")
    s, dtype = _shapes(args.size), DTYPES[args.dtype]
    rows, failed = [], False
    for T in (int(t) for t in args.seq_lens.split(",")):
        B = max(1, args.batch_tokens // T)
        for impl in impls:
            why = reasons[impl.partition("@")[0]]
            if why:
                rows.append((T, B, impl, f"n/a ({why})"))
                continue
            try:
                rows.append((T, B, impl, measure(impl, B, T, s, dtype, args.rep)))
            except Exception as exc:  # report every point; exit 1 at the end
                failed = True
                traceback.print_exc()
                rows.append((T, B, impl, f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
            print(f"T={T} B={B} {impl}: {rows[-1][3]}", file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    emit_report(_report(rows, impls, s, args, argv), args.out)
    return 1 if failed else 0


def _report(rows, impls, s, args, argv) -> str:
    first = impls[0]
    base = {T: r for T, _, i, r in rows if i == first and isinstance(r, dict)}
    lines = [
        "# SSD scan alone: fwd and fwd+bwd time, vs SDPA flash of the same token count",
        "",
        f"- Machine: {torch.cuda.get_device_name()}; torch {torch.__version__}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `sessa-scale bench ssd {shlex.join(argv)}` (= `python -m sessa_scale.bench.ssd ...`)",
        f"- {args.size} shapes: SSD {s['H']} heads x P={s['P']}, N={s['N']}, G={s['G']}, chunk {s['chunk']}; attention"
        f" {s['attn_heads']} heads x {s['attn_dim']}, causal; conv = the mixer's 3 depthwise convs (width {s['conv']})"
        f" + SiLU; {args.dtype}; {args.batch_tokens} tokens per call (B = tokens // T)",
        f"- Time: median of triton.testing.do_bench over {args.rep} ms; peak: max_memory_allocated of {WARM_CALLS} warm fwd+bwd calls"
        " beyond the inputs; rel. err.: y vs the chunked scan in float32 on the same inputs",
        "",
        f"| T | B | impl | fwd ms | fwd+bwd ms | fwd+bwd / {first} | peak MiB | rel. err. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for T, B, impl, r in rows:
        if not isinstance(r, dict):
            lines.append(f"| {T} | {B} | {impl} | {r} | | | | |")
            continue
        ratio = f"{r['ms'] / base[T]['ms']:.2f}" if T in base else ""
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        lines.append(f"| {T} | {B} | {impl} | {r['fwd_ms']:.3f} | {r['ms']:.3f} | {ratio} | "
                     f"{r['peak_bytes'] / 2**20:.0f} | {err} |")
    blocks = [(T, i, r) for T, _, i, r in rows if i.endswith("_block") and isinstance(r, dict)]
    if blocks:
        lines += ["", "Blocks times layers (the models' layer stacks alone, fwd+bwd, no embedding/LM head/optimizer):", "",
                  "| T | model | layers | block fwd+bwd ms | x layers ms |", "|---|---|---|---|---|"]
        for T, impl, r in blocks:
            n = s[impl.removesuffix("_block")].n_layers
            lines.append(f"| {T} | {impl.removesuffix('_block')} | {n} | {r['ms']:.3f} | {n * r['ms']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
