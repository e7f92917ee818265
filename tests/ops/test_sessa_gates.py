"""Tests of the Sessa block's Triton gates (kernels/sessa_gates.py via sessa_scale/ops/sessa_gates.py)
against their PyTorch reference (F.gelu, s * g; SessaLayer's torch path).

CPU (CI): under TRITON_INTERPRET=1, in a fresh subprocess (this file with ``--interp-worker``): the gates
on the strided halves of W_in's output at T in {1, 17, 130} in float64 (values and gradients to 1e-12, the
gradient of W_in's output handed on without a concatenation), in bfloat16 (one rounding), and a tiny
SessaLayer whose fused forward and backward equal its torch path.
GPU (``-m gpu``): the 350m-width layer, fused against the torch path, in fp32 and under bf16 autocast.
"""

from __future__ import annotations

import os
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.interpreter import run_interpreter_worker


def _halves(B: int, T: int, D: int, dtype, device, seed: int):
    """h (B, T, 2 D) requiring grad, s (B, T, D) requiring grad, the upstream gradient dy (B, T, D)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h, s, dy = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in
                ((B, T, 2 * D), (B, T, D), (B, T, D)))
    return (h.to(device, dtype).requires_grad_(), s.to(device, dtype).requires_grad_(), dy.to(device, dtype))


def _gated(h, s, fused: bool):
    """gelu(a) and gate(s, g) of h's halves (fused: the Triton ops with a joint gradient) -> gelu(a) + s * g."""
    from sessa_scale.ops import sessa_gates
    from sessa_scale.ops.joint_gradient import split_with_joint_gradient

    if not fused:
        a, g = h.chunk(2, dim=-1)
        return F.gelu(a) + s * g
    (a, g), joint = split_with_joint_gradient(h, (h.shape[-1] // 2,) * 2)
    return sessa_gates.gelu(a, joint.slot(0)) + sessa_gates.gate(s, g, joint.slot(1))


def _interp_worker() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from sessa_scale.models import sessa as sessa_model
    from sessa_scale.models.sessa import SessaLayer
    from tests.helpers.op_counter import OpCounter

    for T in (1, 17, 130):
        h, s, dy = _halves(2, T, 40, torch.float64, "cpu", seed=T)
        ref = _gated(h, s, fused=False)
        ref_grads = torch.autograd.grad(ref, (h, s), dy)
        out = _gated(h, s, fused=True)
        with OpCounter() as backward:
            grads = torch.autograd.grad(out, (h, s), dy)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert backward.ops["cat"] == 0, backward.ops  # da, dg written into one gradient of h
        print(f"ok float64 T={T}", flush=True)
    # bf16 in and out, float32 inside: each op within one bf16 rounding of torch's (which also computes in float32)
    from sessa_scale.ops import sessa_gates

    h, s, dy = _halves(2, 130, 40, torch.bfloat16, "cpu", seed=3)
    a, g = h.chunk(2, dim=-1)
    for fused, ref, inputs in ((sessa_gates.gelu(a), F.gelu(a), (h,)), (sessa_gates.gate(s, g), s * g, (h, s))):
        got, want = (fused, *torch.autograd.grad(fused, inputs, dy)), (ref, *torch.autograd.grad(ref, inputs, dy))
        for x, y in zip(got, want):
            assert x.dtype == torch.bfloat16
            torch.testing.assert_close(x.float(), y.float(), rtol=2 ** -7, atol=1e-6)
    print("ok bfloat16", flush=True)
    # a SessaLayer: the fused path (taken here, CPU tensors under the interpreter) against its torch path
    torch.manual_seed(0)
    layer = SessaLayer(32, n_heads=2, max_len=64, solver="chunked").double()
    x = torch.randn(2, 33, 32, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 33, 32, dtype=torch.float64)
    assert sessa_model.fused_gates(layer.W_in(x))
    y = layer(x)
    grads = torch.autograd.grad(y, (x, *layer.parameters()), dy)
    with mock.patch.object(sessa_model, "fused_gates", lambda h: False):
        y_ref = layer(x)
        ref_grads = torch.autograd.grad(y_ref, (x, *layer.parameters()), dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    print("ok layer", flush=True)


def test_interpreter_gates_against_torch():
    pytest.importorskip("triton")
    out = run_interpreter_worker(__file__)
    assert out.count("ok ") == 5, out


def test_cpu_layers_take_the_torch_path():
    from sessa_scale.models.sessa import fused_gates

    assert not fused_gates(torch.zeros(1, 2, 8))


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_layer_fused_gates_against_torch_path(precision):
    """The 350m width (D = 768, 12 heads) at T = 1000 on CUDA: the fused gates against the torch path, in fp32
    to float32 rounding, under bf16 autocast within bf16 tolerances."""
    from sessa_scale.models import sessa as sessa_model
    from sessa_scale.models.sessa import SessaLayer
    from sessa_scale.training.precision import autocast

    torch.manual_seed(0)
    layer = SessaLayer(768, n_heads=12).cuda()
    x = torch.randn(2, 1000, 768, device="cuda", requires_grad=True)
    dy = torch.randn(2, 1000, 768, device="cuda")

    def run():
        with autocast(precision, x.device):
            y = layer(x)
        return (y, *torch.autograd.grad(y, (x, *layer.parameters()), dy))

    assert sessa_model.fused_gates(layer.W_in(x))
    got = run()
    with mock.patch.object(sessa_model, "fused_gates", lambda h: False):
        want = run()
    tol = 1e-5 if precision == "fp32" else 2e-2
    for name, a, b in zip(["y", "dx", *(n for n, _ in layer.named_parameters())], got, want):
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert err <= tol, (name, err)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "--interp-worker":
        _interp_worker()
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --interp-worker")
