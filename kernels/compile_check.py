"""Compile the Mamba-2 Triton kernels (kernels/ssd.py, kernels/mamba2_fused.py) for a GPU
architecture on a machine without a GPU, and print each launch's registers, spills (STACK) and
shared memory: catches compile errors and register spills before device time is spent.

    python -m sessa_scale.kernels.compile_check [--arch 90] [--batch 8 --seq-len 2048 --dtype bfloat16 --chunk 64]
    SESSA_SSD_CFG="BN_DBC=64" python -m sessa_scale.kernels.compile_check   # a tile change, checked offline

One forward and backward of the SSD scan (the 350m shapes: 32 heads x 64, N = 128, one group) and of
the fused conv, norm and dt softplus run with every kernel launch replaced by a compile of that launch as the JIT
would specialize it (integers equal to 1 constant, multiples of 16 and aligned pointers marked),
for ``triton.backends.compiler.GPUTarget("cuda", arch, 32)``; nothing executes. Uses Triton's
compiler entry points (ASTSource, triton.compile) and the cuobjdump shipped in its wheel: a
developer tool, written against Triton 3.6-3.9.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import sessa_scale.kernels.mamba2_fused as KF
import sessa_scale.kernels.ssd as KS

_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def _specialize(kern, args, kwargs):
    """(signature, constexprs, attrs) of one launch, as the JIT would specialize it."""
    skip = {kern.arg_names[i] if isinstance(i, int) else i for i in kern.do_not_specialize}
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(kern.arg_names):
        value = kwargs[name] if name in kwargs else args[i]
        if name in kwargs:
            sig[name], consts[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name], attrs[(i,)] = "*" + _TYPES[value.dtype], [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif value == 1 and name not in skip:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0 and name not in skip:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


class _CompileLaunch:
    """Stands in for a kernel: kernel[grid](*args, **kwargs) compiles that launch and prints its resources."""

    def __init__(self, kern, arch: int, seen: set):
        self.kern, self.arch, self.seen = kern, arch, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
            sig, consts, attrs = _specialize(self.kern, args, kwargs)
            key = (self.kern.fn.__name__, str(sig), str(consts), str(options))
            if key in self.seen:
                return
            self.seen.add(key)
            try:
                compiled = triton.compile(ASTSource(self.kern, sig, constexprs=consts, attrs=attrs),
                                          target=GPUTarget("cuda", self.arch, 32), options=options)
            except Exception as exc:  # report and go on with the other launches
                print(f"{self.kern.fn.__name__}: COMPILE FAILED: {type(exc).__name__}: {exc}")
                return
            print(f"{self.kern.fn.__name__:18s} grid={grid} {options} shared={compiled.metadata.shared} "
                  f"{_resources(compiled.asm['cubin'])}")

        return launch


def _resources(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    words = next((line.split() for line in out.splitlines() if "REG:" in line), [])
    return " ".join(w for w in words if w.split(":")[0] in ("REG", "STACK", "LOCAL"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sessa_scale.kernels.compile_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--chunk", type=int, default=64)
    args = ap.parse_args(argv)
    import sessa_scale.ops.mamba2_fused as mf
    import sessa_scale.ops.ssd_triton as st

    seen: set = set()
    for module in (KS, KF):
        for name in [n for n in dir(module) if n.endswith("_kernel")]:
            setattr(module, name, _CompileLaunch(getattr(module, name), args.arch, seen))
    dtype, (batch, T, H, P, G, N) = getattr(torch, args.dtype), (args.batch, args.seq_len, 32, 64, 1, 128)
    x, dy = torch.zeros(batch, T, H, P, dtype=dtype), torch.zeros(batch, T, H, P, dtype=dtype)
    B, C = torch.zeros(batch, T, G, N, dtype=dtype), torch.zeros(batch, T, G, N, dtype=dtype)
    dt, A, D = torch.zeros(batch, T, H), torch.zeros(H), torch.zeros(H)
    plan = st._plan(x, dt, B, C, args.chunk, st.config_from_env(st.SSDConfig()))
    print(f"SSD plan: L={plan.L} tiles BN={plan.BN} BP={plan.BP} dx BP={plan.BP_DX} state {plan.BN_S}x{plan.BP_S} "
          f"dB/dC BN={plan.BN_D} heads/split {H // G // plan.HS} dot={plan.dot} prec={plan.prec} state schedule "
          + (f"split (local {plan.BN_L}x{plan.BP_L}, pass {plan.BE} x {plan.cfg.CH_PASS} chunks)" if plan.split else "fused"))
    _, _, cb = st._forward(plan, x, dt, A, B, C, None, D)
    st._backward(plan, dy, None, x, dt, A, B, C, None, D, cb)
    conv_in = torch.zeros(batch, T, 2 * (H * P + 2 * G * N), dtype=dtype)[..., : H * P + 2 * G * N].requires_grad_()
    taps, bias = torch.zeros(4, conv_in.shape[-1]), torch.zeros(conv_in.shape[-1])
    mf._CausalConvSiLU.apply(conv_in, taps, bias, None).sum().backward()
    y = torch.zeros(batch, T, H * P, dtype=dtype, requires_grad=True)
    z = torch.zeros(batch, T, 2 * H * P, dtype=dtype)[..., H * P:].requires_grad_()
    mf._GatedRMSNorm.apply(y, z, torch.ones(H * P), H * P // G, 1e-5, None).sum().backward()
    width = H * P * 2 + 2 * G * N + H  # dt_raw: the last H columns of the joint projection
    dt_raw = torch.zeros(batch, T, width, dtype=dtype)[..., -H:].requires_grad_()
    dt_out, A_out = mf._DtAndDecay.apply(dt_raw, torch.zeros(H, requires_grad=True), torch.zeros(H, requires_grad=True), None)
    (dt_out.sum() + A_out.sum()).backward()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
