"""Mamba-2's state-space duality (SSD) scan in plain PyTorch: the sequential recurrence (the
oracle) and the chunked algorithm (what runs off GPU, and what the GPU kernel is checked against).

Per batch element and head h, with a scalar decay per head and step:

    state[t] = exp(dt[t, h] * A[h]) * state[t-1] + B[t] (dt[t, h] * x[t, h])^T      (N x P)
    y[t, h]  = C[t]^T state[t]                                                       (P,)

Shapes: x (B, T, H, P); dt (B, T, H), positive step sizes; A (H,), negative; B, C (B, T, G, N)
with H % G == 0 (head h reads group h // (H / G)); initial_state (B, H, N, P) or None.
Both functions return (y (B, T, H, P), final_state (B, H, N, P)). Arithmetic runs in
promote(x.dtype, float32); y comes back in x's dtype, the state in the arithmetic dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_head(bc: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, G, N) -> (B, T, H, N): head h reads group h // (H / G)."""
    return bc.repeat_interleave(n_heads // bc.shape[2], dim=2)


def _state0(initial_state, x: torch.Tensor, N: int, dtype: torch.dtype) -> torch.Tensor:
    B, _, H, P = x.shape
    if initial_state is None:
        return x.new_zeros(B, H, N, P, dtype=dtype)
    return initial_state.to(dtype)


def ssd_sequential(x, dt, A, B, C, initial_state=None):
    """The recurrence one token at a time (T sequential steps): the oracle."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    H, N = x.shape[2], B.shape[-1]
    Bh, Ch = per_head(B, H).to(dtype), per_head(C, H).to(dtype)
    decay = torch.exp(dt.to(dtype) * A.to(dtype))  # (B, T, H)
    u = x.to(dtype) * dt.to(dtype)[..., None]  # (B, T, H, P)
    state = _state0(initial_state, x, N, dtype)
    ys = []
    for t in range(x.shape[1]):
        state = decay[:, t, :, None, None] * state + Bh[:, t, :, :, None] * u[:, t, :, None, :]
        ys.append(torch.einsum("bhn,bhnp->bhp", Ch[:, t], state))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape, dtype=dtype)
    return y.to(x.dtype), state


def ssd_chunked(x, dt, A, B, C, initial_state=None, chunk_size: int = 64):
    """The SSD algorithm: within chunks of `chunk_size` tokens an attention-like masked product
    (C_i . B_j) * exp(cumulative decay from j to i); across chunks a recurrence over chunk states
    (T / chunk_size sequential steps). T need not be a multiple of chunk_size: the tail is padded
    with dt = 0 (decay 1, no input), which leaves outputs and the final state unchanged."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    batch, T, H, P = x.shape
    N, L = B.shape[-1], chunk_size
    pad = (-T) % L
    n_chunks = (T + pad) // L

    def chunks(t: torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (B, n_chunks, L, ...), padded
        t = F.pad(t.to(dtype), (0, 0) * (t.dim() - 2) + (0, pad))
        return t.view(batch, n_chunks, L, *t.shape[2:])

    Bc, Cc = chunks(per_head(B, H)), chunks(per_head(C, H))  # (B, c, L, H, N)
    u = chunks(x.to(dtype) * dt.to(dtype)[..., None])  # (B, c, L, H, P)
    g = chunks(dt.to(dtype) * A.to(dtype))  # (B, c, L, H) log decay per step
    cum = g.cumsum(dim=2)  # log decay from the chunk start through step i (inclusive)

    # Intra-chunk: y_i += sum_{j<=i} (C_i . B_j) exp(cum_i - cum_j) u_j.
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    seg = (cum[:, :, :, None, :] - cum[:, :, None, :, :]).masked_fill(~causal[:, :, None], float("-inf"))
    scores = torch.einsum("bcihn,bcjhn->bcijh", Cc, Bc) * seg.exp()  # (B, c, L_i, L_j, H)
    y = torch.einsum("bcijh,bcjhp->bcihp", scores, u)

    # Each chunk's contribution to the state at its end: sum_j exp(cum_last - cum_j) B_j u_j^T.
    to_end = (cum[:, :, -1:, :] - cum).exp()  # (B, c, L, H)
    chunk_states = torch.einsum("bcjhn,bcjh,bcjhp->bchnp", Bc, to_end, u)

    # Across chunks: the state entering chunk c, then its read-out C_i^T exp(cum_i) state.
    state = _state0(initial_state, x, N, dtype)
    entering = []
    for c in range(n_chunks):
        entering.append(state)
        state = cum[:, c, -1, :, None, None].exp() * state + chunk_states[:, c]
    states_in = torch.stack(entering, dim=1)  # (B, c, H, N, P)
    y = y + torch.einsum("bcihn,bcih,bchnp->bcihp", Cc, cum.exp(), states_in)
    return y.reshape(batch, n_chunks * L, H, P)[:, :T].to(x.dtype), state
