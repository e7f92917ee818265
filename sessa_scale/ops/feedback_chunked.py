"""Chunked feedback solve: blocked forward substitution with a hand-written adjoint backward.

Public layout (as :func:`sessa_scale.ops.feedback_solve`):

    q, k:  (B, T, H, Dk)   gamma: (B, T, H)   f: (B, T, H, Dv)   ->   s: (B, T, H, Dv)

    s[t] = f[t] + gamma[t] * sum_{j<t} P[t, j] s[j],   P[t, :] = softmax_{j<t}(scale * q[t].k[j]).

Rows are processed in chunks of C. For the row chunk [r0, r1) we build the (C, r1) block of P
against all earlier keys on the fly, so memory per (batch, head) is O(T * (Dk + Dv) + T * C);
P is never materialized as T x T. Internally tensors are (B, H, T, D) in the compute dtype
(float64 if any input is float64, else float32). Backward (see docs/sessa_math.md,
"Backward") recomputes P from the saved row log-sum-exp and solves the adjoint system
(I - diag(gamma) P)^T lambda = ds backwards in time, chunk by chunk.
"""

from __future__ import annotations

import torch


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _heads_first(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, H, ...) -> contiguous (B, H, T, ...) in ``dtype``."""
    return x.transpose(1, 2).to(dtype).contiguous()


def _chunk_probs(
    q_i: torch.Tensor, k: torch.Tensor, r0: int, scale: float, lse_i: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights of rows [r0, r0 + c) against keys [0, r1), r1 = r0 + c.

    q_i: (B, H, c, Dk); k: (B, H, r1, Dk); lse_i: (B, H, c) or None to compute it.
    Returns P: (B, H, c, r1), zero where j >= t (row 0 is all zero), and lse_i: (B, H, c)
    (0 for a row with no earlier key)."""
    c, r1 = q_i.shape[-2], k.shape[-2]
    rows = torch.arange(r0, r1, device=q_i.device).unsqueeze(-1)
    strict = torch.arange(r1, device=q_i.device) < rows  # (c, r1)
    logits = (q_i @ k.transpose(-1, -2)).mul_(scale).masked_fill_(~strict, float("-inf"))
    if lse_i is None:
        lse_i = torch.logsumexp(logits, dim=-1).nan_to_num_(neginf=0.0)
    return logits.sub_(lse_i.unsqueeze(-1)).exp_(), lse_i


def _unit_lower(p_diag: torch.Tensor, g_i: torch.Tensor) -> torch.Tensor:
    """Diagonal block I - diag(g_i) P_ii: (B, H, c, c) from p_diag (B, H, c, c), g_i (B, H, c)."""
    eye = torch.eye(p_diag.shape[-1], dtype=p_diag.dtype, device=p_diag.device)
    return eye - g_i.unsqueeze(-1) * p_diag


class _ChunkedFeedbackSolve(torch.autograd.Function):
    """autograd.Function over the public layout; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, gamma, f, scale: float, chunk_size: int):
        dtype = _compute_dtype(q, k, gamma, f)
        with torch.autocast(q.device.type, enabled=False):
            qh, kh, fh = (_heads_first(t, dtype) for t in (q, k, f))
            gh = _heads_first(gamma, dtype)  # (B, H, T)
            T = qh.shape[2]
            s = torch.zeros_like(fh)  # (B, H, T, Dv)
            lse = torch.empty_like(gh)  # (B, H, T)
            for r0 in range(0, T, chunk_size):
                r1 = min(r0 + chunk_size, T)
                g_i = gh[:, :, r0:r1]
                p, lse[:, :, r0:r1] = _chunk_probs(qh[:, :, r0:r1], kh[:, :, :r1], r0, scale)
                rhs = fh[:, :, r0:r1] + g_i.unsqueeze(-1) * (p[..., :r0] @ s[:, :, :r0])
                s[:, :, r0:r1] = torch.linalg.solve_triangular(
                    _unit_lower(p[..., r0:r1], g_i), rhs, upper=False, unitriangular=True
                )
        ctx.save_for_backward(q, k, gamma, s, lse)
        ctx.scale, ctx.chunk_size, ctx.f_dtype = scale, chunk_size, f.dtype
        return s.transpose(1, 2).to(f.dtype, memory_format=torch.contiguous_format, copy=True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ds):
        q, k, gamma, s, lse = ctx.saved_tensors
        scale, C, dtype = ctx.scale, ctx.chunk_size, s.dtype
        with torch.autocast(q.device.type, enabled=False):
            qh, kh, dsh = (_heads_first(t, dtype) for t in (q, k, ds))
            gh = _heads_first(gamma, dtype)
            T = qh.shape[2]
            lam = torch.empty_like(s)  # adjoint lambda = df, (B, H, T, Dv)
            acc = torch.zeros_like(s)  # sum over already-solved later rows t of gamma_t P[t, j] lambda_t
            dq, dk = torch.empty_like(qh), torch.zeros_like(kh)
            dgamma = torch.empty_like(gh)
            for r0 in reversed(range(0, T, C)):
                r1 = min(r0 + C, T)
                g_i = gh[:, :, r0:r1]
                q_i = qh[:, :, r0:r1]
                p, _ = _chunk_probs(q_i, kh[:, :, :r1], r0, scale, lse[:, :, r0:r1])
                lam_i = torch.linalg.solve_triangular(
                    _unit_lower(p[..., r0:r1], g_i).transpose(-1, -2),
                    dsh[:, :, r0:r1] + acc[:, :, r0:r1],
                    upper=True,
                    unitriangular=True,
                )
                lam[:, :, r0:r1] = lam_i
                g_lam = g_i.unsqueeze(-1) * lam_i  # (B, H, c, Dv)
                acc[:, :, :r0] += p[..., :r0].transpose(-1, -2) @ g_lam
                context = p @ s[:, :, :r1]  # c_t = sum_{j<t} P[t, j] s_j
                dgamma_i = (lam_i * context).sum(-1)  # (B, H, c)
                dp = g_lam @ s[:, :, :r1].transpose(-1, -2)  # (B, H, c, r1)
                dlogits = p.mul_(dp.sub_((g_i * dgamma_i).unsqueeze(-1))).mul_(scale)
                dgamma[:, :, r0:r1] = dgamma_i
                dq[:, :, r0:r1] = dlogits @ kh[:, :, :r1]
                dk[:, :, :r1] += dlogits.transpose(-1, -2) @ q_i
        dq, dk, dgamma = (g.transpose(1, 2).to(x.dtype) for g, x in ((dq, q), (dk, k), (dgamma, gamma)))
        return dq, dk, dgamma, lam.transpose(1, 2).to(ctx.f_dtype), None, None


def feedback_solve_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    gamma: torch.Tensor,
    f: torch.Tensor,
    scale: float,
    *,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Chunked feedback solve with O(T * (Dk + Dv + chunk_size)) memory per (batch, head).

    q, k: (B, T, H, Dk); gamma: (B, T, H); f: (B, T, H, Dv) -> s: (B, T, H, Dv) in f's dtype.
    Computes in float32 (float64 if any input is float64), also under autocast; gradients come
    back in each input's dtype. ``chunk_size`` (C >= 1) need not divide T.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    return _ChunkedFeedbackSolve.apply(q, k, gamma, f, float(scale), int(chunk_size))
