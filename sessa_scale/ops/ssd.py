"""`ssd_scan`: Mamba-2's SSD scan (see sessa_scale/ops/ssd_reference.py for the math and shapes),
dispatching to an implementation by name.

Implementations:
* "triton": our Triton kernels (kernels/ssd.py via sessa_scale/ops/ssd_triton.py), forward and
  backward; CUDA (or the CPU interpreter under TRITON_INTERPRET=1). What "auto" picks on CUDA.
* "chunked": the PyTorch chunked algorithm (ssd_reference.ssd_chunked), everywhere; "auto" off CUDA.
* "sequential": the token-by-token recurrence (ssd_reference.ssd_sequential), the oracle.
* "fla": fla-core's Triton `chunk_simple_gla` (CUDA only; `pip install -e .[gpu]`). Simple GLA is
  SSD with a scalar decay per head: its recurrence S_t = exp(g_t) S_{t-1} + k_t v_t^T,
  o_t = scale * S_t^T q_t maps onto SSD with q = C, k = B (one copy per head), v = dt * x,
  g = dt * A, scale = 1; its state (B, H, K, V) is ours (B, H, N, P).
  fla 0.6 flags its gated simple-GLA backward as wrong on Hopper GPUs (H100/H200) with Triton >= 3.4
  and < 3.7.1 (fla issue #640) and raises there in the backward pass (measured on H100 with Triton
  3.6; fla's chunk_gla, the per-channel-gate variant, failed there too with a misaligned-address
  error). Triton >= 3.7.1 (or fla's tilelang backend) lifts this; `simple_gla_backward_is_broken`
  tells, and the GPU tests cross-check fla against ours only where it is not.
The chunked scan keeps only its inputs for the backward pass and recomputes the rest: its (chunk x
chunk) float32 intermediates would otherwise dominate a layer's activation memory.
"""

from __future__ import annotations

import importlib.util

import torch
from torch.utils.checkpoint import checkpoint

from sessa_scale.ops.ssd_reference import per_head, ssd_chunked, ssd_sequential

SSD_IMPLS = ("triton", "chunked", "sequential", "fla")


def fla_available() -> bool:
    """Whether fla-core's Triton ops import (they need triton and einops): the "fla" scan here, and
    the DeltaFormer yardstick of the solve benches (bench/baselines.py)."""
    try:
        import fla.ops.simple_gla  # noqa: F401
    except ImportError:
        return False
    return True


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # looked up once: the model asks per call


def triton_available() -> bool:
    """Whether triton is installed (the "triton" scan needs it, and CUDA or TRITON_INTERPRET=1)."""
    return _TRITON_INSTALLED


def resolve_ssd_impl(impl: str, device: torch.device) -> str:
    """Map "auto" to "triton" on CUDA when triton imports, else "chunked"."""
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "chunked"
    if impl not in SSD_IMPLS:
        raise ValueError(f"unknown SSD scan impl {impl!r}; choose from {['auto', *SSD_IMPLS]}")
    return impl


def simple_gla_backward_is_broken() -> bool:
    """fla's own flag for Hopper + Triton in [3.4, 3.7.1), where its gated simple-GLA backward is wrong."""
    import fla.utils as fu

    return bool(getattr(fu, "IS_NVIDIA_HOPPER", False) and getattr(fu, "TRITON_ABOVE_3_4_0", False)
                and not getattr(fu, "TRITON_ABOVE_3_7_1", True))  # fmt: skip


def ssd_fla(x, dt, A, B, C, initial_state=None, chunk_size: int = 64):
    """The scan on fla-core's Triton simple-GLA kernels (CUDA tensors; module docstring). q, k, v run
    in x's dtype, the log decay g in float32; returns (y in x's dtype, final state in float32)."""
    from fla.ops.simple_gla import chunk_simple_gla

    H = x.shape[2]
    q = per_head(C, H).to(x.dtype)
    k = per_head(B, H).to(x.dtype)
    v = (x * dt[..., None]).to(x.dtype)
    g = (dt.float() * A.float()).contiguous()
    state = None if initial_state is None else initial_state.float()
    y, final = chunk_simple_gla(
        q, k, v, g=g, scale=1.0, initial_state=state, output_final_state=True, chunk_size=chunk_size
    )
    return y.to(x.dtype), final


def ssd_scan(x, dt, A, B, C, *, initial_state=None, chunk_size: int = 64, impl: str = "auto", D=None):
    """x (B, T, H, P), dt (B, T, H) > 0, A (H,) < 0, B and C (B, T, G, N), initial_state
    (B, H, N, P) or None, D (H,) or None -> (y (B, T, H, P) in x's dtype, final state (B, H, N, P)).
    D adds the skip D[h] x[t, h] to y (inside the kernels for "triton", else y + x * D in x's dtype).
    impl: "auto" (triton on CUDA, else chunked) or one of SSD_IMPLS."""
    check_shapes(x, dt, A, B, C, D)
    name = resolve_ssd_impl(impl, x.device)
    if name == "triton":
        from sessa_scale.ops.ssd_triton import ssd_scan_triton

        return ssd_scan_triton(x, dt, A, B, C, initial_state, chunk_size, D=D)
    if name == "sequential":
        y, state = ssd_sequential(x, dt, A, B, C, initial_state)
    elif name == "fla":
        y, state = ssd_fla(x, dt, A, B, C, initial_state, chunk_size)
    else:
        inputs = (x, dt, A, B, C, initial_state)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
            y, state = checkpoint(ssd_chunked, *inputs, chunk_size, use_reentrant=False)
        else:
            y, state = ssd_chunked(*inputs, chunk_size)
    return (y if D is None else y + x * D[:, None].to(x.dtype)), state


def ssd_scan_packed(xbc, dt, A, *, head_dim: int, d_state: int, initial_state=None, chunk_size: int = 64,
                    impl: str = "auto", D=None, keep_states: bool | None = None):
    """ssd_scan on x, B, C packed as the columns [x | B | C] of xbc (B, T, H head_dim + 2 G d_state),
    H = dt.shape[-1] (the Mamba-2 mixer's conv output). With the Triton kernels the gradient of xbc
    comes back as one tensor, the kernels writing dx, dB and dC into its slices (no concatenation),
    and keep_states sets SSDConfig.keep_states (None: its default; ops/ssd_triton.py; the other
    implementations ignore it)."""
    if resolve_ssd_impl(impl, xbc.device) != "triton":
        x, B, C = split_xbc(xbc, dt.shape[-1], head_dim, d_state)
        return ssd_scan(x, dt, A, B, C, initial_state=initial_state, chunk_size=chunk_size, impl=impl, D=D)
    from sessa_scale.ops.ssd_triton import ssd_scan_triton_packed

    return ssd_scan_triton_packed(xbc, dt, A, head_dim, d_state, initial_state, chunk_size, D=D,
                                  keep_states=keep_states)


def split_xbc(xbc, H: int, head_dim: int, d_state: int):
    """[x | B | C] (B, T, H head_dim + 2 G d_state) -> views x (B, T, H, head_dim), B and C (B, T, G, d_state)."""
    E = H * head_dim
    GN = (xbc.shape[-1] - E) // 2
    if GN <= 0 or E + 2 * GN != xbc.shape[-1] or GN % d_state:
        raise ValueError(f"a packed [x | B | C] of {H} heads of width {head_dim} and B, C of groups of {d_state} "
                         f"needs {E} + 2 G {d_state} columns; got {xbc.shape[-1]}")
    x, B, C = xbc.split((E, GN, GN), dim=-1)
    return x.unflatten(-1, (H, head_dim)), B.unflatten(-1, (-1, d_state)), C.unflatten(-1, (-1, d_state))


def check_shapes(x, dt, A, B, C, D) -> None:
    """ValueError unless the shapes are those ssd_scan takes."""
    batch, T, H, P = x.shape
    if dt.shape != (batch, T, H) or A.shape != (H,) or (D is not None and D.shape != (H,)):
        raise ValueError(f"dt must be (B, T, H) = {(batch, T, H)}, A and D (H,); got {tuple(dt.shape)}, "
                         f"{tuple(A.shape)}, {None if D is None else tuple(D.shape)}")
    if B.shape != C.shape or B.shape[:2] != (batch, T) or H % B.shape[2] != 0:
        raise ValueError(f"B and C must be (B, T, G, N) with H % G == 0; got {tuple(B.shape)}, {tuple(C.shape)}")
