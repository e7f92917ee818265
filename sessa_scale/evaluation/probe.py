"""The memory-tail probe: how strongly a token still influences the output l steps later.

For a causal map y = fn(x), x: (B, T, D_in) -> y: (B, T, D_out), the influence at lag l is

    I(l) = RMS over source positions j in [0, J) (and over input sequences) of
           ||d y_{j+l} / d x_j||_F / sqrt(D_out),

the root-mean-square singular value of the Jacobian block (c for a block c * Identity). Sources
are held fixed at the start of the sequence and the target t = j + l moves away from them: the
memory tail is how a token's influence fades as time passes. (At a fixed target t the question is
a different one: under uniform routing the influence at fixed t *grows* with lag, because early
tokens are summed into every later output.) Each Jacobian block is estimated from one backward
pass of u . y_t with u a random unit vector (E ||u^T J||^2 = ||J||_F^2 / D_out; exact when D_out
is 1 or J is a multiple of the identity).

The power-law exponent beta is minus the least-squares slope of log I against log l over a fit
range of lags. The default range [T/16, T - J] starts well past the transient: on the spec's
uniform-routing construction the local slope is -(1 - gamma) + O(J / l), and this range recovers
beta = 1 - gamma to within 0.006 at T = 1024 and 0.003 at T = 2048 for gamma in [0.1, 0.99] with J = 4.

Targets: a model (the DecoderLM's blocks and final norm on its input embeddings, the same for
every architecture), one of its blocks, or the uniform-routing feedback solve itself.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from sessa_scale.errors import UserError
from sessa_scale.models.lm import DecoderLM
from sessa_scale.ops.feedback_solve import feedback_solve


def lag_grid(max_lag: int, n: int = 48) -> list[int]:
    """About n log-spaced integer lags in [1, max_lag] (all of them when there are fewer)."""
    if max_lag < 1:
        raise UserError(f"probe: the sequence leaves no lag to measure (largest lag {max_lag}); use a longer --length")
    return sorted({int(round(v)) for v in np.geomspace(1, max_lag, n)})


def influence_by_lag(
    fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    lags: list[int],
    n_sources: int,
    batch_size: int = 32,
    seed: int = 0,
) -> list[float]:
    """I(l) for each lag (see the module docstring). inputs: (N, T, D_in) sequences, each row of
    a batch a copy of one sequence; fn maps (b, T', D_in) -> (b, T', D_out) causally, so each batch
    is cut after its last target. Needs max(lags) + n_sources <= T."""
    N, T, _ = inputs.shape
    if max(lags) + n_sources > T:
        raise UserError(f"probe: lag {max(lags)} from {n_sources} sources needs {max(lags) + n_sources} positions, have {T}")
    gen = torch.Generator().manual_seed(seed)
    rows = sorted(((j + lag, j, k, n) for n in range(N) for k, lag in enumerate(lags) for j in range(n_sources)))
    sq_sum = torch.zeros(len(lags), dtype=torch.float64)
    batches = [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
    for batch in tqdm(batches, desc="probe", unit="batch", disable=None, leave=False):
        target, source, lag_idx, seq = (torch.tensor(c) for c in zip(*batch))
        length = int(target.max()) + 1
        x = inputs[seq, :length].detach().clone().requires_grad_(True)
        y = fn(x)
        u = torch.randn(len(batch), y.shape[-1], generator=gen, dtype=torch.float64).to(y)
        u = u / u.norm(dim=-1, keepdim=True)
        picked = y[torch.arange(len(batch)), target.to(y.device)]
        (grad,) = torch.autograd.grad((picked * u).sum(), x)
        block = grad[torch.arange(len(batch)), source.to(grad.device)]  # u^T dy_t/dx_j, (b, D_in)
        sq_sum.index_add_(0, lag_idx, block.double().pow(2).sum(-1).cpu())
    return (sq_sum / (N * n_sources)).sqrt().tolist()


def fit_power_law(lags: list[int], influence: list[float], fit_range: tuple[int, int]) -> dict:
    """Least-squares line through (log l, log I) for lags in [lo, hi]: {"beta" = -slope,
    "fit_range", "fit_points", "log_prefactor", "r2"}."""
    lo, hi = fit_range
    pts = [(l, v) for l, v in zip(lags, influence) if lo <= l <= hi and v > 0]
    if len(pts) < 3:
        raise UserError(
            f"probe: the fit range [{lo}, {hi}] holds {len(pts)} measured lags with nonzero influence (need >= 3); "
            f"measured lags run from {min(lags)} to {max(lags)}: widen --fit-range"
        )
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    total = float(((y - y.mean()) ** 2).sum())
    return {
        "beta": float(-slope),
        "fit_range": [int(lo), int(hi)],
        "fit_points": len(pts),
        "log_prefactor": float(intercept),
        "r2": 1.0 - float((resid**2).sum()) / total if total > 0 else 1.0,
    }


def default_fit_range(length: int, n_sources: int) -> tuple[int, int]:
    """[T/16, T - J]: lags well past the transient up to the largest one measured."""
    return max(2, length // 16), length - n_sources


def run_probe(
    fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    n_sources: int,
    fit_range: tuple[int, int] | None,
    n_lags: int = 48,
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """Measure I(l) on a log grid of lags and fit its power law: {"lags", "influence", "beta",
    "fit_range", ...} (see fit_power_law)."""
    T = inputs.shape[1]
    lags = lag_grid(T - n_sources, n_lags)
    influence = influence_by_lag(fn, inputs, lags, n_sources, batch_size, seed)
    fit = fit_power_law(lags, influence, fit_range or default_fit_range(T, n_sources))
    return {**fit, "length": T, "sources": n_sources, "sequences": inputs.shape[0], "lags": lags, "influence": influence}


def uniform_routing_solve(gamma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """f (B, T, D) -> s (B, T, D) solving s_t = f_t + gamma * mean_{j<t} s_j: the feedback solve
    with q_b = k_b = 0 (alpha[t, j] = 1/t) and constant gamma, the spec's uniform-routing case."""
    if not 0.0 < gamma < 1.0:
        raise UserError(f"probe: --gamma must lie strictly between 0 and 1, got {gamma}")

    def solve(f: torch.Tensor) -> torch.Tensor:
        B, T, D = f.shape
        zeros = f.new_zeros(B, T, 1, 1)
        return feedback_solve(zeros, zeros, f.new_full((B, T, 1), gamma), f.view(B, T, 1, D)).view(B, T, D)

    return solve


def uniform_closed_form(gamma: float, source: int, lag: int) -> float:
    """The spec's exact ds_t/df_j for t = source + lag > source: (gamma/t) prod_{k=j+1}^{t-1} (1 + gamma/k)."""
    t = source + lag
    return gamma / t * math.exp(sum(math.log1p(gamma / k) for k in range(source + 1, t)))


def probe_uniform(gamma: float, length: int, n_sources: int = 4, fit_range=None, n_lags: int = 48) -> dict:
    """The probe on the uniform-routing construction (float64, width 1); expected beta = 1 - gamma."""
    inputs = torch.zeros(1, length, 1, dtype=torch.float64)
    result = run_probe(uniform_routing_solve(gamma), inputs, n_sources, fit_range, n_lags, batch_size=16)
    return {"target": "uniform", "gamma": gamma, "expected_beta": 1.0 - gamma, **result}


def model_probe_fn(model: DecoderLM, layer: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Embeddings (B, T, D) -> the final-norm hidden states the LM head reads, or one block's output."""
    if layer is not None:
        if not 0 <= layer < len(model.layers):
            raise UserError(f"probe: --layer {layer} does not exist; the model has layers 0..{len(model.layers) - 1}")
        return model.layers[layer]

    def forward(x: torch.Tensor) -> torch.Tensor:
        for block in model.layers:
            x = block(x)
        return model.norm(x)

    return forward


def probe_model(
    model: DecoderLM,
    tokens: torch.Tensor,
    n_sources: int = 4,
    layer: int | None = None,
    fit_range=None,
    n_lags: int = 48,
    batch_size: int = 16,
    seed: int = 0,
) -> dict:
    """The probe on a model's input embeddings for token sequences (N, T); float32, eval mode."""
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # gradients are taken w.r.t. the inputs only
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            inputs = model.embed(tokens.to(model.embed.weight.device))
        result = run_probe(model_probe_fn(model, layer), inputs, n_sources, fit_range, n_lags, batch_size, seed)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return {"target": "model" if layer is None else f"layer {layer}", **result}
