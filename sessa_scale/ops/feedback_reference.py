"""Plain reference implementations of the Sessa feedback solve (the test oracles).

All functions take the public layout of :func:`sessa_scale.ops.feedback_solve`:

    q, k:  (B, T, H, Dk)   feedback queries / keys
    gamma: (B, T, H)       per-token feedback gains
    f:     (B, T, H, Dv)   forward-branch outputs (right-hand side)
    -> s:  (B, T, H, Dv)   solution of  s[t] = f[t] + gamma[t] * sum_{j<t} alpha[t, j] s[j],
                           alpha[t, :] = softmax_{j<t}(scale * q[t].k[j]), row t = 0 all zero.

Half-precision inputs are computed in float32 and returned in the dtype of ``f``.
"""

from __future__ import annotations

import torch


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The solve's compute dtype ACC (every implementation): float64 if any input is, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def strictly_causal_alpha(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Feedback routing weights alpha: (B, H, T, T), strictly lower triangular rows summing to 1
    (row 0 is all zero). q, k: (B, T, H, Dk) in the compute dtype."""
    T = q.shape[1]
    logits = torch.einsum("bthd,bshd->bhts", q, k) * scale
    strict = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(-1)
    # Row 0 has no admissible key: unmask (0, 0) so the softmax stays finite, then zero the row.
    admissible = strict.clone()
    admissible[0, 0] = True
    alpha = torch.softmax(logits.masked_fill(~admissible, float("-inf")), dim=-1)
    return alpha * strict.to(alpha.dtype)


def feedback_solve_dense(
    q: torch.Tensor, k: torch.Tensor, gamma: torch.Tensor, f: torch.Tensor, scale: float
) -> torch.Tensor:
    """Materialize alpha (T x T per head) and solve (I - diag(gamma) alpha) s = f with a dense
    unit-lower-triangular solve. O(T^2) memory; differentiable through autograd."""
    dtype = acc_dtype(q, k, gamma, f)
    qc, kc, gc, fc = (t.to(dtype) for t in (q, k, gamma, f))
    alpha = strictly_causal_alpha(qc, kc, scale)  # (B, H, T, T)
    T = q.shape[1]
    eye = torch.eye(T, dtype=dtype, device=q.device)
    system = eye - gc.permute(0, 2, 1).unsqueeze(-1) * alpha  # (B, H, T, T)
    s = torch.linalg.solve_triangular(system, fc.transpose(1, 2), upper=False, unitriangular=True)
    return s.transpose(1, 2).to(f.dtype)


def feedback_solve_sequential(
    q: torch.Tensor, k: torch.Tensor, gamma: torch.Tensor, f: torch.Tensor, scale: float
) -> torch.Tensor:
    """Token-by-token recurrence, the most literal form of the definition (slow; for tests)."""
    dtype = acc_dtype(q, k, gamma, f)
    qc, kc, gc, fc = (t.to(dtype) for t in (q, k, gamma, f))
    B, T, H, _ = q.shape
    outputs = []
    for t in range(T):
        s_t = fc[:, t]
        if t > 0:
            logits = torch.einsum("bhd,bjhd->bhj", qc[:, t], kc[:, :t]) * scale
            weights = torch.softmax(logits, dim=-1)  # (B, H, t)
            context = torch.einsum("bhj,bjhd->bhd", weights, torch.stack(outputs, dim=1))
            s_t = s_t + gc[:, t].unsqueeze(-1) * context
        outputs.append(s_t)
    return torch.stack(outputs, dim=1).to(f.dtype)
