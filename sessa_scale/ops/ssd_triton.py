"""Triton SSD scan: autograd wrapper and launch schedule around the kernels in ``kernels/ssd.py``.

``ssd_scan_triton(x, dt, A, B, C, initial_state, chunk_size, D=None)`` has the contract of
``ssd_reference.ssd_chunked``: x (B, T, H, P), dt (B, T, H), A (H,), B and C (B, T, G, N),
initial_state (B, H, N, P) or None -> (y (B, T, H, P) in x's dtype, final state (B, H, N, P) in
ACC), plus y += D[h] x when D (H,) is given (fused into the output and dx kernels). Any strides; any T (the last chunk is masked). Selected by ``ssd_scan(..., impl="triton")``
and by "auto" on CUDA. ``ssd_scan_triton_packed`` takes x, B, C packed as the columns
[x | B | C] of one tensor (the Mamba-2 mixer's conv output) and writes their gradients into one
tensor's slices (no concatenation in the backward pass).

Host cost: the launch plan (tiles, grids, launch options) is computed once per shapes, dtypes and
config and cached; integer launch math is plain Python (sessa_scale/ops/launch_math.py).

Schedule: forward = cb_kernel, state_scan_kernel (the chunk states S_c), out_fwd_kernel (3 launches);
backward = state_scan_kernel backwards, dx_kernel, dbc_kernel, and one or two small torch reductions
over the kernels' partial slices (dA and dD in one; deterministic, no atomics). With
``SSDConfig.keep_states`` (``model.ssm_keep_states``; the default, chosen from the memory below against
the time) the backward reads the chunk states the forward wrote; without it, it first
recomputes them (one more state pass: the same kernel on the same inputs, compiled without the final
state's store; the same values and gradients bit for bit, checked on the CPU interpreter and by
tests/ops/test_ssd_keep_states.py's GPU test). ``SSDConfig.state_schedule`` = "split" runs each
state pass as chunk_local_state_kernel (parallel over chunks: every chunk's term of the recursion, one
tensor-core product per chunk) then state_pass_kernel (the recursion alone, elementwise, CH_PASS
chunks per load); "auto" splits where fused would have too few programs (it halves its state tile:
T = 8192 at 16,384 tokens per call). The split schedule writes the terms into the state buffer
itself (no extra memory but a (B, H, NC) decay buffer), so for bf16 / fp16 inputs each chunk's term
is rounded to DOT once before the recursion, which still runs in ACC (float32 / float64 inputs:
the same operations as fused). An ACC scratch for the terms would keep fused's bf16 numerics
exactly but cost 268 MB more writes and reads at 16,384 tokens (N = 128, P = 64, 32 heads): about
as much time as the split saves.
Kept for the backward: the inputs, CB (B, G, NC, L, L) in ACC (L floats per token and group) and,
with keep_states, the chunk states st (B, H, NC, N, P) in DOT: B H NC N P elements per layer (H N P / L
per token), the tensor the forward's products already read (no extra kernel, no other rounding).
Mamba-2 350m at T = 8192, B = 2 (H = 32, N = 128, P = 64, L = 64: NC = 128), bf16: 67.1 M elements =
128 MiB per layer, 5.75 GiB over its 46 layers (its measured training peak without them: 33.8 GiB on
an H200), for one state_scan_kernel less per layer and step (~200 us at that size: ~9 ms of ~161 ms of
GPU work, and 46 launches fewer). Under model.activation_checkpointing only the layer being
recomputed holds them. Where activation memory binds, keep_states=False gives the memory back for the
time.

Numerics: decays, cumulative sums, states and accumulators in ACC (float32; float64 for float64
inputs, the CPU interpreter tests); tl.dot operands in the inputs' half-precision dtype (bf16 or
fp16: x's dtype) with fp32 accumulation, else in ACC ("tf32x3" for float32 on GPU, configurable;
"ieee" in the interpreter). Chunk sizes above ``SSDConfig.max_chunk`` (64) run as max_chunk (the
result does not depend on the chunk size; the L x L tiles live in registers).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields, replace

import torch
import triton.language as tl

from sessa_scale.kernels import ssd as K
from sessa_scale.ops.launch_math import cdiv, next_power_of_2, sm_count
from sessa_scale.ops.ssd import check_shapes, split_xbc, ssd_scan
from sessa_scale.ops.work_buffers import INTERPRET, new_buffer



@dataclass(frozen=True)
class SSDConfig:
    """Tiles and launch options (each clamped to the problem; powers of two >= 16)."""

    BN: int = 64  # N-tile of the C S_c / B dS contractions (out_fwd, dx) and of cb_kernel
    BP: int = 64  # P-tile of out_fwd (grid axis)
    BP_DX: int = 64  # P-tile of dx_kernel (grid axis; 32: 128 registers without the cap below, but the L x L
    # work is repeated per P-tile)
    BN_STATE: int = 64  # state tile (N x P) of the sequential state kernels, halved (N first, to 16)
    BP_STATE: int = 64  # ... while there are fewer than programs_per_sm programs per SM
    BN_DBC: int = 64  # N-tile of dbc_kernel (grid axis); its P-tile is all of P
    head_split: int = 0  # dbc_kernel: programs per group of heads (a divisor of H / G); 0 = the
    # smallest giving programs_per_sm programs per SM
    programs_per_sm: int = 2
    max_chunk: int = 64  # longer chunks run as this (128: the dB/dC kernel's L x L tiles spill even at 16 warps)
    num_warps: int = 4  # cb, out_fwd
    num_warps_dx: int = 8  # dx_kernel (its L x L tiles spill registers at 4 warps, L = 64, on sm_90)
    maxnreg_dx: int = 128  # dx_kernel's register cap per thread with bf16 / fp16 inputs (0: the compiler's choice,
    # ~180 at BP_DX = 64: one program per SM): 8 warps x 128 registers run two programs per SM on sm_90 (40 bytes
    # spilled, outside the loop). Not applied to float32 inputs (their fp32 tiles spill 1.5 KB under it)
    num_warps_state: int = 4  # the sequential state kernel (state_scan)
    state_schedule: str = "fused"  # the chunk-state pass: fused (state_scan_kernel: per chunk a tl.dot inside the
    # sequential loop) | split (chunk_local_state_kernel, every chunk's term in parallel, then state_pass_kernel, the
    # recursion alone, elementwise) | auto (split where fused would halve its BN_STATE x BP_STATE tile for programs)
    BN_LOCAL: int = 128  # split: chunk_local_state_kernel's state tile (N x P), one chunk per program
    BP_LOCAL: int = 64
    num_warps_local: int = 8
    BE_PASS: int = 512  # split: state elements per state_pass_kernel program, BE_PASS / 256 warps (so that each
    # thread holds whole columns of its CH_PASS x BE_PASS tile: the recursion over the rows needs no shared memory)
    CH_PASS: int = 8  # split: chunks per state_pass_kernel load / store (a power of two; loads in flight)
    num_warps_dbc: int = 8
    num_stages: int = 2
    prec_fp32: str = "tf32x3"  # tl.dot input precision for float32 inputs on GPU: tf32x3 | tf32 | ieee
    keep_states: bool = True  # keep the forward's chunk states st (B, H, NC, N, P) in DOT for the backward instead
    # of recomputing them there (one state pass less per call: 1 launch fused, 2 split; the same gradients): B H NC N P
    # elements per layer, 128 MiB in bf16 at the 350m T = 8192, B = 2 (module docstring). Default on: ~9 ms of ~161 ms
    # of GPU work per 350m step for 5.75 GiB over 46 layers on a GPU of 141 GiB. model.ssm_keep_states sets it


DEFAULT_CONFIG = SSDConfig()
# Small tiles for the CPU interpreter: tests cover several N-, P- and state tiles and head splits.
INTERPRET_CONFIG = SSDConfig(BN=16, BP=16, BP_DX=16, BN_STATE=16, BP_STATE=16, BN_DBC=16, head_split=2,
                             BN_LOCAL=16, BP_LOCAL=16, BE_PASS=256, CH_PASS=2)
STATE_SCHEDULES = ("fused", "split", "auto")

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def config_from_env(base: SSDConfig) -> SSDConfig:
    """SESSA_SSD_CFG="BN_DBC=32,num_warps_dbc=4,prec_fp32=ieee,keep_states=false" overrides fields (tuning
    sweeps; booleans as true / false or 1 / 0)."""
    return _config_with(base, os.environ.get("SESSA_SSD_CFG", ""))


@functools.lru_cache(maxsize=16)
def _config_with(base: SSDConfig, text: str) -> SSDConfig:
    """base with the overrides of text (SESSA_SSD_CFG's format), parsed once per text."""
    if not text:
        return base
    types = {f.name: f.type for f in fields(SSDConfig)}
    items = dict(item.split("=", 1) for item in text.split(","))
    unknown = sorted(set(items) - set(types))
    if unknown:
        raise ValueError(f"SESSA_SSD_CFG: unknown fields {unknown}; choose from {sorted(types)}")
    return replace(base, **{k: _field_value(k, types[k], v) for k, v in items.items()})


_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def _field_value(name: str, kind: str, text: str):
    """SSDConfig field `name` of annotation `kind` ("str", "bool", "int") from its SESSA_SSD_CFG text."""
    if kind == "str":
        return text
    if kind == "bool":
        if text.lower() not in _BOOLS:
            raise ValueError(f"SESSA_SSD_CFG: {name}={text!r} is not a boolean; use {name}=true or {name}=false")
        return _BOOLS[text.lower()]
    return int(text)


def _p2(n: int) -> int:
    return max(16, next_power_of_2(int(n)))


@dataclass(frozen=True)
class _Plan:
    """What one call's launches share: sizes, tiles, dtypes."""

    batch: int
    T: int
    H: int
    G: int
    N: int
    P: int
    L: int
    NC: int
    BN: int
    BP: int
    BP_DX: int
    BN_S: int
    BP_S: int
    BN_D: int
    HS: int
    split: bool  # the split state schedule (SSDConfig.state_schedule)
    BN_L: int
    BP_L: int
    BE: int
    acc: torch.dtype
    dot: torch.dtype
    prec: str
    cfg: SSDConfig

    def kw(self, kind: str = "") -> dict:
        """Launch options of the kernels of `kind` ("", "state", "local", "pass", "dx", "dbc")."""
        return self._launch_options[kind]

    def consts(self) -> dict:
        """The constexprs every kernel takes."""
        return self._consts

    @functools.cached_property
    def _launch_options(self) -> dict[str, dict]:
        cfg = self.cfg
        warps = {"": cfg.num_warps, "state": cfg.num_warps_state, "local": cfg.num_warps_local,
                 "pass": max(1, self.BE // 256), "dx": cfg.num_warps_dx, "dbc": cfg.num_warps_dbc}
        options = {kind: {} if INTERPRET else {"num_warps": w, "num_stages": cfg.num_stages}
                   for kind, w in warps.items()}
        if cfg.maxnreg_dx and not INTERPRET and self.dot != self.acc:  # half-precision products only
            options["dx"]["maxnreg"] = cfg.maxnreg_dx
        return options

    @functools.cached_property
    def _consts(self) -> dict:
        return {"L": self.L, "ACC": _TL[self.acc], "DOT": _TL[self.dot], "PREC": self.prec}

    @functools.cached_property
    def state_p_tiles(self) -> int:
        """P-tiles of the sequential state kernels."""
        return cdiv(self.P, self.BP_S)

    @functools.cached_property
    def p_tiles(self) -> int:
        """P-tiles of out_fwd."""
        return cdiv(self.P, self.BP)

    @functools.cached_property
    def dx_p_tiles(self) -> int:
        """P-tiles of dx_kernel (its partial sums of ddt, dA, dD: one per P-tile)."""
        return cdiv(self.P, self.BP_DX)

    @functools.cached_property
    def n_tiles_dbc(self) -> int:
        """N-tiles of dbc_kernel."""
        return cdiv(self.N, self.BN_D)

    @functools.cached_property
    def state_grid(self) -> tuple[int, int]:
        return (cdiv(self.N, self.BN_S) * self.state_p_tiles, self.batch * self.H)

    @functools.cached_property
    def local_tiles(self) -> tuple[int, int]:
        """N- and P-tiles of chunk_local_state_kernel."""
        return cdiv(self.N, self.BN_L), cdiv(self.P, self.BP_L)

    @functools.cached_property
    def local_grid(self) -> tuple[int, int]:
        return (self.NC * self.local_tiles[0] * self.local_tiles[1], self.batch * self.H)

    @functools.cached_property
    def pass_grid(self) -> tuple[int, int]:
        return (cdiv(self.N * self.P, self.BE), self.batch * self.H)

    @functools.cached_property
    def chunk_grid(self) -> tuple[int, int]:
        return (self.NC * self.p_tiles, self.batch * self.H)

    @functools.cached_property
    def dx_grid(self) -> tuple[int, int]:
        return (self.NC * self.dx_p_tiles, self.batch * self.H)

    @functools.cached_property
    def dbc_grid(self) -> tuple[int, int]:
        return (self.NC * self.n_tiles_dbc, self.batch * self.G * self.HS)


def _plan(x, dt, B, C, chunk_size: int, cfg: SSDConfig) -> _Plan:
    """The plan of a call on these tensors (computed once per shapes, dtypes, device and config)."""
    return _plan_for(x.shape, B.shape, (x.dtype, dt.dtype, B.dtype, C.dtype), x.device, chunk_size, cfg)


@functools.lru_cache(maxsize=256)
def _plan_for(x_shape, B_shape, dtypes, device: torch.device, chunk_size: int, cfg: SSDConfig) -> _Plan:
    batch, T, H, P = x_shape
    G, N = B_shape[2], B_shape[3]
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"the triton SSD scan needs a power-of-two chunk size; got {chunk_size}")
    L = max(16, min(chunk_size, cfg.max_chunk))
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    dot = dtypes[0] if acc == torch.float32 and dtypes[0] in (torch.float16, torch.bfloat16) else acc
    prec = "ieee" if INTERPRET or acc == torch.float64 else cfg.prec_fp32 if dot == torch.float32 else "tf32"
    target = 0 if INTERPRET or device.type != "cuda" else sm_count(device.index or 0) * cfg.programs_per_sm
    if cfg.state_schedule not in STATE_SCHEDULES:
        raise ValueError(f"SSDConfig.state_schedule (SESSA_SSD_CFG state_schedule=...): {cfg.state_schedule!r} "
                         f"is not one of {', '.join(STATE_SCHEDULES)}")
    def too_few_programs(bn: int, bp: int) -> bool:  # the fused state kernel's grid on an N x P tile
        return batch * H * cdiv(N, bn) * cdiv(P, bp) < target

    bn_s, bp_s = min(cfg.BN_STATE, _p2(N)), min(cfg.BP_STATE, _p2(P))
    split = cfg.state_schedule == "split" or (cfg.state_schedule == "auto" and too_few_programs(bn_s, bp_s))
    while too_few_programs(bn_s, bp_s) and max(bn_s, bp_s) > 16:
        if bn_s >= bp_s:
            bn_s //= 2
        else:
            bp_s //= 2
    NC = cdiv(T, L)
    bn_d = min(cfg.BN_DBC, _p2(N))
    per_group = H // G
    divisors = [d for d in range(1, per_group + 1) if per_group % d == 0]
    if cfg.head_split:
        hs = max(d for d in divisors if d <= cfg.head_split)
    else:
        base = NC * cdiv(N, bn_d) * batch * G
        hs = next((d for d in divisors if base * d >= target), per_group)
    return _Plan(batch, T, H, G, N, P, L, NC, min(cfg.BN, _p2(N)), min(cfg.BP, _p2(P)),
                 min(cfg.BP_DX, _p2(P)), bn_s, bp_s, bn_d, hs, split, min(cfg.BN_LOCAL, _p2(N)),
                 min(cfg.BP_LOCAL, _p2(P)), min(cfg.BE_PASS, next_power_of_2(N * P)), acc, dot, prec, cfg)


def _chunk_states(pl: _Plan, x, dt, A, B, init, with_final: bool = True):
    """The forward state pass -> (S_c for every chunk (B, H, NC, N, P) in DOT, final state
    (B, H, N, P) in ACC, or None without with_final: the backward's recomputation)."""
    st = new_buffer((pl.batch, pl.H, pl.NC, pl.N, pl.P), pl.dot, x.device)
    final = new_buffer((pl.batch, pl.H, pl.N, pl.P), pl.acc, x.device) if with_final else None
    _state_pass(pl, x, dt, A, B, init, st, final, reverse=False)
    return st, final


def _state_pass(pl: _Plan, v, dt, A, k, start, st, end, reverse: bool):
    """Fills st (and end unless None) as state_scan_kernel's docstring says, on the plan's schedule:
    state_scan_kernel, or chunk_local_state_kernel then state_pass_kernel (split). v (B, T, H, P),
    k (B, T, G, N): x and B forward, dy and C with reverse; start (B, H, N, P) ACC or None (zero)."""
    start_, end_ = (st if t is None else t for t in (start, end))  # st stands in for an absent one (not accessed)
    flags = {"REVERSE": reverse, "WRITE_END": end is not None}
    strides = (*v.stride(), *dt.stride(), *k.stride())
    if not pl.split:
        K.state_scan_kernel[pl.state_grid](
            v, dt, A, k, start_, st, end_, pl.T, pl.H, pl.G, pl.N, pl.P, pl.NC, pl.state_p_tiles, *strides,
            HAS_START=start is not None, BN=pl.BN_S, BP=pl.BP_S, **flags, **pl.consts(), **pl.kw("state"))
        return
    decay = new_buffer((pl.batch, pl.H, pl.NC), pl.acc, v.device)
    K.chunk_local_state_kernel[pl.local_grid](
        v, dt, A, k, st, end_, decay, pl.T, pl.H, pl.G, pl.N, pl.P, pl.NC, *pl.local_tiles, *strides,
        BN=pl.BN_L, BP=pl.BP_L, **flags, **pl.consts(), **pl.kw("local"))
    K.state_pass_kernel[pl.pass_grid](
        st, decay, start_, end_, pl.N, pl.P, pl.NC, HAS_START=start is not None, BE=pl.BE, CH=pl.cfg.CH_PASS,
        ACC=pl.consts()["ACC"], **flags, **pl.kw("pass"))


def _forward(pl: _Plan, x, dt, A, B, C, init, D):
    """-> y (x's dtype, contiguous; with D's skip when D is given), final state (ACC), CB (B, G, NC, L, L)
    (ACC), the chunk states st (B, H, NC, N, P) (DOT)."""
    cb = new_buffer((pl.batch, pl.G, pl.NC, pl.L, pl.L), pl.acc, x.device)
    K.cb_kernel[(pl.NC, pl.batch * pl.G)](
        C, B, cb, pl.T, pl.G, pl.N, pl.NC, *C.stride(), *B.stride(), BN=pl.BN, **pl.consts(), **pl.kw())
    st, final = _chunk_states(pl, x, dt, A, B, init)
    y = new_buffer(x.shape, x.dtype, x.device)
    K.out_fwd_kernel[pl.chunk_grid](
        x, dt, A, C, cb, st, D if D is not None else A, y, pl.T, pl.H, pl.G, pl.N, pl.P, pl.NC,
        pl.p_tiles, *x.stride(), *dt.stride(), *C.stride(), *y.stride(),
        HAS_D=D is not None, BN=pl.BN, BP=pl.BP, **pl.consts(), **pl.kw())
    return y, final, cb, st


def _backward(pl: _Plan, dy, dfinal, x, dt, A, B, C, init, D, cb, st=None, dx=None, dB=None, dC=None):
    """-> dx, ddt, dA, dB, dC, dinit, dD (ACC except dx, and dB / dC with one head split: in B's / C's
    dtype; dinit / dD None without an initial state / D). st: the forward's chunk states (keep_states),
    or None: recomputed here. dx, dB, dC: where to write those gradients (tensors of x's and B's shapes
    and dtypes, e.g. slices of the gradient of a packed [x | B | C]; default: new buffers)."""
    dev = x.device
    if st is None:
        st, _ = _chunk_states(pl, x, dt, A, B, init, with_final=False)
    dst = new_buffer((pl.batch, pl.H, pl.NC, pl.N, pl.P), pl.dot, dev)
    dinit = new_buffer((pl.batch, pl.H, pl.N, pl.P), pl.acc, dev) if init is not None else None
    _state_pass(pl, dy, dt, A, C, dfinal, dst, dinit, reverse=True)
    npb = pl.dx_p_tiles
    if dx is None:
        dx = new_buffer(x.shape, x.dtype, dev)
    ddt = new_buffer((npb, pl.batch, pl.T, pl.H), pl.acc, dev)
    # dA's and dD's per-chunk parts in one buffer: one reduction for both
    dA_dD = new_buffer((1 if D is None else 2, pl.batch, pl.NC, npb, pl.H), pl.acc, dev)
    K.dx_kernel[pl.dx_grid](
        x, dt, A, B, C, cb, st, dst, dy, D if D is not None else A, dx, ddt, dA_dD[0], dA_dD[-1],
        pl.T, pl.H, pl.G, pl.N, pl.P, pl.NC, npb, pl.batch,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *dy.stride(), *dx.stride(),
        HAS_D=D is not None, BN=pl.BN, BP=pl.BP_DX, **pl.consts(), **pl.kw("dx"))
    into_targets = dB is not None and pl.HS == 1  # one head split: the kernel's sums are final
    if into_targets:
        dB_parts, dC_parts, strides = dB, dC, (0, *dB.stride())
    else:  # per-split partial sums (in ACC), or with one split new buffers in B's / C's dtype (no cast launches)
        dB_parts = new_buffer((pl.HS, *B.shape), pl.acc if pl.HS > 1 else B.dtype, dev)
        dC_parts = new_buffer((pl.HS, *C.shape), pl.acc if pl.HS > 1 else C.dtype, dev)
        strides = dB_parts.stride()
    K.dbc_kernel[pl.dbc_grid](
        x, dt, A, B, C, st, dst, dy, dB_parts, dC_parts, pl.T, pl.H, pl.G, pl.N, pl.P, pl.NC, pl.n_tiles_dbc, pl.HS,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *dy.stride(), *strides,
        BN=pl.BN_D, BP=_p2(pl.P), **pl.consts(), **pl.kw("dbc"))
    if not into_targets:
        dB_parts, dC_parts = _sum0(dB_parts), _sum0(dC_parts)
        if dB is not None:
            dB.copy_(dB_parts)
            dC.copy_(dC_parts)
    dA_dD = dA_dD.sum((1, 2, 3))
    return (dx, _sum0(ddt), dA_dD[0], dB_parts if dB is None else dB, dC_parts if dC is None else dC, dinit,
            None if D is None else dA_dD[1])


def _sum0(parts: torch.Tensor) -> torch.Tensor:
    """The sum of the kernels' partial results over dim 0 (a view when there is one part)."""
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)


def _scan_forward(ctx, x, dt, A, B, C, init, D, chunk_size: int, cfg: SSDConfig):
    """The autograd functions' forward: -> (y, final state); saves what _scan_backward needs."""
    pl = _plan(x, dt, B, C, chunk_size, cfg)
    A_c = A.contiguous()
    init_c = None if init is None else init.contiguous()
    D_c = None if D is None else D.contiguous()
    y, final, cb, st = _forward(pl, x, dt, A_c, B, C, init_c, D_c)
    ctx.save_for_backward(x, dt, A_c, B, C, init_c, D_c, cb, st if cfg.keep_states else None)
    ctx.plan = pl
    ctx.set_materialize_grads(False)
    return y, final


def _scan_backward(ctx, dy, dfinal, dx=None, dB=None, dC=None):
    """The autograd functions' backward: -> dx, ddt, dA, dB, dC, dinit, dD, each in its input's dtype
    (dinit / dD None without them); dx, dB, dC as in _backward."""
    x, dt, A, B, C, init, D, cb, st = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    if dfinal is not None:
        dfinal = dfinal.contiguous()
    grads = _backward(ctx.plan, dy, dfinal, x, dt, A, B, C, init, D, cb, st, dx, dB, dC)
    return tuple(None if g is None else g if g.dtype == t.dtype else g.to(t.dtype)  # no calls for no-op casts
                 for g, t in zip(grads, (x, dt, A, B, C, init, D)))


class _TritonSSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, init, D, chunk_size, cfg):
        return _scan_forward(ctx, x, dt, A, B, C, init, D, chunk_size, cfg)

    @staticmethod
    def backward(ctx, dy, dfinal):
        grads = _scan_backward(ctx, dy, dfinal)
        return (*(g if n else None for g, n in zip(grads, ctx.needs_input_grad)), None, None)


class _TritonSSDPacked(torch.autograd.Function):
    """The scan on x, B, C packed as the columns [x | B | C] of one tensor: the kernels write dx, dB
    and dC into slices of its gradient (no concatenation in the backward pass)."""

    @staticmethod
    def forward(ctx, xbc, dt, A, init, D, head_dim, d_state, chunk_size, cfg):
        ctx.layout = (dt.shape[-1], head_dim, d_state)
        ctx.xbc = (xbc.shape, xbc.dtype, xbc.device)
        x, B, C = split_xbc(xbc, *ctx.layout)
        check_shapes(x, dt, A, B, C, D)
        return _scan_forward(ctx, x, dt, A, B, C, init, D, chunk_size, cfg)

    @staticmethod
    def backward(ctx, dy, dfinal):
        dxbc = new_buffer(*ctx.xbc)
        _, ddt, dA, _, _, dinit, dD = _scan_backward(ctx, dy, dfinal, *split_xbc(dxbc, *ctx.layout))
        need = ctx.needs_input_grad
        return (dxbc if need[0] else None, ddt if need[1] else None, dA if need[2] else None,
                dinit if need[3] else None, dD if need[4] else None, None, None, None, None)


def _triton_config(x, tensors, config: SSDConfig | None, keep_states: bool | None = None) -> SSDConfig | None:
    """The config of a Triton scan on x (default: SSDConfig with SESSA_SSD_CFG applied;
    INTERPRET_CONFIG in the interpreter), with keep_states unless None (before SESSA_SSD_CFG, which
    wins: tuning sweeps override the model's setting), or None where the PyTorch chunked scan serves
    it (float64 on GPU: float64 is for the CPU interpreter tests)."""
    if not (x.is_cuda or INTERPRET):
        raise ValueError("the triton SSD scan runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1); "
                         "use impl='chunked' or 'auto' here")
    if x.is_cuda and any(t.dtype == torch.float64 for t in tensors):
        return None
    base = config if config is not None else INTERPRET_CONFIG if INTERPRET else DEFAULT_CONFIG
    if keep_states is not None and keep_states != base.keep_states:
        base = replace(base, keep_states=keep_states)
    return base if config is not None else config_from_env(base)


@torch.compiler.disable  # torch.compile runs the model around it; the kernels launch as they are
def ssd_scan_triton(x, dt, A, B, C, initial_state=None, chunk_size: int = 64, config: SSDConfig | None = None,
                    D=None, keep_states: bool | None = None):
    """The SSD scan on the Triton kernels (module docstring), plus the skip D[h] x when D (H,) is
    given. ``config`` overrides tiles and launch options, ``keep_states`` its SSDConfig.keep_states
    (None: the config's; _triton_config)."""
    config = _triton_config(x, (x, dt, A, B, C), config, keep_states)
    if config is None:
        return ssd_scan(x, dt, A, B, C, initial_state=initial_state, chunk_size=chunk_size, impl="chunked", D=D)
    return _TritonSSD.apply(x, dt, A, B, C, initial_state, D, int(chunk_size), config)


@torch.compiler.disable
def ssd_scan_triton_packed(xbc, dt, A, head_dim: int, d_state: int, initial_state=None, chunk_size: int = 64,
                           config: SSDConfig | None = None, D=None, keep_states: bool | None = None):
    """ssd_scan_triton on x, B, C packed as xbc = [x | B | C] (B, T, H head_dim + 2 G d_state), H =
    dt.shape[-1]: the same results, and xbc's gradient comes back as one tensor."""
    config = _triton_config(xbc, (xbc, dt, A), config, keep_states)
    if config is None:
        x, B, C = split_xbc(xbc, dt.shape[-1], head_dim, d_state)
        return ssd_scan_triton(x, dt, A, B, C, initial_state, chunk_size, config, D)
    return _TritonSSDPacked.apply(xbc, dt, A, initial_state, D, int(head_dim), int(d_state), int(chunk_size), config)
