"""Mamba-2's SSD scan: the chunked algorithm against the sequential recurrence and the materialized
quadratic (attention-like) form, carried states, gradients, and fla-core's Triton kernel on GPU."""

from __future__ import annotations

import pytest
import torch

from sessa_scale.ops.ssd import fla_available, resolve_ssd_impl, simple_gla_backward_is_broken, ssd_scan
from sessa_scale.ops.ssd_reference import ssd_chunked, ssd_sequential


def inputs(batch=2, T=17, H=4, P=3, G=2, N=5, dtype=torch.float64, device="cpu", seed=0, state=False):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    x, B, C = rand(batch, T, H, P), rand(batch, T, G, N), rand(batch, T, G, N)
    dt = torch.nn.functional.softplus(rand(batch, T, H) - 1.0)
    A = -torch.rand(H, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) * 2 - 0.1
    h0 = rand(batch, H, N, P) if state else None
    return x, dt, A, B, C, h0


def quadratic_form(x, dt, A, B, C):
    """y = M (dt x) with M[t, j] = C_t . B_j * exp(sum_{k=j+1}^{t} dt_k A) for j <= t (zero initial state),
    the whole T x T matrix materialized per head: SSD's 'attention' form."""
    H = x.shape[2]
    Bh = B.repeat_interleave(H // B.shape[2], dim=2)
    Ch = C.repeat_interleave(H // C.shape[2], dim=2)
    cum = torch.cumsum(dt * A, dim=1)  # (B, T, H)
    T = x.shape[1]
    seg = cum[:, :, None, :] - cum[:, None, :, :]  # (B, t, j, H)
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None]
    decay = torch.where(mask, seg, torch.full_like(seg, float("-inf"))).exp()
    M = torch.einsum("bthn,bjhn->btjh", Ch, Bh) * decay
    return torch.einsum("btjh,bjhp->bthp", M, x * dt[..., None])


@pytest.mark.parametrize("T", [1, 17, 63, 65, 130])
@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_matches_the_sequential_recurrence(T, chunk):
    x, dt, A, B, C, h0 = inputs(T=T, seed=T, state=True)
    y_seq, h_seq = ssd_sequential(x, dt, A, B, C, h0)
    y_chk, h_chk = ssd_chunked(x, dt, A, B, C, h0, chunk_size=chunk)
    assert y_chk.dtype == torch.float64 and y_chk.shape == x.shape and h_chk.shape == (2, 4, 5, 3)
    torch.testing.assert_close(y_chk, y_seq, rtol=0, atol=1e-10)
    torch.testing.assert_close(h_chk, h_seq, rtol=0, atol=1e-10)


@pytest.mark.parametrize("T", [1, 65])
def test_both_match_the_materialized_quadratic_form(T):
    x, dt, A, B, C, _ = inputs(T=T, G=1, seed=3)
    expected = quadratic_form(x, dt, A, B, C)
    torch.testing.assert_close(ssd_sequential(x, dt, A, B, C)[0], expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(ssd_chunked(x, dt, A, B, C, chunk_size=16)[0], expected, rtol=0, atol=1e-10)


def test_a_carried_state_splits_the_sequence_exactly():
    x, dt, A, B, C, _ = inputs(T=70, seed=5)
    y_full, h_full = ssd_chunked(x, dt, A, B, C, chunk_size=16)
    y1, h1 = ssd_chunked(x[:, :33], dt[:, :33], A, B[:, :33], C[:, :33], chunk_size=16)
    y2, h2 = ssd_chunked(x[:, 33:], dt[:, 33:], A, B[:, 33:], C[:, 33:], initial_state=h1, chunk_size=16)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_full, rtol=0, atol=1e-10)
    torch.testing.assert_close(h2, h_full, rtol=0, atol=1e-10)


def test_chunked_gradients_match_the_recurrence():
    args = [t.requires_grad_() for t in inputs(T=23, seed=7, state=True)]
    gy = torch.randn(2, 23, 4, 3, dtype=torch.float64)
    gh = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    grads = []
    for fn in (ssd_sequential, lambda *a: ssd_chunked(*a, chunk_size=16)):
        y, h = fn(*args)
        grads.append(torch.autograd.grad((y * gy).sum() + (h * gh).sum(), args))
    for name, a, b in zip(("x", "dt", "A", "B", "C", "h0"), *grads):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10, msg=name)


def test_scan_recomputes_the_chunked_scan_in_backward_with_the_same_gradients():
    args = [t.requires_grad_() for t in inputs(T=40, seed=9, state=True)]
    gy = torch.randn(2, 40, 4, 3, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y, h = ssd_scan(*args[:5], initial_state=args[5], chunk_size=16)
    assert sum(saved) <= sum(t.numel() for t in args)  # only the inputs are kept
    grads = torch.autograd.grad((y * gy).sum() + h.sum(), args)
    y_ref, h_ref = ssd_sequential(*args)
    for name, g, ref in zip("x dt A B C h0".split(), grads, torch.autograd.grad((y_ref * gy).sum() + h_ref.sum(), args)):
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-10, msg=name)


def test_dispatch_and_shape_errors():
    assert resolve_ssd_impl("auto", torch.device("cpu")) == "chunked"
    assert resolve_ssd_impl("sequential", torch.device("cpu")) == "sequential"
    with pytest.raises(ValueError, match="unknown SSD scan impl"):
        resolve_ssd_impl("magic", torch.device("cpu"))
    x, dt, A, B, C, _ = inputs()
    torch.testing.assert_close(ssd_scan(x, dt, A, B, C, chunk_size=16)[0], ssd_sequential(x, dt, A, B, C)[0])
    with pytest.raises(ValueError, match="dt must be"):
        ssd_scan(x, dt[:, :-1], A, B, C)
    with pytest.raises(ValueError, match="H % G"):
        ssd_scan(x, dt, A, B[:, :, :1].expand(-1, -1, 3, -1), C[:, :, :1].expand(-1, -1, 3, -1))


gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and fla_available()) or simple_gla_backward_is_broken(),
    reason="needs CUDA and fla-core whose simple-GLA backward is right on this GPU (not Hopper + Triton < 3.7.1)",
)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [1, 17, 65, 130, 1000])
def test_fla_kernel_matches_the_reference_on_gpu(T):
    """fla's chunk_simple_gla with our mapping (q = C, k = B, v = dt x, g = dt A) in fp32 against the
    chunked reference in float64: outputs, final state and every input gradient. Skipped where fla
    flags its backward as wrong (Hopper + Triton < 3.7.1), where "auto" does not use it."""
    ref_in = [t.requires_grad_() if t is not None else None for t in inputs(batch=2, T=T, H=4, P=64, G=1, N=128, device="cuda", state=True)]
    gpu_in = [t.detach().float().requires_grad_() for t in ref_in]
    gy = torch.randn(2, T, 4, 64, device="cuda", dtype=torch.float64)
    outs = []
    for impl, args in (("chunked", ref_in), ("fla", gpu_in)):
        y, h = ssd_scan(*args[:5], initial_state=args[5], impl=impl)
        loss = (y.double() * gy).sum() + h.double().sum()
        outs.append((y.double(), h.double(), torch.autograd.grad(loss, args)))
    (y_ref, h_ref, g_ref), (y_fla, h_fla, g_fla) = outs
    scale = y_ref.abs().max().item()
    assert (y_fla - y_ref).abs().max().item() <= 2e-3 * scale
    assert (h_fla - h_ref).abs().max().item() <= 2e-3 * h_ref.abs().max().item()
    for name, a, b in zip(("x", "dt", "A", "B", "C", "h0"), g_ref, g_fla):
        assert (b.double() - a).abs().max().item() <= 5e-3 * a.abs().max().item(), name
