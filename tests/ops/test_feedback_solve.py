"""Feedback solve: dense and chunked implementations against the sequential oracle, their
gradients, the spec's closed-form power-law Jacobian, and the public dispatcher."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from sessa_scale.ops.feedback_chunked import feedback_solve_chunked
from sessa_scale.ops.feedback_reference import feedback_solve_sequential
from sessa_scale.ops.feedback_solve import FEEDBACK_SOLVE_IMPLS, feedback_solve, resolve_impl

F64 = torch.float64
DK, DV = 5, 3  # Dk != Dv on purpose

# (name, solver(q, k, gamma, f, scale)); chunked runs with chunk sizes that do and do not divide T.
SOLVERS = [
    ("dense", FEEDBACK_SOLVE_IMPLS["dense"]),
    ("chunked-C16", functools.partial(feedback_solve_chunked, chunk_size=16)),
    ("chunked-C64", functools.partial(feedback_solve_chunked, chunk_size=64)),
]
SOLVER_IDS = [name for name, _ in SOLVERS]
SHAPES = [(T, H) for T in (1, 17, 64, 130) for H in (1, 3)]


def random_inputs(T: int, H: int, B: int = 2, dtype: torch.dtype = F64, seed: int = 0):
    """q, k: (B, T, H, DK) with O(1) logits; gamma: (B, T, H) in (-1, 1), both signs; f: (B, T, H, DV)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, DK, generator=gen, dtype=F64) * 1.5
    k = torch.randn(B, T, H, DK, generator=gen, dtype=F64) * 1.5
    gamma = torch.rand(B, T, H, generator=gen, dtype=F64) * 1.98 - 0.99
    f = torch.randn(B, T, H, DV, generator=gen, dtype=F64)
    return tuple(t.to(dtype) for t in (q, k, gamma, f))


@pytest.mark.parametrize("T,H", SHAPES)
@pytest.mark.parametrize("solver", [s for _, s in SOLVERS], ids=SOLVER_IDS)
def test_forward_matches_sequential(solver, T, H):
    q, k, gamma, f = random_inputs(T, H)
    expected = feedback_solve_sequential(q, k, gamma, f, 0.7)
    s = solver(q, k, gamma, f, 0.7)
    assert s.shape == f.shape and s.dtype == F64
    torch.testing.assert_close(s, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("T,H", SHAPES)
@pytest.mark.parametrize("solver", [s for _, s in SOLVERS], ids=SOLVER_IDS)
def test_gradients_match_autograd_of_sequential(solver, T, H):
    """Oracle: autograd through the token-by-token recurrence (independent of the dense solve's
    backward, so the dense form's autograd is checked here too)."""
    inputs = [t.requires_grad_() for t in random_inputs(T, H, seed=1)]
    upstream = torch.randn(2, T, H, DV, generator=torch.Generator().manual_seed(2), dtype=F64)
    expected = torch.autograd.grad(
        feedback_solve_sequential(*inputs, 0.7), inputs, upstream, allow_unused=True, materialize_grads=True
    )  # at T = 1, q, k and gamma do not enter the recurrence: their gradient is zero
    got = torch.autograd.grad(solver(*inputs, 0.7), inputs, upstream)
    for name, g, e in zip(("dq", "dk", "dgamma", "df"), got, expected):
        assert g.dtype == F64, name
        torch.testing.assert_close(g, e, rtol=0, atol=1e-8, msg=lambda m, n=name: f"{n}: {m}")


def test_chunked_gradcheck_tiny():
    inputs = [t.requires_grad_() for t in random_inputs(T=7, H=2, B=1, seed=3)]
    assert torch.autograd.gradcheck(lambda *x: feedback_solve_chunked(*x, 0.5, chunk_size=3), inputs)


def power_law_jacobian(T: int, gamma: float) -> torch.Tensor:
    """Closed form of ds_t/df_j (T x T) under uniform routing and constant gamma.

    With 0-based positions, row t has t earlier tokens, so alpha[t, j] = 1/t for j < t. The prefix
    sum S_t = sum_{j<=t} s_j obeys S_t = (1 + gamma/t) S_{t-1} + f_t, hence dS_{t-1}/df_j =
    prod_{k=j+1}^{t-1} (1 + gamma/k) and ds_t/df_j = (gamma/t) * that product for j < t.
    """
    jac = torch.eye(T, dtype=F64)
    for t in range(1, T):
        for j in range(t):
            jac[t, j] = gamma / t * math.prod(1 + gamma / kk for kk in range(j + 1, t))
    return jac


@pytest.mark.parametrize("gamma", [0.9, -0.6])
@pytest.mark.parametrize("solver", [s for _, s in SOLVERS], ids=SOLVER_IDS)
def test_uniform_routing_power_law_jacobian(solver, gamma):
    T = 65
    expected = power_law_jacobian(T, gamma)
    # Negative control: the 1-based reading of t (alpha = 1/(t+1)) is far from the closed form,
    # so a solver that includes the diagonal or shifts positions fails this test.
    shifted = torch.eye(T, dtype=F64)
    shifted[1:, :-1] = power_law_jacobian(T + 1, gamma)[2:, 1:-1]
    assert (shifted - expected).abs().max() > 1e-2

    q = torch.zeros(1, T, 1, 4, dtype=F64)
    k = torch.randn(1, T, 1, 4, dtype=F64)  # irrelevant: q = 0 makes every logit zero
    g = torch.full((1, T, 1), gamma, dtype=F64)
    # The solve is linear in f: with f[t, :] = e_t (Dv = T), column j of s is ds/df_j.
    jac_forward = solver(q, k, g, torch.eye(T, dtype=F64).view(1, T, 1, T), 1.0)[0, :, 0, :]
    torch.testing.assert_close(jac_forward, expected, rtol=0, atol=1e-10)
    # Same Jacobian through the backward pass (rows of ds/df from vector-Jacobian products).
    f = torch.zeros(1, T, 1, 1, dtype=F64, requires_grad=True)
    s = solver(q, k, g, f, 1.0)
    jac_backward = torch.stack(
        [torch.autograd.grad(s[0, t, 0, 0], f, retain_graph=True)[0].view(T) for t in range(T)]
    )
    torch.testing.assert_close(jac_backward, expected, rtol=0, atol=1e-10)


def test_auto_on_cpu_resolves_to_chunked():
    assert resolve_impl("auto", torch.device("cpu")) == "chunked"
    q, k, gamma, f = random_inputs(T=9, H=2)
    torch.testing.assert_close(
        feedback_solve(q, k, gamma, f), feedback_solve_chunked(q, k, gamma, f, 1 / math.sqrt(DK)), rtol=0, atol=0
    )


def test_default_scale_is_inverse_sqrt_dk():
    q, k, gamma, f = random_inputs(T=20, H=2)
    expected = feedback_solve_sequential(q, k, gamma, f, 1 / math.sqrt(DK))
    torch.testing.assert_close(feedback_solve(q, k, gamma, f, impl="chunked"), expected, rtol=0, atol=1e-10)
    assert (feedback_solve(q, k, gamma, f, scale=1.0, impl="chunked") - expected).abs().max() > 1e-3


def test_unknown_impl_raises():
    with pytest.raises(ValueError, match="unknown feedback_solve impl 'nope'"):
        feedback_solve(*random_inputs(T=4, H=1), impl="nope")


@pytest.mark.parametrize(
    "which,shape,match",
    [
        ("k", (2, 4, 1, DK + 1), "q and k must both be"),
        ("q", (2, 4, DK), "q and k must both be"),
        ("gamma", (2, 4, 2), "gamma must be"),
        ("f", (2, 5, 1, DV), "f must be"),
    ],
)
def test_bad_shapes_raise(which, shape, match):
    inputs = dict(zip(("q", "k", "gamma", "f"), random_inputs(T=4, H=1)))
    inputs[which] = torch.zeros(shape, dtype=F64)
    with pytest.raises(ValueError, match=match):
        feedback_solve(**inputs)


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        feedback_solve_chunked(*random_inputs(T=4, H=1), 1.0, chunk_size=0)


def test_bf16_inputs_give_bf16_close_to_fp64():
    ref_inputs = random_inputs(T=50, H=2, seed=4)
    expected = feedback_solve_sequential(*ref_inputs, 0.5)
    inputs = [t.to(torch.bfloat16).requires_grad_() for t in ref_inputs]
    s = feedback_solve(*inputs, scale=0.5, impl="chunked")
    assert s.dtype == torch.bfloat16
    torch.testing.assert_close(s.double(), expected, rtol=0.05, atol=0.1)
    s.float().square().sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 and t.grad.isfinite().all() for t in inputs)


def test_autocast_keeps_float32_accuracy():
    ref_inputs = random_inputs(T=50, H=2, seed=5)
    expected = feedback_solve_sequential(*ref_inputs, 0.5)
    inputs = [t.float().requires_grad_() for t in ref_inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = feedback_solve(*inputs, scale=0.5, impl="chunked")
    assert s.dtype == torch.float32
    torch.testing.assert_close(s.double(), expected, rtol=0, atol=1e-4)
    s.sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in inputs)
