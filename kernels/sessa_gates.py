"""Triton kernels of the Sessa block's two element-wise gates around its mixer (the op:
``sessa_scale/ops/sessa_gates.py``; the reference: ``SessaLayer`` in ``sessa_scale/models/sessa.py``).

W_in's output h = [a | g] (rows of 2 D) feeds the mixer with a_bar = gelu(a) (exact, erf form) and
gates its output: z = s * g.  a and g are column halves of h, so their rows are 2 D apart: torch's
element-wise kernels take such strided views on their slow (non-vectorized) path.  These kernels read
and write rows with any row stride (unit column stride), compute in float32 (float64 for float64
inputs) and round to the output's dtype, as torch does for half inputs.  Every tensor is a (R, C)
view: R = B * T rows of C = D columns.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(R, C, BM: tl.constexpr, BC: tl.constexpr):
    """Program (pid_m, pid_c)'s rows, columns and mask."""
    r = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    return r, c, (r < R)[:, None] & (c < C)[None, :]


@triton.jit
def _erf_half(x):
    """(1 + erf(x / sqrt(2))) / 2: the normal CDF of x."""
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_fwd_kernel(a_ptr, out_ptr, R, C, s_a, s_o, BM: tl.constexpr, BC: tl.constexpr, FP64: tl.constexpr):
    """out = gelu(a) = a * Phi(a)."""
    r, c, m = _tile(R, C, BM, BC)
    x = tl.load(a_ptr + r[:, None] * s_a + c[None, :], mask=m, other=0.0)
    x = x.to(tl.float64) if FP64 else x.to(tl.float32)
    tl.store(out_ptr + r[:, None] * s_o + c[None, :], (x * _erf_half(x)).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def gelu_bwd_kernel(a_ptr, dout_ptr, da_ptr, R, C, s_a, s_d, s_da, BM: tl.constexpr, BC: tl.constexpr,
                    FP64: tl.constexpr):
    """da = dout * gelu'(a), gelu'(a) = Phi(a) + a * phi(a)."""
    r, c, m = _tile(R, C, BM, BC)
    x = tl.load(a_ptr + r[:, None] * s_a + c[None, :], mask=m, other=0.0)
    d = tl.load(dout_ptr + r[:, None] * s_d + c[None, :], mask=m, other=0.0)
    x = x.to(tl.float64) if FP64 else x.to(tl.float32)
    d = d.to(tl.float64) if FP64 else d.to(tl.float32)
    slope = _erf_half(x) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327  # 1 / sqrt(2 pi)
    tl.store(da_ptr + r[:, None] * s_da + c[None, :], (d * slope).to(da_ptr.dtype.element_ty), mask=m)


@triton.jit
def gate_fwd_kernel(s_ptr, g_ptr, z_ptr, R, C, s_s, s_g, s_z, BM: tl.constexpr, BC: tl.constexpr,
                    FP64: tl.constexpr):
    """z = s * g."""
    r, c, m = _tile(R, C, BM, BC)
    s = tl.load(s_ptr + r[:, None] * s_s + c[None, :], mask=m, other=0.0)
    g = tl.load(g_ptr + r[:, None] * s_g + c[None, :], mask=m, other=0.0)
    s = s.to(tl.float64) if FP64 else s.to(tl.float32)
    g = g.to(tl.float64) if FP64 else g.to(tl.float32)
    tl.store(z_ptr + r[:, None] * s_z + c[None, :], (s * g).to(z_ptr.dtype.element_ty), mask=m)


@triton.jit
def gate_bwd_kernel(dz_ptr, s_ptr, g_ptr, ds_ptr, dg_ptr, R, C, s_dz, s_s, s_g, s_ds, s_dg, BM: tl.constexpr,
                    BC: tl.constexpr, FP64: tl.constexpr):
    """ds = dz * g and dg = dz * s in one pass."""
    r, c, m = _tile(R, C, BM, BC)
    dz = tl.load(dz_ptr + r[:, None] * s_dz + c[None, :], mask=m, other=0.0)
    s = tl.load(s_ptr + r[:, None] * s_s + c[None, :], mask=m, other=0.0)
    g = tl.load(g_ptr + r[:, None] * s_g + c[None, :], mask=m, other=0.0)
    dz = dz.to(tl.float64) if FP64 else dz.to(tl.float32)
    s = s.to(tl.float64) if FP64 else s.to(tl.float32)
    g = g.to(tl.float64) if FP64 else g.to(tl.float32)
    tl.store(ds_ptr + r[:, None] * s_ds + c[None, :], (dz * g).to(ds_ptr.dtype.element_ty), mask=m)
    tl.store(dg_ptr + r[:, None] * s_dg + c[None, :], (dz * s).to(dg_ptr.dtype.element_ty), mask=m)
