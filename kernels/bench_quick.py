"""Quick GPU timing of the feedback solve kernels (used by kernels/gpu_check.sh).

    python -m kernels.bench_quick --layouts 6x128,1x768 --seq-lens 2048,8192 [--impls triton,sdpa,fla,dense]

B = batch_tokens // T; bf16 inputs; fwd+bwd median ms via triton.testing.do_bench, peak memory
of one fwd+bwd (max_memory_allocated minus the inputs). Prints one line per point and a table.
The committed benchmark table comes from `sessa-scale bench solve` (sessa_scale/bench/solve.py).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import triton

from sessa_scale.bench import cuda_peak_bytes


def _solve_impl(name):
    if name == "triton":
        from sessa_scale.ops.feedback_triton import feedback_solve_triton
        return feedback_solve_triton
    if name == "dense":
        from sessa_scale.ops.feedback_reference import feedback_solve_dense
        return feedback_solve_dense
    if name == "chunked":
        from sessa_scale.ops.feedback_chunked import feedback_solve_chunked
        return feedback_solve_chunked
    if name == "fla":
        from kernels.baselines import fla_deltaformer_solve
        return fla_deltaformer_solve
    raise KeyError(name)


def point(name, B, T, H, D, dtype=torch.bfloat16, fwd_only=False):
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=gen, device="cuda").to(dtype)  # noqa: E731
    if name == "sdpa":
        q, k, v = (mk(B, H, T, D).requires_grad_() for _ in range(3))
        do = mk(B, H, T, D)

        def fn():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if not fwd_only:
                o.backward(do)
    else:
        impl = _solve_impl(name)
        q, k, f = (mk(B, T, H, D).requires_grad_() for _ in range(3))
        g = (0.9 * torch.tanh(torch.randn(B, T, H, generator=gen, device="cuda"))).to(dtype).requires_grad_()
        ds = mk(B, T, H, D)

        def fn():
            s = impl(q, k, g, f, 1.0 / math.sqrt(D))
            if not fwd_only:
                s.backward(ds)
    fn()
    peak = cuda_peak_bytes(fn)
    ms = triton.testing.do_bench(fn, warmup=20, rep=60, return_mode="median")
    return ms, peak


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default="6x128,16x64,1x768,1x2048")
    ap.add_argument("--seq-lens", default="2048,8192,16384,32768")
    ap.add_argument("--impls", default="triton,sdpa,fla,dense")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--max-dense-gib", type=float, default=30.0)
    a = ap.parse_args(argv)
    rows = []
    for lay in a.layouts.split(","):
        H, D = (int(x) for x in lay.split("x"))
        for T in (int(t) for t in a.seq_lens.split(",")):
            B = max(1, a.batch_tokens // T)
            res = {}
            for name in a.impls.split(","):
                if name in ("sdpa", "fla") and D > 256:
                    continue
                if name == "dense" and 6 * B * H * T * T * 4 > a.max_dense_gib * 2**30:
                    continue
                try:
                    res[name] = point(name, B, T, H, D, fwd_only=a.fwd_only)
                except Exception as e:  # report and go on
                    print(f"{lay} T={T} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    torch.cuda.empty_cache()
                    continue
                print(f"{lay} T={T} B={B} {name}: {res[name][0]:.3f} ms, peak {res[name][1] / 2**30:.3f} GiB",
                      flush=True)
                torch.cuda.empty_cache()
            rows.append((lay, T, B, res))
    print("\n| layout | T | B | " + " | ".join(f"{n} ms" for n in a.impls.split(",")) + " | triton/sdpa | triton/dense |")
    for lay, T, B, res in rows:
        cells = [f"{res[n][0]:.2f}" if n in res else "-" for n in a.impls.split(",")]
        tr = res.get("triton", (None,))[0]
        r1 = f"{tr / res['sdpa'][0]:.2f}" if tr and "sdpa" in res else "-"
        r2 = f"{res['dense'][0] / tr:.1f}x faster" if tr and "dense" in res else "-"
        print(f"| {lay} | {T} | {B} | " + " | ".join(cells) + f" | {r1} | {r2} |")


if __name__ == "__main__":
    main()
