"""The Mamba-2 baseline block (Dao & Gu, "Transformers are SSMs", 2024): pre-norm residual around
the Mamba-2 mixer, which differs from Sessa only in the sequence mixer.

Mixer, for u (B, T, D), inner width E = expand * D, H = E / P heads of width P, state size N,
G groups of B/C (heads share B and C within a group):

    z, x_raw       = split(in_proj(u), 2)                        # (B, T, E) each
    B_raw, C_raw   = B_proj(u), C_proj(u)                        # (B, T, G N) each
    x, B, C        = silu(causal depthwise conv1d(.)) of each    # conv_x, conv_B, conv_C
    dt             = softplus(dt_proj(u) + dt_bias)              # (B, T, H) step sizes
    A              = -exp(A_log)                                 # (H,) scalar decay rate per head
    y              = SSD(x, dt, A, B, C) + D * x                 # see sessa_scale/ops/ssd_reference.py
    out            = out_proj(RMSNorm(y * silu(z)) * norm.weight)  # gated RMSNorm, per group of E/G channels

This is mamba_ssm's Mamba2 with its fused in_proj (D -> [z, x, B, C, dt]) and conv1d (over [x, B, C])
kept as separate Linears and depthwise convs (the same function and parameter count: a depthwise
conv is per channel), so that tensor parallelism splits each along its heads or groups
(mamba2_plan below). They run fused all the same: the forward concatenates the four
projections' weights into one GEMM (u -> [z | x | B | C | dt]; when they are plain nn.Linears, i.e.
not under tensor parallelism) and the three convs' weights into one conv over the contiguous
[x | B | C] columns (one launch each instead of four and three, forward and backward), and the
scan takes that conv output packed (ops/ssd.ssd_scan_packed: x, B, C as its views; the Triton
scan writes their gradients into one tensor, no concatenation). With the Triton kernels the projection's
gradient is one tensor too: the gated norm, the conv and the dt op write dz, d[x | B | C] and d dt_raw
into its slices (sessa_scale/ops/joint_gradient.py), so the backward concatenates nothing before the
projection's two GEMMs. No biases on the projections, a bias on the convs, as there.
Decoding keeps the last d_conv - 1 conv inputs [x | B | C] and the SSM state (B, H, N, P): constant memory
per token. Widths are read from the tensors, so a tensor-parallel rank runs its heads unchanged.
`kernels` picks how the convs + SiLU, the gated RMSNorm and dt / A (softplus, -exp) run: "torch"
(the PyTorch code here, the reference), "triton" (fused kernels, sessa_scale/ops/mamba2_fused.py),
"auto" (triton on CUDA). `keep_states` (model.ssm_keep_states): the Triton scan keeps its forward's
chunk states for the backward instead of recomputing them (SSDConfig.keep_states in ops/ssd_triton.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sessa_scale.config.schema import ModelConfig
from sessa_scale.distributed.tp_styles import Column, Heads, Norm, Row, Shard, Style, indivisible
from sessa_scale.models.attention import joint_projection, project
from sessa_scale.models.spec import ArchSpec, Problem, is_int
from sessa_scale.ops.joint_gradient import GradientSlot, split_with_joint_gradient
from sessa_scale.ops.ssd import ssd_scan_packed, triton_available

MIXER_KERNELS = ("auto", "torch", "triton")
Cache = dict  # {"t": int, "conv": (B, d_conv - 1, E + 2 G N) the last conv inputs [x | B | C], "ssm": (B, H, N, P)}
CONVS = ("conv_x", "conv_B", "conv_C")  # in their channels' order in the joint conv [x | B | C]


def use_triton_kernels(kernels: str, t: torch.Tensor) -> bool:
    """Whether the mixer's fused Triton kernels run for `kernels` ("auto": on CUDA with triton)."""
    if kernels not in MIXER_KERNELS:
        raise ValueError(f"unknown mixer kernels {kernels!r}; choose from {list(MIXER_KERNELS)}")
    return kernels == "triton" or (kernels == "auto" and t.is_cuda and triton_available())


def causal_conv1d_silu_torch(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (B, T, C), taps (K, C) (a depthwise nn.Conv1d's weight.flatten(1).t()), bias (C,) -> silu(causal
    depthwise conv of x) (B, T, C): the PyTorch reference of ops/mamba2_fused.causal_conv1d_silu."""
    k, channels = taps.shape
    out = F.conv1d(x.transpose(1, 2), taps.t().unsqueeze(1), bias, padding=k - 1, groups=channels)
    return F.silu(out[..., : x.shape[1]].transpose(1, 2))


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight, the mean square taken over groups of group_size channels of
    the last dim (mamba_ssm normalizes each B/C group separately), computed in at least float32.
    In training it is recomputed in the backward pass (only y and z are kept): its float32
    temporaries would otherwise hold ~8 bytes per inner channel and token for every layer."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None, kernels: str = "torch"):
        super().__init__()
        self.eps, self.group_size, self.kernels = eps, dim if group_size is None else group_size, kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor, dz_slot: GradientSlot | None = None) -> torch.Tensor:
        """y, z (..., dim) -> (..., dim) in y's dtype. dz_slot: where the Triton kernel writes z's gradient."""
        if use_triton_kernels(self.kernels, y) and y.dim() == 3:
            from sessa_scale.ops.mamba2_fused import gated_rmsnorm

            return gated_rmsnorm(y, z, self.weight, self.group_size, self.eps, dz_slot)
        if torch.is_grad_enabled() and (y.requires_grad or z.requires_grad or self.weight.requires_grad):
            return checkpoint(self._norm, y, z, use_reentrant=False)
        return self._norm(y, z)

    def _norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(y.dtype, torch.float32)
        h = y.to(dtype) * F.silu(z.to(dtype))
        groups = h.unflatten(-1, (-1, self.group_size))
        h = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (h * self.weight.to(dtype)).to(y.dtype)


class Mamba2Mixer(nn.Module):
    """u (B, T, D) -> (B, T, D): the Mamba-2 sequence mixer (module docstring)."""

    def __init__(
        self,
        D: int,
        d_state: int = 128,
        head_dim: int = 64,
        expand: int = 2,
        d_conv: int = 4,
        n_groups: int = 1,
        chunk_size: int = 64,
        scan: str = "auto",
        kernels: str = "auto",
        keep_states: bool = True,
        norm_eps: float = 1e-5,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ):
        super().__init__()
        E = expand * D
        if E % head_dim != 0:
            raise ValueError(f"expand * D ({E}) must be divisible by head_dim ({head_dim})")
        H = E // head_dim
        if H % n_groups != 0:
            raise ValueError(f"the number of heads ({H}) must be divisible by n_groups ({n_groups})")
        self.d_inner, self.n_heads, self.head_dim, self.d_state = E, H, head_dim, d_state
        self.n_groups, self.d_conv, self.chunk_size, self.scan = n_groups, d_conv, chunk_size, scan
        self.kernels, self.keep_states = kernels, keep_states
        GN = n_groups * d_state

        self.in_proj = nn.Linear(D, 2 * E, bias=False)  # [z | x]
        self.B_proj = nn.Linear(D, GN, bias=False)
        self.C_proj = nn.Linear(D, GN, bias=False)
        self.dt_proj = nn.Linear(D, H, bias=False)
        self.conv_x, self.conv_B, self.conv_C = (nn.Conv1d(c, c, d_conv, groups=c) for c in (E, GN, GN))
        # dt = softplus(dt_bias) starts log-uniform in [dt_min, dt_max]; A uniform in [1, 16].
        dt = torch.exp(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1.0, 16.0)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(E, eps=norm_eps, group_size=E // n_groups, kernels=kernels)
        self.out_proj = nn.Linear(E, D, bias=False)

    def _project(self, u: torch.Tensor):
        """u (B, T, D) -> z (B, T, E), the conv input [x | B | C] (B, T, E + 2 G N), raw dt (B, T, H),
        and the slots of their gradients in one joint gradient of the projection (ops/joint_gradient.py:
        the Triton norm, conv and dt op write into them; no concatenation in the backward), or three
        None where the projection is not one product (tensor parallelism, ZeRO-3, torch.compile) or
        the Triton kernels do not run."""
        projections = (self.in_proj, self.B_proj, self.C_proj, self.dt_proj)
        zx, b, c, h = (p.weight.shape[0] for p in projections)  # this rank's widths under TP
        sizes = (zx // 2, zx // 2 + b + c, h)  # in_proj is [z | x]
        joined = joint_projection(u, projections) if use_triton_kernels(self.kernels, u) else None
        if joined is None:
            return (*project(u, projections, sizes=sizes), (None, None, None))
        (z, xbc, dt_raw), joint = split_with_joint_gradient(joined, sizes)
        return z, xbc, dt_raw, tuple(joint.slot(i) for i in range(len(sizes)))

    def conv_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The three depthwise convs as one over [x | B | C]: taps (K, E + 2 G N) (tap k of channel c
        at [k, c], channels contiguous, as the Triton kernels load them; one cat), bias (E + 2 G N,)."""
        convs = [getattr(self, name) for name in CONVS]
        return torch.cat([c.weight.flatten(1).t() for c in convs], dim=1), torch.cat([c.bias for c in convs])

    def _mix(self, z, xbc, dt_raw, initial_state, dz_slot=None, ddt_slot=None):
        """z (B, T, E), silu(conv output) [x | B | C] (B, T, E + 2 G N), raw dt (B, T, H) ->
        (out (B, T, D), final SSM state (B, H, N, P)). x, B, C reach the scan packed (views of xbc;
        the Triton scan writes their gradients into one tensor). dz_slot, ddt_slot: _project's."""
        dt, A = self.dt_and_decay(dt_raw, ddt_slot)
        y, state = ssd_scan_packed(
            xbc, dt, A, head_dim=self.head_dim, d_state=self.d_state, initial_state=initial_state,
            chunk_size=self.chunk_size, impl="sequential" if z.shape[1] == 1 else self.scan, D=self.D,
            keep_states=self.keep_states,
        )
        return self.out_proj(self.norm(y.flatten(-2), z, dz_slot)), state

    def dt_and_decay(self, dt_raw: torch.Tensor, ddt_slot: GradientSlot | None = None):
        """Raw dt (B, T, H) -> (dt = softplus(dt_raw + dt_bias) (B, T, H), A = -exp(A_log) (H,)),
        in at least float32; one fused launch (forward) with the Triton kernels (which write dt_raw's
        gradient into ddt_slot when given)."""
        if use_triton_kernels(self.kernels, dt_raw):
            from sessa_scale.ops.mamba2_fused import dt_softplus_and_decay

            return dt_softplus_and_decay(dt_raw, self.dt_bias, self.A_log, ddt_slot)
        return F.softplus(dt_raw + self.dt_bias), -torch.exp(self.A_log)

    def causal_conv(self, xbc: torch.Tensor, dxbc_slot: GradientSlot | None = None) -> torch.Tensor:
        """[x | B | C] (B, T, E + 2 G N) -> silu(causal depthwise conv) of it, one launch for the three
        convs (the Triton kernel writes xbc's gradient into dxbc_slot when given)."""
        taps, bias = self.conv_weights()
        if use_triton_kernels(self.kernels, xbc):
            from sessa_scale.ops.mamba2_fused import causal_conv1d_silu

            return causal_conv1d_silu(xbc, taps, bias, dxbc_slot)
        return causal_conv1d_silu_torch(xbc, taps, bias)

    def _forward(self, u: torch.Tensor):
        """u (B, T, D) -> out (B, T, D), the final SSM state, and the conv input [x | B | C]."""
        z, xbc, dt_raw, (dz_slot, dxbc_slot, ddt_slot) = self._project(u)
        out, state = self._mix(z, self.causal_conv(xbc, dxbc_slot), dt_raw, None, dz_slot, ddt_slot)
        return out, state, xbc

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, T, D) -> (B, T, D)."""
        return self._forward(u)[0]

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> Cache:
        """An empty recurrent state (max_len is accepted for the common API; the state has a fixed size)."""
        ref = self.in_proj.weight
        kw = dict(device=ref.device if device is None else device, dtype=ref.dtype if dtype is None else dtype)
        channels = sum(getattr(self, name).weight.shape[0] for name in CONVS)
        return {"t": 0, "ssm": torch.zeros(batch_size, self.n_heads, self.d_state, self.head_dim, **kw),
                "conv": torch.zeros(batch_size, self.d_conv - 1, channels, **kw)}

    def prefill(self, u: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """Parallel forward on a prompt u (B, T, D) from an empty cache -> (out, cache)."""
        if cache["t"] != 0:
            raise ValueError(f"prefill needs an empty cache, this one holds {cache['t']} positions")
        out, state, xbc = self._forward(u)
        keep = min(self.d_conv - 1, u.shape[1])
        if keep:
            cache["conv"][:, -keep:] = xbc[:, -keep:]
        cache["ssm"] = state.to(cache["ssm"].dtype)
        cache["t"] = u.shape[1]
        return out, cache

    def decode_step(self, u_t: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """One token u_t (B, D) or (B, 1, D) -> (out in the same shape, cache)."""
        u = u_t.unsqueeze(1) if u_t.dim() == 2 else u_t
        z, xbc, dt_raw, _ = self._project(u)
        taps, bias = self.conv_weights()
        window = torch.cat([cache["conv"], xbc], dim=1)  # (B, d_conv, E + 2 G N): oldest first
        conv_out = F.silu(torch.einsum("bkc,kc->bc", window, taps) + bias)[:, None]
        cache["conv"] = window[:, 1:]
        out, state = self._mix(z, conv_out, dt_raw, cache["ssm"])
        cache["ssm"] = state.to(cache["ssm"].dtype)
        cache["t"] += 1
        return out.view_as(u_t), cache


class Mamba2Block(nn.Module):
    """Pre-norm residual block x + Mamba2Mixer(LayerNorm(x)) (the same LayerNorm as Sessa's)."""

    def __init__(self, D: int, ln_eps: float = 1e-5, **mixer_kwargs):
        super().__init__()
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.mixer = Mamba2Mixer(D, **mixer_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        return x + self.mixer(self.ln(x))

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> Cache:
        """See Mamba2Mixer.init_cache."""
        return self.mixer.init_cache(batch_size, device=device, dtype=dtype, max_len=max_len)

    def prefill(self, x: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """Prompt x (B, T, D) on an empty cache -> (y (B, T, D), cache)."""
        out, cache = self.mixer.prefill(self.ln(x), cache)
        return x + out, cache

    def decode_step(self, x_t: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """One token x_t (B, D) or (B, 1, D) -> (y_t in the same shape, cache)."""
        out, cache = self.mixer.decode_step(self.ln(x_t), cache)
        return x_t + out, cache

    # The block protocol DecoderLM relies on (see sessa_scale.models.lm.Block).
    def residual_projections(self) -> list[nn.Linear]:
        """Linears writing into the residual stream (scaled init: std / sqrt(2 n_layers))."""
        return [self.mixer.out_proj]

    def default_init_modules(self) -> list[nn.Module]:
        """Modules that keep their own init under the scaled init (none: dt_bias, A_log, D, the convs
        and the norm are not Linears and keep theirs anyway)."""
        return []


# The architecture spec (sessa_scale/models/spec.py): model.arch = mamba2.

TRITON_CONV_MAX_WIDTH = 8  # the fused conv kernels unroll their taps into registers (sessa_scale/ops/mamba2_fused.py)
SSM_INTS = ("ssm_state", "ssm_head_dim", "ssm_expand", "ssm_groups", "ssm_conv", "ssm_chunk")  # its integer keys


def build_mamba2_block(cfg: ModelConfig, layer_idx: int) -> Mamba2Block:
    """The layer_idx-th block of the Mamba-2 baseline described by cfg."""
    return Mamba2Block(
        cfg.d_model,
        ln_eps=cfg.ln_eps,
        d_state=cfg.ssm_state,
        head_dim=cfg.ssm_head_dim,
        expand=cfg.ssm_expand,
        d_conv=cfg.ssm_conv,
        n_groups=cfg.ssm_groups,
        chunk_size=cfg.ssm_chunk,
        scan=cfg.ssm_scan,
        kernels=cfg.ssm_kernels,
        keep_states=cfg.ssm_keep_states,
    )


def validate_mamba2(cfg: ModelConfig) -> list[Problem]:
    """The SSD heads: ssm_head_dim divides the inner width, ssm_groups the head count (once d_model
    and the SSM integers are well-formed; their own problems are reported for every architecture)."""
    if not (is_int(cfg.d_model) and all(is_int(getattr(cfg, key)) and getattr(cfg, key) >= 1 for key in SSM_INTS)):
        return []
    inner, P, G = cfg.ssm_expand * cfg.d_model, cfg.ssm_head_dim, cfg.ssm_groups
    if inner % P != 0:
        return [("ssm_head_dim", f"{P} does not divide ssm_expand * d_model = {inner}; use a divisor of it, e.g. 64")]
    if (inner // P) % G != 0:
        return [("ssm_groups", f"{G} does not divide the {inner // P} SSD heads; use a divisor of the head count, e.g. 1")]
    if cfg.ssm_conv > TRITON_CONV_MAX_WIDTH and cfg.ssm_kernels in ("auto", "triton"):
        return [("ssm_conv", f"{cfg.ssm_conv} exceeds the {TRITON_CONV_MAX_WIDTH} taps of the Triton conv (model.ssm_kernels="
                 f"{cfg.ssm_kernels}); use ssm_conv <= {TRITON_CONV_MAX_WIDTH} (Mamba-2 uses 4) or model.ssm_kernels=torch")]
    return []


def mamba2_layer_flops(cfg: ModelConfig, T: int) -> int:
    """Forward FLOPs of one Mamba-2 block on one sequence of T tokens (chunked SSD). Per token:
    in_proj 2 D (2E + 2GN + H), depthwise conv 2 K (E + 2GN), out_proj 2 E D; the chunked SSD
    (chunks of Q): per chunk of q tokens, C B^T over the causal block 2 N G q(q+1)/2, its product
    with x 2 P H q(q+1)/2, the chunk's state B^T x 2 q N P H, and for every chunk after the first,
    the carried state's decay-and-add 2 N P H and its read-out C h 2 q N P H."""
    D, N, P, G, K, Q = cfg.d_model, cfg.ssm_state, cfg.ssm_head_dim, cfg.ssm_groups, cfg.ssm_conv, cfg.ssm_chunk
    E = cfg.ssm_expand * D
    H = E // P
    per_token = 2 * D * (2 * E + 2 * G * N + H) + 2 * K * (E + 2 * G * N) + 2 * E * D
    ssd = 0
    for i, start in enumerate(range(0, T, Q)):
        q = min(Q, T - start)
        ssd += (N * G + P * H) * q * (q + 1) + 2 * q * N * P * H
        if i > 0:
            ssd += 2 * N * P * H + 2 * q * N * P * H
    return T * per_token + ssd


def mamba2_plan(cfg: ModelConfig) -> dict[str, Style]:
    """Mamba-2 under TP (as mamba_ssm/Megatron): heads and B/C groups local. z, x, B, C and dt
    projections column-parallel, the depthwise convs and per-head parameters split with them, the
    gated RMSNorm local (it normalizes each group on its own), out_proj row-parallel."""
    convs = {f"mixer.{conv}.{p}": Shard(0) for conv in CONVS for p in ("weight", "bias")}
    return {
        "ln": Norm(),
        "mixer": Heads(("d_inner", "n_heads", "n_groups"), gather_input=False),
        "mixer.in_proj": Column(chunks=2),  # [z | x]
        "mixer.B_proj": Column(),
        "mixer.C_proj": Column(),
        "mixer.dt_proj": Column(),
        **convs,
        "mixer.dt_bias": Shard(0),
        "mixer.A_log": Shard(0),
        "mixer.D": Shard(0),
        "mixer.norm.weight": Shard(0),
        "mixer.out_proj": Row(),
    }


def mamba2_tp_problems(cfg: ModelConfig, tp: int) -> list[Problem]:
    """B/C groups (and with them the heads) split over tp."""
    return indivisible({"ssm_groups": cfg.ssm_groups}, tp)


MAMBA2 = ArchSpec(
    name="mamba2",
    build_block=build_mamba2_block,
    layer_flops=mamba2_layer_flops,
    validate=validate_mamba2,
    tp_plan=mamba2_plan,
    tp_problems=mamba2_tp_problems,
)
