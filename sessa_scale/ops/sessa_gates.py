"""The Sessa block's gates around its mixer as Triton autograd functions (kernels in
``kernels/sessa_gates.py``): a_bar = gelu(a) and z = s * g, a and g the column halves of W_in's output.
Their reference is the PyTorch path of ``SessaLayer`` (``sessa_scale/models/sessa.py``), which runs where
these do not (CPU, torch.compile: ``models.sessa.fused_gates``).

Given slots of a joint gradient of W_in's output (``sessa_scale/ops/joint_gradient.py``), the backwards
write da and dg into its halves, so that the split's backward hands on one (B, T, 2 D) gradient
without a concatenation.  Results in the inputs' dtype (float32 / float64 arithmetic inside).
"""

from __future__ import annotations

import torch

from sessa_scale.kernels import sessa_gates as K
from sessa_scale.ops.joint_gradient import GradientSlot
from sessa_scale.ops.launch_math import cdiv
from sessa_scale.ops.work_buffers import INTERPRET, new_buffer

ROWS, COLS, WARPS = 16, 256, 4  # a program's tile: rows x columns (8 bf16 columns per thread), and its warps


def _rows(x: torch.Tensor) -> torch.Tensor:
    """An input x (..., C) as (rows, C) with unit column stride: a view where the leading dims flatten,
    else a copy."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.flatten(0, -2)


def _out_rows(x: torch.Tensor) -> torch.Tensor:
    """An output x (..., C) as a (rows, C) view (an error where it is none: the kernel would write a copy)."""
    return x.view(-1, x.shape[-1])


def _launch(kernel, R: int, C: int, *args, fp64: bool) -> None:
    options = {} if INTERPRET else {"num_warps": WARPS}
    kernel[(cdiv(R, ROWS), cdiv(C, COLS))](*args, BM=ROWS, BC=COLS, FP64=fp64, **options)


def _gradient_buffer(slot: GradientSlot | None, like: torch.Tensor) -> torch.Tensor:
    return new_buffer(like.shape, like.dtype, like.device) if slot is None else slot.take(like.shape, like.dtype)


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, da_slot):
        out = new_buffer(a.shape, a.dtype, a.device)
        a2, o2 = _rows(a), _out_rows(out)
        _launch(K.gelu_fwd_kernel, *a2.shape, a2, o2, *a2.shape, a2.stride(0), o2.stride(0),
                fp64=a.dtype == torch.float64)
        ctx.save_for_backward(a)
        ctx.da_slot = da_slot
        return out

    @staticmethod
    def backward(ctx, dout):
        (a,) = ctx.saved_tensors
        da = _gradient_buffer(ctx.da_slot, a)
        a2, d2, da2 = _rows(a), _rows(dout), _out_rows(da)
        _launch(K.gelu_bwd_kernel, *a2.shape, a2, d2, da2, *a2.shape, a2.stride(0), d2.stride(0), da2.stride(0),
                fp64=a.dtype == torch.float64)
        return da, None


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, g, dg_slot):
        z = new_buffer(s.shape, torch.promote_types(s.dtype, g.dtype), s.device)
        s2, g2, z2 = _rows(s), _rows(g), _out_rows(z)
        _launch(K.gate_fwd_kernel, *s2.shape, s2, g2, z2, *s2.shape, s2.stride(0), g2.stride(0), z2.stride(0),
                fp64=z.dtype == torch.float64)
        ctx.save_for_backward(s, g)
        ctx.dg_slot = dg_slot
        return z

    @staticmethod
    def backward(ctx, dz):
        s, g = ctx.saved_tensors
        ds, dg = new_buffer(s.shape, s.dtype, s.device), _gradient_buffer(ctx.dg_slot, g)
        dz2, s2, g2 = _rows(dz), _rows(s), _rows(g)
        ds2, dg2 = _out_rows(ds), _out_rows(dg)
        _launch(K.gate_bwd_kernel, *s2.shape, dz2, s2, g2, ds2, dg2, *s2.shape, dz2.stride(0), s2.stride(0),
                g2.stride(0), ds2.stride(0), dg2.stride(0), fp64=torch.float64 in (dz.dtype, s.dtype, g.dtype))
        return ds, dg, None


@torch.compiler.disable
def gelu(a: torch.Tensor, da_slot: GradientSlot | None = None) -> torch.Tensor:
    """a (B, T, D) (rows with any stride) -> gelu(a) (exact, erf form) (B, T, D) in a's dtype. da_slot: a's
    block of a joint gradient that the backward writes a's gradient into."""
    return _Gelu.apply(a, da_slot)


@torch.compiler.disable
def gate(s: torch.Tensor, g: torch.Tensor, dg_slot: GradientSlot | None = None) -> torch.Tensor:
    """s, g (B, T, D) (rows with any stride) -> s * g (B, T, D). dg_slot: g's block of a joint gradient that
    the backward writes g's gradient into."""
    if s.shape != g.shape:
        raise ValueError(f"gate needs s and g of one shape; got {tuple(s.shape)} and {tuple(g.shape)}")
    return _Gate.apply(s, g, dg_slot)
