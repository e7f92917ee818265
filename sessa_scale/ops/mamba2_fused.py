"""Fused Triton versions of the Mamba-2 mixer's causal depthwise conv + SiLU, gated RMSNorm and
dt = softplus(dt_raw + dt_bias) with A = -exp(A_log) (kernels in ``kernels/mamba2_fused.py``), as
autograd functions. Their references are the PyTorch
paths in ``sessa_scale/models/mamba2.py`` (``Mamba2Mixer.causal_conv``, ``GatedRMSNorm``,
``Mamba2Mixer.dt_and_decay``), which
``model.ssm_kernels`` selects instead ("torch"); "auto" uses these on CUDA.

Both compute in float32 and return the input's dtype (under bf16 autocast: bf16, as the PyTorch
path); parameter gradients come back in the parameters' dtype, summed over per-program partial
sums (no atomics: deterministic). Inputs need unit stride along channels (else they are copied).
Given a slot of a joint gradient (sessa_scale/ops/joint_gradient.py), the backward writes the
gradient of its projection-slice input (conv input, z, raw dt) into that slice of the projection's
gradient (the kernels take its row stride), so that the projection's backward needs no concatenation.
"""

from __future__ import annotations

import torch

from sessa_scale.kernels import mamba2_fused as K
from sessa_scale.models.mamba2 import TRITON_CONV_MAX_WIDTH
from sessa_scale.ops.joint_gradient import GradientSlot
from sessa_scale.ops.launch_math import cdiv, next_power_of_2, sm_count
from sessa_scale.ops.work_buffers import INTERPRET, new_buffer

CONV_BC, CONV_WARPS = 256, 2  # conv programs: channels (4 per thread: 8-byte bf16 rows) and warps
CONV_FWD_BT, CONV_BWD_BT = 8, 4  # ... tokens per tile forward / backward (their row loads are issued together)
CONV_MAX_REGISTERS = 128  # ... per thread (ptxas .maxnreg; both need 128 without spills in bf16): 8 programs per SM
CONV_PROGRAMS_PER_SM = 8  # ... runs sized for one wave of this many programs per SM (65536 / (64 x 128))
INTERPRET_CONV_TILES = 2  # tiles per run in the interpreter (tests cover runs, partials, boundaries)
CONV_SUM_BP, CONV_SUM_BC = 32, 64  # weight-gradient sum: partials x channels per step
NORM_ROWS = 16  # rows per gated-RMSNorm program (the weight gradient is summed over programs)
DT_ROWS = 128  # (B, T) rows per program of the dt softplus (its bias gradient is summed over programs)


def _kw(num_warps: int, **options) -> dict:
    return {} if INTERPRET else {"num_warps": num_warps, **options}


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_device(t: torch.Tensor, what: str) -> None:
    if not (t.is_cuda or INTERPRET):
        raise ValueError(f"the Triton {what} runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1); "
                         "set model.ssm_kernels=torch here")


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, taps, bias, din_slot):
        x = _token_rows(_channels_last(x))
        batch, T, C = x.shape
        w = taps.contiguous()
        width, N = w.shape[0], batch * T
        if width > TRITON_CONV_MAX_WIDTH:
            raise ValueError(f"the Triton causal conv takes widths up to {TRITON_CONV_MAX_WIDTH}; got {width}")
        b = bias if bias is not None else torch.zeros(C, device=x.device, dtype=taps.dtype)
        out = new_buffer(x.shape, x.dtype, x.device)
        run = _conv_run_length(N, C, CONV_FWD_BT, x.device)
        K.conv_fwd_kernel[(cdiv(N, run), cdiv(C, CONV_BC))](
            x, w, b, out, N, T, C, run, _token_stride(x), C, K=width, BT=CONV_FWD_BT, BC=CONV_BC,
            **_kw(CONV_WARPS, num_stages=1, maxnreg=CONV_MAX_REGISTERS))
        ctx.save_for_backward(x, w, b)
        ctx.has_bias, ctx.din_slot = bias is not None, din_slot
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, b = ctx.saved_tensors
        batch, T, C = x.shape
        width, N = w.shape[0], batch * T
        dout = _token_rows(_channels_last(dout))
        din = _gradient_buffer(ctx.din_slot, (batch, T, C), x.dtype, x.device)
        run = _conv_run_length(N, C, CONV_BWD_BT, x.device)
        grid = (cdiv(N, run), cdiv(C, CONV_BC))
        parts = new_buffer((grid[0], width + 1, C), torch.float32, x.device)
        K.conv_bwd_kernel[grid](x, w, b, dout, din, parts, N, T, C, run, _token_stride(x), _token_stride(dout),
                                _token_stride(din),
                                K=width, BT=CONV_BWD_BT, BC=CONV_BC,
                                **_kw(CONV_WARPS, num_stages=1, maxnreg=CONV_MAX_REGISTERS))
        # written (C, K), returned as the (K, C) view: the slices the model's cat of per-conv taps
        # hands back are then its convs' (C, 1, K) weights' own layout (no copy when .grad is set)
        dw = new_buffer((C, width), w.dtype, x.device)
        db = new_buffer((C,), b.dtype, x.device)
        K.conv_wgrad_sum_kernel[(cdiv(C, CONV_SUM_BC), width + 1)](parts, dw, db, grid[0], C, K=width,
                                                                          BP=CONV_SUM_BP, BC=CONV_SUM_BC, **_kw(4))
        return din, dw.t(), db if ctx.has_bias else None, None


def _gradient_buffer(slot: GradientSlot | None, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Where an input's gradient is written: its slice of a joint gradient (slot) or a new buffer."""
    return new_buffer(shape, dtype, device) if slot is None else slot.take(shape, dtype)


def _token_stride(t: torch.Tensor) -> int:
    """Stride between consecutive flattened tokens b T + t of a (B, T, C) tensor that _token_rows returned."""
    return t.stride(0) if t.shape[1] == 1 else t.stride(1)


def _token_rows(t: torch.Tensor) -> torch.Tensor:
    """t (B, T, C) with channel stride 1, copied unless its tokens b T + t lie one stride apart (as
    slices of a contiguous projection output do), so that the kernel walks them as (B T, C) rows."""
    batch, T, _ = t.shape
    if batch == 1 or T == 1 or t.stride(0) == T * t.stride(1):
        return t
    return t.contiguous()


def _conv_run_length(N: int, C: int, tile: int, device: torch.device) -> int:
    """Flattened tokens per conv program (a multiple of tile; runs cross sequence boundaries): the
    longest runs for which the programs (runs x channel blocks) fit in one wave of
    CONV_PROGRAMS_PER_SM per SM (fewer halos and weight-gradient partials)."""
    if INTERPRET or device.type != "cuda":
        return tile * INTERPRET_CONV_TILES
    runs = max(1, sm_count(device.index or 0) * CONV_PROGRAMS_PER_SM // cdiv(C, CONV_BC))
    return max(1, cdiv(cdiv(N, runs), tile)) * tile


@torch.compiler.disable
def causal_conv1d_silu(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None,
                       din_slot: GradientSlot | None = None) -> torch.Tensor:
    """x (B, T, C), taps (K, C) (tap k of channel c at [k, c]: a depthwise nn.Conv1d's weight.flatten(1).t()),
    bias (C,) or None -> silu(causal depthwise conv of x) (B, T, C) in x's dtype. din_slot: x's block of a
    joint gradient (ops/joint_gradient.py) that the backward writes x's gradient into."""
    _check_device(x, "causal conv")
    return _CausalConvSiLU.apply(x, taps, bias, din_slot)


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, group_size, eps, dz_slot):
        y, z = _channels_last(y), _channels_last(z)
        batch, T, E = y.shape
        G = E // group_size
        out = new_buffer(y.shape, y.dtype, y.device)
        rstd = new_buffer((batch * T, G), torch.float32, y.device)
        grid = (cdiv(batch * T, NORM_ROWS), G)
        block = next_power_of_2(group_size)
        K.norm_fwd_kernel[grid](y, z, weight, out, rstd, batch * T, T, group_size, G, eps, y.stride(0), y.stride(1),
                                z.stride(0), z.stride(1), out.stride(0), out.stride(1), ROWS=NORM_ROWS,
                                BLOCK=block, **_kw(8 if block >= 2048 else 4))
        ctx.save_for_backward(y, z, weight, rstd)
        ctx.group_size, ctx.dz_slot = group_size, dz_slot
        return out

    @staticmethod
    def backward(ctx, dout):
        y, z, weight, rstd = ctx.saved_tensors
        dout = _channels_last(dout)
        batch, T, E = y.shape
        G = E // ctx.group_size
        grid = (cdiv(batch * T, NORM_ROWS), G)
        dy = new_buffer(y.shape, y.dtype, y.device)
        dz = _gradient_buffer(ctx.dz_slot, z.shape, z.dtype, z.device)
        dw = new_buffer((grid[0], E), torch.float32, y.device)
        block = next_power_of_2(ctx.group_size)
        K.norm_bwd_kernel[grid](y, z, weight, rstd, dout, dy, dz, dw, batch * T, T, ctx.group_size, G, E,
                                y.stride(0), y.stride(1), z.stride(0), z.stride(1), dout.stride(0), dout.stride(1),
                                dy.stride(0), dy.stride(1), dz.stride(0), dz.stride(1), ROWS=NORM_ROWS,
                                BLOCK=block, **_kw(8 if block >= 2048 else 4))
        return dy, dz, dw.sum(0).to(weight.dtype), None, None, None


@torch.compiler.disable
def gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float,
                  dz_slot: GradientSlot | None = None) -> torch.Tensor:
    """y, z (B, T, E), weight (E,) -> RMSNorm(y * silu(z)) * weight over groups of group_size channels,
    computed in float32, returned in y's dtype. dz_slot: z's block of a joint gradient that the
    backward writes z's gradient into."""
    _check_device(y, "gated RMSNorm")
    return _GatedRMSNorm.apply(y, z, weight, int(group_size), float(eps), dz_slot)


class _DtAndDecay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt_raw, dt_bias, A_log, draw_slot):
        batch, T, H = dt_raw.shape
        raw = _channels_last(dt_raw)
        dt_dtype = torch.promote_types(torch.promote_types(raw.dtype, dt_bias.dtype), torch.float32)
        dt = new_buffer((batch, T, H), dt_dtype, raw.device)
        A = new_buffer((H,), torch.promote_types(A_log.dtype, torch.float32), raw.device)
        K.dt_fwd_kernel[(cdiv(batch * T, DT_ROWS),)](raw, dt_bias, A_log, dt, A, batch * T, T, H, raw.stride(0),
                                                            raw.stride(1), ROWS=DT_ROWS, BH=next_power_of_2(H),
                                                            **_kw(4))
        ctx.save_for_backward(raw, dt_bias, A_log)
        ctx.set_materialize_grads(False)
        ctx.draw_slot = draw_slot
        return dt, A

    @staticmethod
    def backward(ctx, ddt, dA):
        raw, dt_bias, A_log = ctx.saved_tensors
        batch, T, H = raw.shape
        if ddt is None:
            ddt = torch.zeros((batch, T, H), dtype=torch.float32, device=raw.device)
        ddt = ddt.contiguous()
        grid = (cdiv(batch * T, DT_ROWS),)
        draw = _gradient_buffer(ctx.draw_slot, raw.shape, raw.dtype, raw.device)
        dbias_parts = new_buffer((grid[0], H), torch.float32, raw.device)
        K.dt_bwd_kernel[grid](raw, dt_bias, ddt, draw, dbias_parts, batch * T, T, H, raw.stride(0), raw.stride(1),
                              draw.stride(0), draw.stride(1), ROWS=DT_ROWS, BH=next_power_of_2(H), **_kw(4))
        dbias = new_buffer((H,), dt_bias.dtype, raw.device)
        dA_log = new_buffer((H,), A_log.dtype, raw.device) if dA is not None else None
        K.dt_param_grad_kernel[(1,)](dbias_parts, A_log, dA if dA is not None else A_log, dbias,
                                     dA_log if dA is not None else dbias, grid[0], H, HAS_DA=dA is not None,
                                     BH=next_power_of_2(H), **_kw(1))
        return draw, dbias, dA_log, None


@torch.compiler.disable
def dt_softplus_and_decay(dt_raw: torch.Tensor, dt_bias: torch.Tensor, A_log: torch.Tensor,
                          draw_slot: GradientSlot | None = None):
    """dt_raw (B, T, H), dt_bias (H,), A_log (H,) -> (dt = softplus(dt_raw + dt_bias) (B, T, H),
    A = -exp(A_log) (H,)), each in at least float32 (as the PyTorch expressions under autocast):
    one launch forward, two backward (instead of about ten elementwise ops and casts). draw_slot:
    dt_raw's block of a joint gradient that the backward writes dt_raw's gradient into."""
    _check_device(dt_raw, "dt softplus")
    return _DtAndDecay.apply(dt_raw, dt_bias, A_log, draw_slot)
