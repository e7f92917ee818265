"""Tests of the Triton SSD scan (kernels/ssd.py via sessa_scale/ops/ssd_triton.py) against the
float64 sequential recurrence (sessa_scale/ops/ssd_reference.py).

CPU (CI): every kernel runs under TRITON_INTERPRET=1 in float32 and float64, at T in
{1, 17, 63, 65, 130}, forward and every input gradient, with the kernels' outputs and work
buffers poisoned with NaN so that unwritten tiles fail; shapes cover several N-, P- and state
tiles (dx's P-tile also apart from the output's), B/C groups, head splits, strided
(non-contiguous) inputs, an initial state, and losses on y alone, on the final state alone, and
on both. TRITON_INTERPRET must be set before the kernels are decorated, so those checks run in a
fresh subprocess (this file with ``--interp-worker DTYPE``).

GPU (``-m gpu``): fp32 and bf16 against the float64 recurrence within the tolerances below,
awkward T, dx_kernel's sweep points, determinism, the model's layouts, decoding after a prefill,
and a cross-check against fla-core's simple GLA where fla does not flag its backward as wrong
(Triton >= 3.7.1 on Hopper).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.helpers.interpreter import run_interpreter_worker

# (T, batch, H, G, P, N, chunk, initial state, skip D, loss on): P = 20 and N = 24 span two 16-wide tiles.
INTERP_CASES = (
    (1, 2, 4, 2, 20, 24, 16, True, True, "both"),
    (17, 1, 4, 1, 16, 16, 16, False, False, "y"),
    (63, 1, 2, 2, 20, 24, 32, True, True, "both"),
    (65, 2, 2, 1, 16, 32, 16, True, False, "final"),
    (130, 1, 2, 1, 20, 24, 32, True, True, "both"),
)
INTERP_TOL = {"float32": 2e-5, "float64": 1e-12}
NAMES = ("y", "final", "dx", "ddt", "dA", "dB", "dC", "dh0", "dD")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against b (inf where a is not finite)."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(batch, T, H, G, P, N, dtype, device, seed, state=True, strided=False, skip=True):
    """x, dt, A, B, C, h0, D (leaves requiring grad; h0 / D None without a state / skip) and upstream
    gradients for y and the final state. strided: x, B and C are non-contiguous views (x with T
    innermost, as PyTorch's depthwise conv leaves it)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x, B, C = rand(batch, T, H, P), rand(batch, T, G, N), rand(batch, T, G, N)
    dt = torch.nn.functional.softplus(rand(batch, T, H) - 1.0)
    A = -torch.rand(H, generator=gen, dtype=torch.float64) * 2 - 0.1
    h0 = rand(batch, H, N, P) if state else None
    D = rand(H) if skip else None
    gy, gh = rand(batch, T, H, P), rand(batch, H, N, P)

    def leaf(t, layout=None):
        if t is None:
            return None
        t = t.to(device=device, dtype=dtype)
        if strided and layout == "t_inner":  # storage (B, H, P, T), viewed as (B, T, H, P)
            t = t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        elif strided and layout == "wide":  # a slice of a wider last dim
            t = torch.cat([t, torch.zeros_like(t)], dim=-1)[..., : t.shape[-1]]
        return t.requires_grad_()

    args = [leaf(x, "t_inner"), leaf(dt), leaf(A), leaf(B, "wide"), leaf(C, "wide"), leaf(h0), leaf(D)]
    return args, gy.to(device=device, dtype=dtype), gh.to(device=device, dtype=dtype)


def _sequential(x, dt, A, B, C, h0, D):
    from sessa_scale.ops.ssd_reference import ssd_sequential

    y, h = ssd_sequential(x, dt, A, B, C, h0)
    return (y if D is None else y + x * D[:, None]), h


def _check(impl, batch, T, H, G, P, N, dtype, device, seed, tols, state=True, loss_on="both", strided=False,
           skip=True):
    """impl(x, dt, A, B, C, h0, D) -> (y, final) against the float64 sequential recurrence on the
    same (rounded) inputs: forward and gradients. tols: {name: max relative L2 error} (default "*")."""
    args, gy, gh = _inputs(batch, T, H, G, P, N, dtype, device, seed, state, strided, skip)
    ref_args = [None if a is None else a.detach().double().requires_grad_() for a in args]
    (y, h, grads), (y_ref, h_ref, grads_ref) = (_outputs(fn, ins, gy, gh, loss_on)
                                                for fn, ins in ((impl, args), (_sequential, ref_args)))
    assert y.dtype == dtype and y.shape == (batch, T, H, P) and h.shape == (batch, H, N, P)
    errs = {"y": _rel(y, y_ref), "final": _rel(h, h_ref)}
    names = [n for n, a in zip(NAMES[2:], args) if a is not None]
    errs.update({n: _rel(a, b) for n, a, b in zip(names, grads, grads_ref)})
    bad = {n: e for n, e in errs.items() if not e <= tols.get(n, tols["*"])}
    shape = f"B={batch} T={T} H={H} G={G} P={P} N={N} {dtype} state={state} skip={skip} loss={loss_on}"
    assert not bad, f"{shape}: relative errors above tolerance {bad} (all: {errs})"
    return errs


def _outputs(impl, args, gy, gh, loss_on="both"):
    """y, the final state and the gradients of the loss on them (gy, gh: its weights) with respect to
    the args that are not None."""
    y, h = impl(*args)
    loss = {"y": (y.double() * gy.double()).sum(), "final": (h.double() * gh.double()).sum()}
    total = loss["y"] + loss["final"] if loss_on == "both" else loss[loss_on]
    leaves = [a for a in args if a is not None]
    return y, h, torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)


# ----------------------------------------------------------------------------- CPU interpreter


def _interp_worker(dtype_name: str, state_schedule: str = "") -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1 (set before any triton import). With
    state_schedule: INTERP_CASES on that SSDConfig.state_schedule alone."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from sessa_scale.ops.ssd import ssd_scan
    from sessa_scale.ops.work_buffers import poisoned_buffers

    with poisoned_buffers():  # every buffer the kernels write starts as NaN
        dtype = getattr(torch, dtype_name)
        tols = {"*": INTERP_TOL[dtype_name]}
        if state_schedule:
            for T, batch, H, G, P, N, chunk, state, skip, loss_on in INTERP_CASES:
                errs = _check(_tiles(chunk, state_schedule=state_schedule), batch, T, H, G, P, N, dtype, "cpu",
                              seed=100 + T, tols=tols, state=state, loss_on=loss_on, skip=skip)
                print(f"ok {state_schedule} {dtype_name} T={T} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()),
                      flush=True)
            return
        for i, (T, batch, H, G, P, N, chunk, state, skip, loss_on) in enumerate(INTERP_CASES):

            def public(x, dt, A, B, C, h0, D, chunk=chunk):
                return ssd_scan(x, dt, A, B, C, initial_state=h0, chunk_size=chunk, impl="triton", D=D)

            errs = _check(public, batch, T, H, G, P, N, dtype, "cpu", seed=100 + T, tols=tols, state=state,
                          loss_on=loss_on, strided=i % 2 == 0, skip=skip)
            print(f"ok {dtype_name} T={T} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
            if T in (17, 63):  # packed [x | B | C], one head split: dB and dC written into slices of its gradient
                errs = _check(_packed(chunk, head_split=1), batch, T, H, G, P, N, dtype, "cpu", seed=200 + T,
                              tols=tols, state=state, loss_on=loss_on, skip=skip)
                print(f"ok packed {dtype_name} T={T} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
            if T == 63:  # dx_kernel's P-tile apart from out_fwd's: one dx tile (32 lanes, 12 masked) against two
                errs = _check(_tiles(chunk, BP=16, BP_DX=32), batch, T, H, G, P, N, dtype, "cpu", seed=300 + T,
                              tols=tols, state=state, loss_on=loss_on, skip=skip)
                print(f"ok dx tile {dtype_name} T={T} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)


def _tiles(chunk: int, **tiles):
    """The scan with INTERPRET_CONFIG's tiles replaced by `tiles` (ssd_scan_triton), as _check calls it."""
    from dataclasses import replace

    from sessa_scale.ops.ssd_triton import INTERPRET_CONFIG, ssd_scan_triton

    def scan(x, dt, A, B, C, h0, D):
        return ssd_scan_triton(x, dt, A, B, C, h0, chunk, replace(INTERPRET_CONFIG, **tiles), D)

    return scan


def _packed(chunk: int, head_split: int):
    """The scan on [x | B | C] packed into one tensor (ssd_scan_triton_packed), as _check calls it."""
    from dataclasses import replace

    from sessa_scale.ops.ssd_triton import INTERPRET_CONFIG, ssd_scan_triton_packed

    def scan(x, dt, A, B, C, h0, D):
        xbc = torch.cat([x.flatten(-2), B.flatten(-2), C.flatten(-2)], dim=-1)
        config = replace(INTERPRET_CONFIG, head_split=head_split)
        return ssd_scan_triton_packed(xbc, dt, A, x.shape[-1], B.shape[-1], h0, chunk, config, D)

    return scan


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_interpreter_against_the_recurrence(dtype):
    pytest.importorskip("triton")
    out = run_interpreter_worker(__file__, dtype)
    assert out.count("ok ") == len(INTERP_CASES) + 3, out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_interpreter_split_state_schedule_against_the_recurrence(dtype):
    """The split state schedule (chunk_local_state_kernel + state_pass_kernel) on every INTERP_CASES
    shape: forward pass (initial state: HAS_START; final state: WRITE_END) and backward pass (dfinal:
    HAS_START; dh0: WRITE_END), 2-chunk pass steps over 1-5 chunks, two pass blocks (N * P = 480 >
    256) and 2 x 2 local tiles, NaN-poisoned buffers."""
    pytest.importorskip("triton")
    out = run_interpreter_worker(__file__, dtype, "split")
    assert out.count("ok split ") == len(INTERP_CASES), out


def test_plan_state_schedule(monkeypatch, request):
    """auto splits exactly where fused would halve its state tile (350m heads on 132 SMs: B * H = 64
    pairs at T = 8192, 256 at T = 2048); fused / split are taken as given; other values are named."""
    pytest.importorskip("triton")
    import sessa_scale.ops.ssd_triton as st

    monkeypatch.setattr(st, "INTERPRET", False)
    monkeypatch.setattr(st, "sm_count", lambda index: 132)
    request.addfinalizer(st._plan_for.cache_clear)  # no plan made under the stubs outlives the test
    cuda, dtypes = torch.device("cuda", 0), (torch.bfloat16,) * 4

    def plan(batch, T, schedule):
        return st._plan_for((batch, T, 32, 64), (batch, T, 1, 128), dtypes, cuda, 64,
                            st.SSDConfig(state_schedule=schedule))

    assert [plan(b, T, "auto").split for b, T in ((2, 8192), (8, 2048))] == [True, False]
    assert [(pl.BN_S, pl.BP_S) for pl in (plan(2, 8192, "auto"), plan(8, 2048, "auto"))] == [(32, 32), (64, 64)]
    assert not plan(2, 8192, "fused").split and plan(8, 2048, "split").split
    assert plan(2, 8192, "split").local_grid == (128 * 1 * 1, 64) and plan(2, 8192, "split").pass_grid == (16, 64)
    with pytest.raises(ValueError, match="'fast' is not one of fused, split, auto"):
        plan(2, 8192, "fast")


def test_dispatch_picks_triton_on_cuda_and_refuses_cpu_tensors_outside_the_interpreter():
    pytest.importorskip("triton")
    from sessa_scale.ops.ssd import resolve_ssd_impl, ssd_scan

    assert resolve_ssd_impl("auto", torch.device("cuda")) == "triton"
    assert resolve_ssd_impl("auto", torch.device("cpu")) == "chunked"
    assert resolve_ssd_impl("triton", torch.device("cpu")) == "triton"
    if os.environ.get("TRITON_INTERPRET") != "1":
        (x, dt, A, B, C, _, _), _, _ = _inputs(1, 5, 2, 1, 4, 4, torch.float32, "cpu", seed=0, state=False)
        with pytest.raises(ValueError, match="runs on CUDA tensors"):
            ssd_scan(x, dt, A, B, C, impl="triton")


def test_config_from_env_overrides_fields_and_names_unknown_ones(monkeypatch):
    pytest.importorskip("triton")
    from sessa_scale.ops.ssd_triton import SSDConfig, config_from_env

    monkeypatch.setenv("SESSA_SSD_CFG", "BN_DBC=32,prec_fp32=ieee")
    assert config_from_env(SSDConfig()) == SSDConfig(BN_DBC=32, prec_fp32="ieee")
    monkeypatch.setenv("SESSA_SSD_CFG", "BN_DBC=32,tile=3")
    with pytest.raises(ValueError, match="unknown fields \\['tile'\\]"):
        config_from_env(SSDConfig())


def test_bench_ssd_reports_every_point_and_exits_1_when_one_fails(monkeypatch, tmp_path):
    """`bench ssd` plumbing on CPU with the timer stubbed: the chunked scan and the convs are measured,
    fla is marked n/a, and the triton scan (CPU tensors outside the interpreter) shows FAILED with its
    error, with exit status 1."""
    pytest.importorskip("triton")
    import triton.testing

    import sessa_scale.bench.ssd as bench

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the triton row must fail here: run outside the interpreter")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stub")
    monkeypatch.setattr(bench, "cuda_peak_bytes", lambda fn, warm=False: (fn(), 3 * 2**20)[1])
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, rep, return_mode: (fn(), 1.5)[1])
    monkeypatch.setattr(bench, "available_impls", lambda: {"triton": "", "chunked": "", "fla": "not here",
                                                           "sdpa_flash": "", "conv": ""})
    out = tmp_path / "ssd.md"
    rc = bench.main(["--size", "125m", "--seq-lens", "16", "--batch-tokens", "32", "--impls",
                     "chunked,triton@32,fla,conv", "--out", str(out)])
    table = out.read_text()
    assert rc == 1
    assert "| 16 | 2 | chunked | 1.500 | 1.500 | 1.00 | 3 |  |" in table
    assert "| 16 | 2 | conv | 1.500 | 1.500 | 1.00 | 3 |  |" in table
    assert "| 16 | 2 | triton@32 | FAILED: ValueError: the triton SSD scan runs on CUDA tensors" in table
    assert "| 16 | 2 | fla | n/a (not here) |" in table


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Stated tolerances (relative L2 error vs the float64 recurrence on the same rounded inputs).
# float32: tf32x3 products (SSDConfig.prec_fp32), fp32 everywhere else.
FP32_TOL = {"*": 1e-4}
# bf16: x, B, C, dy are the bf16 inputs; the kernels round the decay-weighted scores, B and C
# scaled by decays, and the chunk states to bf16 for the tensor-core products (fp32 accumulation).
BF16_TOL = {"*": 2e-2}


def _triton(chunk=64):
    from sessa_scale.ops.ssd_triton import ssd_scan_triton

    return lambda x, dt, A, B, C, h0, D: ssd_scan_triton(x, dt, A, B, C, h0, chunk_size=chunk, D=D)


def _report(errs, label):
    print(f"{label}: " + " ".join(f"{n}={e:.2e}" for n, e in errs.items()))


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 17, 63, 65, 130, 1000, 2049])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_against_the_recurrence(T, dtype):
    """Mamba-2 350m head shapes (P = 64, N = 128), 4 heads in 2 groups, initial state, strided x."""
    torch_dtype = getattr(torch, dtype)
    tols = FP32_TOL if dtype == "float32" else BF16_TOL
    errs = _check(_triton(), 2, T, 4, 2, 64, 128, torch_dtype, "cuda", seed=T, tols=tols, strided=True)
    _report(errs, f"{dtype} T={T}")


@gpu
@needs_cuda
@pytest.mark.parametrize("chunk,P,N,G", [(128, 64, 128, 1), (256, 64, 128, 1), (64, 32, 64, 4), (32, 80, 48, 1)])
def test_gpu_chunk_sizes_and_widths(chunk, P, N, G):
    """Other chunk sizes (128 and 256 run as 64), ragged P and N tiles, 4 groups of one head each (bf16)."""
    errs = _check(_triton(chunk), 1, 777, 4, G, P, N, torch.bfloat16, "cuda", seed=chunk, tols=BF16_TOL)
    _report(errs, f"chunk={chunk} P={P} N={N} G={G}")


@gpu
@needs_cuda
@pytest.mark.parametrize("dx_tiles", [{"BP_DX": 32}, {"maxnreg_dx": 0}], ids=["BP_DX=32", "maxnreg_dx=0"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_dx_kernel_sweep_points(dx_tiles, dtype):
    """dx_kernel's other sweep points (two P-tiles; no register cap) compile and match the recurrence."""
    from dataclasses import replace

    from sessa_scale.ops.ssd_triton import DEFAULT_CONFIG, ssd_scan_triton

    config = replace(DEFAULT_CONFIG, **dx_tiles)

    def scan(x, dt, A, B, C, h0, D):
        return ssd_scan_triton(x, dt, A, B, C, h0, 64, config, D)

    errs = _check(scan, 2, 130, 4, 2, 64, 128, getattr(torch, dtype), "cuda", seed=11,
                  tols=FP32_TOL if dtype == "float32" else BF16_TOL, strided=True)
    _report(errs, f"{dx_tiles} {dtype}")


@gpu
@needs_cuda
@pytest.mark.parametrize("T,batch,H", [(2049, 2, 4), (8192, 1, 2)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_split_state_schedule_matches_fused(T, batch, H, dtype):
    """state_schedule=split against fused on the same inputs (350m head shapes; at T = 8192 one pair
    of heads: fused halves its state tile), and at T = 2049 against the recurrence. float32: the same
    operations; bf16: split rounds each chunk's term to bf16 once before the fp32 recursion."""
    from dataclasses import replace

    from sessa_scale.ops.ssd_triton import DEFAULT_CONFIG, ssd_scan_triton

    def schedule(name):
        config = replace(DEFAULT_CONFIG, state_schedule=name)
        return lambda x, dt, A, B, C, h0, D: ssd_scan_triton(x, dt, A, B, C, h0, 64, config, D)

    torch_dtype, tols = getattr(torch, dtype), FP32_TOL if dtype == "float32" else BF16_TOL
    if T < 8192:
        _report(_check(schedule("split"), batch, T, H, 2, 64, 128, torch_dtype, "cuda", seed=T, tols=tols,
                       strided=True), f"split {dtype} T={T} vs recurrence")
    args, gy, gh = _inputs(batch, T, H, 2, 64, 128, torch_dtype, "cuda", seed=T + 1)
    split, fused = (_outputs(schedule(name), args, gy, gh) for name in ("split", "fused"))
    names = [n for n, a in zip(NAMES, [1, 1, *args]) if a is not None]
    errs = dict(zip(names, (_rel(a, b) for a, b in zip([*split[:2], *split[2]], [*fused[:2], *fused[2]]))))
    _report(errs, f"split vs fused {dtype} T={T}")
    assert all(e < (1e-5 if dtype == "float32" else 1e-2) for e in errs.values()), errs


@gpu
@needs_cuda
@pytest.mark.parametrize("loss_on", ["y", "final"])
def test_gpu_one_output_used(loss_on):
    errs = _check(_triton(), 2, 300, 4, 1, 64, 128, torch.float32, "cuda", seed=3, tols=FP32_TOL, loss_on=loss_on)
    _report(errs, f"loss on {loss_on}")


@gpu
@needs_cuda
def test_gpu_deterministic_and_auto():
    from sessa_scale.ops.ssd import resolve_ssd_impl, ssd_scan

    assert resolve_ssd_impl("auto", torch.device("cuda")) == "triton"
    args, gy, gh = _inputs(2, 3000, 32, 1, 64, 128, torch.bfloat16, "cuda", seed=5)
    leaves = [a for a in args if a is not None]
    outs = []
    for _ in range(2):
        y, h = ssd_scan(*args[:5], initial_state=args[5], D=args[6])
        outs.append([y, h, *torch.autograd.grad((y * gy).sum() + (h * gh).sum(), leaves)])
    for name, a, b in zip(NAMES, *outs):
        assert torch.equal(a, b), f"{name} differs between two identical calls"


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 17, 130, 1000])
def test_gpu_mamba2_mixer_triton_matches_chunked_and_decodes(T):
    """The model's call site (bf16 autocast): the mixer's output and parameter gradients with the
    Triton scan and fused conv/norm ("auto" on CUDA) vs the PyTorch chunked scan and PyTorch conv/norm,
    then prefill + decode steps against the full forward."""
    from sessa_scale.models.mamba2 import Mamba2Mixer

    torch.manual_seed(0)
    ref = Mamba2Mixer(256, d_state=128, head_dim=64, scan="chunked", kernels="torch").cuda()
    tri = Mamba2Mixer(256, d_state=128, head_dim=64, scan="triton").cuda()
    tri.load_state_dict(ref.state_dict())
    u = torch.randn(2, T, 256, device="cuda")
    grads = []
    for m in (ref, tri):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(u)
        out.float().square().mean().backward()
        grads.append((out.float(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (o_ref, g_ref), (o_tri, g_tri) = grads
    assert _rel(o_tri, o_ref) < 2e-2, _rel(o_tri, o_ref)
    for name in g_ref:
        assert _rel(g_tri[name], g_ref[name]) < 5e-2, (name, _rel(g_tri[name], g_ref[name]))
    with torch.no_grad():
        full = tri(u)
        cut = max(1, T - 3)
        cache = tri.init_cache(2)
        pre, cache = tri.prefill(u[:, :cut], cache)
        steps = [tri.decode_step(u[:, t], cache)[0] for t in range(cut, T)]
        stitched = torch.cat([pre, *(s[:, None] for s in steps)], dim=1)
    assert _rel(stitched, full) < 1e-4


@gpu
@needs_cuda
def test_gpu_against_fla():
    from sessa_scale.ops.ssd import fla_available, simple_gla_backward_is_broken, ssd_scan

    if not fla_available():
        pytest.skip("fla-core not installed")
    if simple_gla_backward_is_broken():
        pytest.skip("fla flags its simple-GLA backward as wrong here (Hopper + Triton < 3.7.1)")
    args, gy, gh = _inputs(2, 1500, 8, 1, 64, 128, torch.bfloat16, "cuda", seed=9, skip=False)
    leaves = [a for a in args if a is not None]
    outs = []
    for impl in ("triton", "fla"):
        y, h = ssd_scan(*args[:5], initial_state=args[5], impl=impl)
        outs.append([y, h, *torch.autograd.grad((y * gy).sum() + (h.to(gh.dtype) * gh).sum(), leaves)])
    errs = {n: _rel(a, b) for n, a, b in zip(NAMES, *outs)}
    _report(errs, "triton vs fla")
    assert all(e < 3 * BF16_TOL["*"] for e in errs.values()), errs


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--interp-worker":
        _interp_worker(*sys.argv[2:])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --interp-worker float32|float64 [fused|split|auto]")
