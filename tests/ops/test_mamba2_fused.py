"""Tests of the Mamba-2 mixer's fused Triton conv + SiLU, gated RMSNorm and dt softplus with
A = -exp(A_log) (kernels/mamba2_fused.py via sessa_scale/ops/mamba2_fused.py) against the PyTorch
paths of sessa_scale/models/mamba2.py.

CPU (CI): under TRITON_INTERPRET=1 in a fresh subprocess (this file with ``--interp-worker``), in
float32 (and at two T float64) inputs (the kernels compute in float32), T in {1, 17, 63, 65, 130}
(the norm, per row, at 1 and 17), outputs and every gradient (inputs, weights, biases), strided inputs, input
gradients written into the blocks of one joint gradient (strided slices, as the mixer's projection), buffers
poisoned with NaN (the conv backward's weight-gradient partials included; its programs walk runs
of INTERPRET_CONV_TILES = 2 tiles of CONV_BWD_BT = 4 flattened tokens there, so runs cross sequence
boundaries, end past B T and hold tiles near boundaries (masked) and inside sequences (unmasked;
the forward likewise with tiles of CONV_FWD_BT = 8); sequences of 2 and 3 tokens, shorter than the
conv width 4, several per tile, and of 14 (a tile start 2 tokens into a sequence); the dt op's 128-row
programs: one to three); and the whole Mamba-2 mixer with ssm_kernels="triton" (and the Triton
scan) against "torch" (and the chunked scan), and a Mamba-2 block under bf16 autocast with the projection's
joint gradient against the plain split, bit for bit.
GPU (``-m gpu``): the same comparisons in float32 and under bf16 autocast at the 350m widths.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

from tests.helpers.interpreter import run_interpreter_worker

INTERP_T = (1, 17, 63, 65, 130)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _compare(fn_a, fn_b, inputs, params, upstream, tol, label):
    """fn(*inputs) -> output, for two implementations sharing inputs and parameters: output and
    gradients w.r.t. inputs and params within relative L2 tol."""
    results = []
    for fn in (fn_a, fn_b):
        out = fn(*inputs)
        grads = torch.autograd.grad((out.double() * upstream.double()).sum(), [*inputs, *params])
        results.append((out, grads))
    (out_a, g_a), (out_b, g_b) = results
    errs = {"out": _rel(out_a, out_b), **{f"grad{i}": _rel(a, b) for i, (a, b) in enumerate(zip(g_a, g_b))}}
    assert out_a.dtype == out_b.dtype and out_a.shape == out_b.shape
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{label}: relative errors above {tol}: {bad} (all: {errs})"
    return errs


def _conv_case(batch, T, C, dtype, device, seed, strided):
    from sessa_scale.models.mamba2 import Mamba2Mixer

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mixer = Mamba2Mixer(C // 2, d_state=8, head_dim=8).to(device=device, dtype=dtype)
    x = torch.randn(batch, T, 2 * C if strided else C, generator=gen, dtype=torch.float64)
    x = x[..., :C] if strided else x  # strided: a slice of a wider tensor, as z / x of in_proj
    x = x.to(device=device, dtype=dtype).requires_grad_()
    up = torch.randn(batch, T, C, generator=gen, dtype=torch.float64).to(device)
    return mixer, x, up


def check_conv(batch, T, C, dtype, device, seed, tol, strided=False):
    from sessa_scale.models.mamba2 import causal_conv1d_silu_torch
    from sessa_scale.ops.mamba2_fused import causal_conv1d_silu

    mixer, x, up = _conv_case(batch, T, C, dtype, device, seed, strided)
    conv = mixer.conv_x
    return _compare(lambda v: causal_conv1d_silu(v, conv.weight.flatten(1).t(), conv.bias),
                    lambda v: causal_conv1d_silu_torch(v, conv.weight.flatten(1).t(), conv.bias),
                    [x], [conv.weight, conv.bias], up, tol, f"conv T={T} C={C} {dtype}")


def check_norm(batch, T, E, groups, dtype, device, seed, tol, strided=False):
    from sessa_scale.models.mamba2 import GatedRMSNorm

    gen = torch.Generator().manual_seed(seed)
    ref = GatedRMSNorm(E, group_size=E // groups, kernels="torch").to(device=device, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.1 * torch.randn(E, generator=gen, dtype=torch.float64))
    fused = GatedRMSNorm(E, group_size=E // groups, kernels="triton").to(device=device, dtype=dtype)
    fused.weight = ref.weight
    y = torch.randn(batch, T, E, generator=gen, dtype=torch.float64)
    z = torch.randn(batch, T, 2 * E if strided else E, generator=gen, dtype=torch.float64)
    z = z[..., E:] if strided else z
    y, z = (t.to(device=device, dtype=dtype).requires_grad_() for t in (y, z))
    up = torch.randn(batch, T, E, generator=gen, dtype=torch.float64).to(device)
    return _compare(fused, ref, [y, z], [ref.weight], up, tol, f"norm T={T} E={E} G={groups} {dtype}")


def check_dt(batch, T, H, dtype, device, seed, tol, strided=False):
    """dt = softplus(dt_raw + dt_bias), A = -exp(A_log): the fused op vs the PyTorch expressions,
    both outputs and the gradients of dt_raw, dt_bias and A_log; dt_raw spans both softplus
    branches (above 20 it passes through) and tiny softplus values (log1p)."""
    from sessa_scale.ops.mamba2_fused import dt_softplus_and_decay

    gen = torch.Generator().manual_seed(seed)
    raw = 12 * torch.randn(batch, T, 3 * H if strided else H, generator=gen, dtype=torch.float64)
    raw = raw[..., H : 2 * H] if strided else raw  # strided: a slice of the projection output, as in the mixer
    bias, A_log = torch.randn(H, generator=gen, dtype=torch.float64), torch.randn(H, generator=gen, dtype=torch.float64)
    raw, bias, A_log = (t.to(device=device, dtype=dtype).requires_grad_() for t in (raw, bias, A_log))
    up_dt = torch.randn(batch, T, H, generator=gen, dtype=torch.float64).to(device)
    up_A = torch.randn(H, generator=gen, dtype=torch.float64).to(device)
    results = []
    for fn in (dt_softplus_and_decay, lambda r, b, a: (torch.nn.functional.softplus(r + b), -torch.exp(a))):
        dt, A = fn(raw, bias, A_log)
        loss = (dt.double() * up_dt).sum() + (A.double() * up_A).sum()
        results.append((dt, A, *torch.autograd.grad(loss, [raw, bias, A_log])))
    names = ("dt", "A", "d_dt_raw", "d_dt_bias", "d_A_log")
    errs = {n: _rel(a, b) for n, a, b in zip(names, *results)}
    dt, ref = results[0][0].double(), results[1][0].double()
    errs["dt elementwise"] = ((dt - ref).abs() / ref)[ref > 1e-30].max().item()  # the tiny dt count too
    assert all(a.dtype == b.dtype and a.shape == b.shape for a, b in zip(*results))
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"dt T={T} H={H} {dtype}: relative errors above {tol}: {bad} (all: {errs})"
    return errs


def check_grads_into_joint(batch, T, dtype, device, seed, widths=(32, 40, 6)):
    """The three ops reading their blocks [z | conv input | raw dt] of one projection output (strided
    slices, row stride E + C + H) and writing their input gradients into those blocks' slots of one
    joint gradient (poisoned: an entry no kernel wrote stays NaN), as in the mixer: each gradient is
    its slice of the buffer (not a copy), bitwise equal to the op's gradient into a buffer of its own,
    and the projection's gradient is the buffer itself with every entry written."""
    from sessa_scale.ops.joint_gradient import split_with_joint_gradient
    from sessa_scale.ops.mamba2_fused import causal_conv1d_silu, dt_softplus_and_decay, gated_rmsnorm

    E, C, H = widths  # z (two norm groups), conv channels, heads
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, param=False):  # parameters in at least float32, as under autocast
        kind = torch.promote_types(dtype, torch.float32) if param else dtype
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=kind)

    joined, y = rand(batch, T, E + C + H), rand(batch, T, E)
    norm_w, taps, conv_b, dt_bias, A_log = (rand(*shape, param=True) for shape in ((E,), (4, C), (C,), (H,), (H,)))
    ups = [rand(batch, T, width) for width in (E, C, H)]
    ops = (lambda z, slot: gated_rmsnorm(y, z, norm_w, E // 2, 1e-5, slot),
           lambda x, slot: causal_conv1d_silu(x, taps, conv_b, slot),
           lambda raw, slot: dt_softplus_and_decay(raw, dt_bias, A_log, slot)[0])

    def loss(blocks, slots):
        return sum((op(block, slot).double() * up).sum() for op, block, slot, up in zip(ops, blocks, slots, ups))

    own = [block.detach().requires_grad_() for block in joined.split((E, C, H), dim=-1)]
    expected = torch.autograd.grad(loss(own, (None,) * 3), own)
    blocks, joint = split_with_joint_gradient(joined.detach().requires_grad_(), (E, C, H))
    grads = torch.autograd.grad(loss(blocks, [joint.slot(i) for i in range(3)]), blocks)
    for i, (grad, want) in enumerate(zip(grads, expected)):
        view = joint.buffer.narrow(-1, joint.offsets[i], joint.widths[i])
        assert (grad.data_ptr(), grad.stride()) == (view.data_ptr(), view.stride()), f"block {i} T={T}: not its slice"
        assert torch.equal(grad, want), f"block {i} T={T}: differs from the op's own buffer"
    assert torch.isfinite(joint.buffer).all(), f"T={T}: entries of the joint gradient no kernel wrote"
    leaf = joined.detach().requires_grad_()
    blocks, joint = split_with_joint_gradient(leaf, (E, C, H))
    (whole,) = torch.autograd.grad(loss(blocks, [joint.slot(i) for i in range(3)]), [leaf])
    assert torch.equal(whole, torch.cat(expected, dim=-1)) and joint.buffer is None, f"T={T}: projection gradient"


def check_block_joint_gradient_is_bitwise_the_plain_splits(T, device):
    """A Mamba-2 block under bf16 autocast (as training runs it) with the projection's joint gradient
    and with the plain split (its backward concatenating the three gradients): the same output, input
    gradient and parameter gradients, bit for bit (the same kernels write the same values elsewhere)."""
    from unittest import mock

    import sessa_scale.models.mamba2 as mamba2

    torch.manual_seed(T)
    block = mamba2.Mamba2Block(32, d_state=16, head_dim=16, n_groups=2, chunk_size=16, scan="triton",
                               kernels="triton").to(device)
    x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(T)).to(device=device, dtype=torch.bfloat16)
    results = []
    for plain in (False, True):
        x.grad = None
        block.zero_grad(set_to_none=True)
        force_plain = mock.patch.object(mamba2, "joint_projection", lambda u, linears: None)
        with force_plain if plain else contextlib.nullcontext():
            with torch.autocast(device, dtype=torch.bfloat16):
                out = block(x.requires_grad_())
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out))
        results.append({"out": out.detach(), "dx": x.grad, **{n: p.grad for n, p in block.named_parameters()}})
    differ = [k for k in results[0] if not torch.equal(results[0][k], results[1][k])]
    assert not differ, f"T={T}: the joint gradient changed {differ}"


def check_mixer(T, dtype, device, tol, seed=0):
    """The whole mixer: fused kernels + Triton scan vs the PyTorch paths + chunked scan; output and
    the gradients of the input and of every parameter."""
    from sessa_scale.models.mamba2 import Mamba2Mixer

    torch.manual_seed(seed)
    ref = Mamba2Mixer(32, d_state=16, head_dim=16, n_groups=2, chunk_size=16, scan="chunked", kernels="torch")
    fused = Mamba2Mixer(32, d_state=16, head_dim=16, n_groups=2, chunk_size=16, scan="triton", kernels="triton")
    fused.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(2, T, 32, generator=gen, dtype=torch.float64)
    up = torch.randn(2, T, 32, generator=gen, dtype=torch.float64).to(device)
    results = []
    for m in (fused, ref):
        m = m.to(device=device, dtype=dtype)
        x = u.to(device=device, dtype=dtype).requires_grad_()
        out = m(x)
        names, params = zip(*m.named_parameters())
        grads = torch.autograd.grad((out.double() * up).sum(), [x, *params])
        results.append({"out": out, "du": grads[0], **dict(zip(names, grads[1:]))})
    errs = {k: _rel(results[0][k], results[1][k]) for k in results[1]}
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"mixer T={T} {dtype}: relative errors above {tol}: {bad} (all: {errs})"
    return errs


# ----------------------------------------------------------------------------- CPU interpreter


def _interp_worker() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from sessa_scale.ops.work_buffers import poisoned_buffers

    with poisoned_buffers():  # every buffer the kernels write starts as NaN
        for i, T in enumerate(INTERP_T):  # float64 inputs and the norm (per row: T matters less) at some T only
            for dtype in (torch.float32, torch.float64) if T in (17, 130) else (torch.float32,):
                tol = 2e-6 if dtype == torch.float64 else 2e-5  # the kernels compute in float32
                check_conv(2 - i % 2, T, 72, dtype, "cpu", seed=T, tol=tol, strided=i % 2 == 0)
                check_dt(2 - i % 2, T, 6, dtype, "cpu", seed=T, tol=tol, strided=i % 2 == 1)
                if T <= 65:  # the slots' row strides: several row programs and conv runs by T = 65 (130: 35 s more)
                    check_grads_into_joint(2 - i % 2, T, dtype, "cpu", seed=T)
                if T <= 17:  # per row, so T matters only through rows per program (NORM_ROWS = 16): 17 x 2 rows
                    check_norm(2 - i % 2, T, 48, 1 + i % 2 * 2, dtype, "cpu", seed=T, tol=tol, strided=i % 2 == 1)
            print(f"ok T={T}", flush=True)
        # sequences shorter than the conv width; T = 14: a forward tile (8 tokens, runs of 16) starts 2
        # tokens into the second sequence, the last position that still needs the boundary masks
        for batch, T, strided in ((5, 3, False), (3, 2, True), (3, 14, True)):
            check_conv(batch, T, 24, torch.float32, "cpu", seed=T, tol=2e-5, strided=strided)
        print("ok conv short sequences", flush=True)
        check_block_joint_gradient_is_bitwise_the_plain_splits(37, "cpu")
        errs = check_mixer(37, torch.float64, "cpu", tol=2e-6)
        print("ok mixer " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)


def test_interpreter_against_the_torch_paths():
    pytest.importorskip("triton")
    out = run_interpreter_worker(__file__)
    assert out.count("ok ") == len(INTERP_T) + 2, out


def test_kernels_knob_is_validated_and_torch_off_cuda():
    from sessa_scale.models.mamba2 import use_triton_kernels

    cpu = torch.zeros(1)
    assert not use_triton_kernels("auto", cpu) and not use_triton_kernels("torch", cpu)
    assert use_triton_kernels("triton", cpu)
    with pytest.raises(ValueError, match="unknown mixer kernels 'fast'"):
        use_triton_kernels("fast", cpu)


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 17, 130, 2049])
def test_gpu_fp32_against_the_torch_paths(T):
    check_conv(2, T, 2304, torch.float32, "cuda", seed=T, tol=1e-5, strided=True)
    check_dt(2, T, 32, torch.float32, "cuda", seed=T, tol=1e-5, strided=True)
    check_norm(2, T, 2048, 1, torch.float32, "cuda", seed=T, tol=1e-5, strided=True)
    check_norm(2, T, 2048, 4, torch.float32, "cuda", seed=T, tol=1e-5)


@gpu
@needs_cuda
@pytest.mark.parametrize("batch,T", [(300, 3), (7, 14), (3, 700)])
def test_gpu_conv_runs_across_sequences(batch, T):
    """The conv's runs of flattened tokens on the GPU's run lengths: many sequences per run, shorter
    than the width or a few tiles long, and runs ending inside sequences."""
    check_conv(batch, T, 2304, torch.float32, "cuda", seed=T, tol=1e-5, strided=True)


@gpu
@needs_cuda
def test_gpu_bf16_against_the_torch_paths():
    """bf16 inputs: ours computes in float32 from the bf16 values (the PyTorch conv in bf16 with a
    bf16 copy of the weights), so both sides differ by bf16 rounding."""
    check_conv(4, 2048, 2304, torch.bfloat16, "cuda", seed=1, tol=2e-2)
    check_norm(4, 2048, 2048, 1, torch.bfloat16, "cuda", seed=1, tol=2e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 17, 2049])
def test_gpu_grads_into_one_joint_gradient(T, dtype):
    """The 350m widths (z 2048, [x | B | C] 2304, dt 32; row stride 4384), the GPU's conv run lengths."""
    check_grads_into_joint(2, T, dtype, "cuda", seed=T, widths=(2048, 2304, 32))


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [17, 2049])
def test_gpu_block_joint_gradient_is_bitwise_the_plain_splits(T):
    check_block_joint_gradient_is_bitwise_the_plain_splits(T, "cuda")


@gpu
@needs_cuda
def test_gpu_mixer_fused_matches_torch():
    errs = check_mixer(1000, torch.float32, "cuda", tol=1e-4)
    print(errs)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "--interp-worker":
        _interp_worker()
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --interp-worker")
