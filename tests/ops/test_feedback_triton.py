"""Tests of the Triton feedback solve (kernels/feedback.py via sessa_scale/ops/feedback_triton.py).

CPU (CI): every kernel of both paths runs under TRITON_INTERPRET=1 in float32 and float64 against
the dense oracle, at T in {1, 15, 16, 17, 63, 65, 130}, forward and backward, with work buffers and
gradient outputs poisoned with NaN so unwritten tiles fail.  TRITON_INTERPRET must be set
before the kernels are decorated, so those checks run in a fresh subprocess (this file with
``--interp-worker DTYPE``), robust to whatever else this pytest session imported.

GPU (``-m gpu``): both paths (fused, GEMM) in fp32 vs dense to 1e-5 relative, bf16 within stated
tolerances, gradients likewise, large head widths, determinism, CUDA-graph replays, memory
bounds, and a cross-check against fla-core's DeltaFormer.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import replace

import pytest
import torch

from tests.helpers.interpreter import run_interpreter_worker

INTERP_T = (1, 15, 16, 17, 63, 65, 130)
INTERP_TOL = {"float32": 2e-5, "float64": 1e-12}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item() if b.norm() > 0 else (a - b).abs().max().item()


def _inputs(B, T, H, Dk, Dv, dtype, device, seed, gamma_max=0.999):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64)
    g = gamma_max * torch.tanh(torch.randn(B, T, H, generator=gen, dtype=torch.float64) + 1.0)
    f = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64)
    ds = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return [to(t).requires_grad_() for t in (q, k, g, f)], to(ds)


def _check_against_dense(impl, B, T, H, Dk, Dv, dtype, device, seed, tol_s, tol_g, scale=None):
    from sessa_scale.ops.feedback_reference import feedback_solve_dense

    (q, k, g, f), ds = _inputs(B, T, H, Dk, Dv, dtype, device, seed)
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    s = impl(q, k, g, f, scale)
    grads = torch.autograd.grad(s, (q, k, g, f), ds)
    # Oracle in float64 on the same (rounded) inputs.
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, g, f)]
    s_ref = feedback_solve_dense(*ref_in, scale)
    grads_ref = torch.autograd.grad(s_ref, ref_in, ds.double())
    errs = {"s": _rel(s, s_ref)}
    errs.update({n: _rel(a, b) for n, a, b in zip(("dq", "dk", "dgamma", "df"), grads, grads_ref)})
    bad = {n: e for n, e in errs.items() if not e <= (tol_s if n == "s" else tol_g)}
    assert not bad, f"B={B} T={T} H={H} Dk={Dk} Dv={Dv} {dtype}: errors {errs}"
    return errs


# ----------------------------------------------------------------------------- CPU interpreter

# Work done per dtype in the interpreter: the fused path at every T, the GEMM path at some (its
# epilogues and cuBLAS products do not depend on the leaf layout the odd lengths exercise).
INTERP_GEMM_T = {"float64": INTERP_T, "float32": (17, 130)}
INTERP_FUSED_T = {"float64": INTERP_T, "float32": (17, 130)}


def _interp_worker(dtype_name: str) -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1 (set before any triton import)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import sessa_scale.ops.feedback_triton as ft
    from sessa_scale.ops.feedback_solve import FEEDBACK_SOLVE_IMPLS, feedback_solve

    assert "triton" in FEEDBACK_SOLVE_IMPLS, "triton impl not registered under TRITON_INTERPRET=1"
    from sessa_scale.ops.work_buffers import poisoned_buffers

    with poisoned_buffers():  # work buffers and gradient outputs start as NaN
        dtype = getattr(torch, dtype_name)
        tol = INTERP_TOL[dtype_name]

        def public(q, k, g, f, scale):
            return feedback_solve(q, k, g, f, scale=scale, impl="triton")

        def with_config(**fields):
            cfg = replace(ft.INTERPRET_CONFIG, **fields)
            return lambda *a: ft.feedback_solve_triton(*a, config=cfg)

        for i, T in enumerate(INTERP_T):
            B, H = (1, 2) if i % 2 == 0 else (2, 1)
            # Dk = 24, Dv = 40 with 16-wide row tiles: ragged head rows, several leaves, ragged last leaf.
            for path, impl, Ts in (("fused", public, INTERP_FUSED_T), ("gemm", with_config(gemm=1), INTERP_GEMM_T)):
                if T in Ts[dtype_name]:
                    errs = _check_against_dense(impl, B, T, H, 24, 40, dtype, "cpu", seed=100 + T, tol_s=tol, tol_g=tol)
                    print(f"ok {dtype_name} {path} T={T} B={B} H={H} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()),
                          flush=True)
        # Small widths, a non-default scale, both paths; the fused backward with one dk pass over all pairs.
        for path, fields in (("fused", {}), ("gemm", {"gemm": 1})):
            _check_against_dense(with_config(**fields), 1, 33, 1, 16, 16, dtype, "cpu", seed=7, tol_s=tol, tol_g=tol,
                                 scale=0.3)
            print(f"ok {dtype_name} {path} Dk=Dv=16 scale=0.3", flush=True)
        _check_against_dense(with_config(fuse_dk=0), 2, 70, 1, 24, 40, dtype, "cpu", seed=8, tol_s=tol, tol_g=tol)
        print(f"ok {dtype_name} fused fuse_dk=0", flush=True)
        # The backward recomputing the leaf inverses (the default keeps the forward's: NaN-poisoned
        # buffers show one the forward did not write or that changed before the backward read it).
        for path, fields in (("fused", {}), ("gemm", {"gemm": 1})):
            _check_against_dense(with_config(keep_leaf_inverses=0, **fields), 2, 70, 1, 24, 40, dtype, "cpu", seed=10,
                                 tol_s=tol, tol_g=tol)
            print(f"ok {dtype_name} {path} keep_leaf_inverses=0", flush=True)

        # The GEMM path's TMA reads where it must copy (feedback_gemm.tma_slab): q, k as views whose
        # batches are not T rows apart, and an odd value width (Lam's and S's rows not 16-byte aligned).
        def gemm_on_strided_views(q, k, g, f, scale):
            q, k = (torch.cat([x, x[:, :3]], 1)[:, :x.shape[1]] for x in (q, k))
            return with_config(gemm=1)(q, k, g, f, scale)

        _check_against_dense(gemm_on_strided_views, 2, 33, 1, 24, 19, dtype, "cpu", seed=9, tol_s=tol, tol_g=tol)
        print(f"ok {dtype_name} gemm odd widths, strided q and k", flush=True)
        # gamma*P of the smaller blocks in the small tiles (probs_tiles), of the others in the large ones.
        # (fp32 / fp64 halve the key tiles: 32 x 32 large, 16 x 16 small; 32-row blocks are small, 64-row ones not)
        small_tiles = with_config(gemm=1, LOGIT_BM=32, LOGIT_BN=64, DS_BN=32, SMALL_BN=32, SMALL_GRID=5)
        _check_against_dense(small_tiles, 2, 130, 1, 24, 40, dtype, "cpu", seed=11, tol_s=tol, tol_g=tol)
        print(f"ok {dtype_name} gemm small gamma*P tiles", flush=True)
        # The backward with bands of one leaf at one head: every apply forms dS with gamma*P in the chain, and
        # the leaves' dS goes in one batched launch (four bands of 32 rows, then the last 2 rows on their own).
        _check_against_dense(with_config(gemm=1, bwd_band=32), 1, 130, 1, 24, 40, dtype, "cpu", seed=12, tol_s=tol,
                             tol_g=tol)
        print(f"ok {dtype_name} gemm bands of one leaf", flush=True)
        # The same with Dk == Dv: dS's two logit products in one loop (ds_kernel ONE_LOOP), between bands and batched.
        _check_against_dense(with_config(gemm=1, bwd_band=32), 1, 130, 1, 24, 24, dtype, "cpu", seed=13, tol_s=tol,
                             tol_g=tol)
        print(f"ok {dtype_name} gemm one-loop dS across bands", flush=True)
        # Leaves of 16 rows at T = 130: the pairs of leaves (starts 0, 32, 64) formed before the chain in one
        # batched launch, by both passes (inside the backward's bands of 64 rows), at two batches.
        _check_against_dense(with_config(gemm=1, L_gemm=16, bwd_band=64), 2, 130, 1, 24, 40, dtype, "cpu", seed=14,
                             tol_s=tol, tol_g=tol)
        print(f"ok {dtype_name} gemm leaf pairs batched", flush=True)
        # P kept from the forward for the backward's applies between bands (kept_probs_plan): the default keeps
        # every such block at these sizes (the cases above); none kept; a plan that keeps some (at B = 32, fp64:
        # every block between the one-leaf bands but the largest, rows [64, 130) x keys [0, 64): 1.03 MiB).
        _check_against_dense(with_config(gemm=1, bwd_band=32, keep_probs_mib=0), 2, 130, 1, 24, 40, dtype, "cpu",
                             seed=15, tol_s=tol, tol_g=tol)
        print(f"ok {dtype_name} gemm nothing kept", flush=True)
        if dtype_name == "float64":
            from sessa_scale.ops.feedback_gemm import kept_probs_plan

            some = replace(ft.INTERPRET_CONFIG, gemm=1, bwd_band=32, keep_probs_mib=1)
            kept = [blk for blk, _ in kept_probs_plan(32, 130, 8, ft._fit(some, 130, 16, 16, 8))]
            assert kept == [(96, 130, 64, 96), (32, 64, 0, 32), (128, 130, 96, 128)], kept
            _check_against_dense(lambda *a: ft.feedback_solve_triton(*a, config=some), 32, 130, 1, 16, 16, dtype,
                                 "cpu", seed=16, tol_s=tol, tol_g=tol)
            print(f"ok {dtype_name} gemm some blocks kept", flush=True)
        # widen (the accumulators X / Y from f / ds): half into ACC, into the GEMM path's head-major layout
        # (a transposed view) and the fused path's, with whole-row tiles and with column steps narrower than Dv.
        from sessa_scale.ops import feedback_leaves as fl

        src = torch.randn(2, 130, 3, 40, dtype=torch.float64).to(torch.float16)
        for max_bv in (fl.ROW_TILE_MAX_BV, 16):
            fl.ROW_TILE_MAX_BV, saved = max_bv, fl.ROW_TILE_MAX_BV
            try:
                head_major = torch.full((2, 3, 130, 40), float("nan"), dtype=dtype)
                fused = torch.full((2, 130, 3, 40), float("nan"), dtype=dtype)
                fl.widen(head_major.transpose(1, 2), src)
                fl.widen(fused, src)
            finally:
                fl.ROW_TILE_MAX_BV = saved
            assert torch.equal(head_major.transpose(1, 2), src.to(dtype)) and torch.equal(fused, src.to(dtype)), max_bv
        print(f"ok {dtype_name} widen", flush=True)


def _interp_expected(dtype_name: str) -> int:
    return len(INTERP_FUSED_T[dtype_name]) + len(INTERP_GEMM_T[dtype_name]) + 12 + (dtype_name == "float64")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_interpreter_against_dense(dtype):
    pytest.importorskip("triton")
    out = run_interpreter_worker(__file__, dtype)
    assert out.count("ok ") == _interp_expected(dtype), out


def test_poisoned_buffers_fill_work_buffers_with_nan_only_inside_the_context():
    """The interpreter checks rely on this hook: unwritten tiles must show as NaN."""
    from sessa_scale.ops import work_buffers as wb

    with wb.poisoned_buffers():
        assert wb.buffers_poisoned() and torch.isnan(wb.new_buffer((3, 5), torch.float32, "cpu")).all()
    assert not wb.buffers_poisoned()


def test_schedule_visits_every_leaf_in_order_and_leaves_no_reference_cycle():
    """The recursive schedule solves leaves in time order (reverse: backwards), applies each solved
    range to the next one, and keeps nothing alive after it returns (a self-referencing closure did:
    the call's work buffers then lived until the cyclic garbage collector ran)."""
    import gc
    import weakref

    pytest.importorskip("triton")
    from sessa_scale.ops.feedback_leaves import schedule

    class Buffer:  # stands in for the work buffers the leaf and apply callbacks hold
        pass

    for reverse in (False, True):
        events, buf = [], Buffer()
        alive = weakref.ref(buf)
        gc.disable()
        try:
            schedule(5 * 8 - 3, 8, lambda a, b=buf: events.append(("leaf", a)),
                     lambda *blk, b=buf: events.append(("apply", *blk)), reverse, 0, 5)
            del buf
            assert alive() is None, "the schedule kept its callbacks' buffers alive"
        finally:
            gc.enable()
        leaves = [e[1] for e in events if e[0] == "leaf"]
        assert leaves == sorted(leaves, reverse=reverse) == sorted({0, 8, 16, 24, 32}, reverse=reverse)
        covered = set()
        for i, event in enumerate(events):  # each apply reads solved rows only and feeds unsolved ones
            if event[0] == "apply":
                _, l0, l1, e0, e1 = event
                solved = {e[1] for e in events[:i] if e[0] == "leaf"}
                assert l1 <= 37 and e0 < e1 <= l0 < l1
                src = range(l0, l1, 8) if reverse else range(e0, e1, 8)
                dst = range(e0, e1, 8) if reverse else range(l0, l1, 8)
                assert set(src) <= solved and not set(dst) & solved
                pairs = {(t, j) for t in range(l0, l1) for j in range(e0, e1)}
                assert not pairs & covered
                covered |= pairs
        # every pair of rows in different leaves is applied exactly once (what the fused dk relies on)
        assert covered == {(t, j) for t in range(37) for j in range(t) if t // 8 != j // 8}


def test_launch_counter_sees_one_logit_pass_per_apply_and_one_dgamma_sum():
    """bench/solve_launches counts the GEMM path's launches on the meta device: with a scratch that
    holds every block whole, one probs epilogue per apply of the forward's schedule, except the pairs
    of single leaves, all formed in one launch before the chain, and one lse strip; the backward forms
    gamma*P with probs_kernel only inside bands (the pairs of leaves there again in one launch), with
    ds_kernel (dS and gamma*P in one pass) between them, then dS of the bands (adjacent bands of one
    head in one launch), and sums dgamma once."""
    pytest.importorskip("triton")
    from sessa_scale.bench.solve_launches import count_launches
    from sessa_scale.ops.feedback_gemm import bands
    from sessa_scale.ops.feedback_leaves import schedule
    from sessa_scale.ops.feedback_triton import SolveConfig

    T, L, band = 8192, SolveConfig().L_gemm, SolveConfig().bwd_band
    applies = []
    schedule(T, L, lambda a: None, lambda *blk: applies.append(blk), False, 0, T // L)
    starts = [a for a, _ in bands(T, L, band)]
    assert starts == list(range(0, T, band))
    between = [blk for blk in applies if blk[0] // band != blk[2] // band]
    assert len(between) == 1  # the top-level block
    fwd, bwd = count_launches(1, T, 1, 768, 768, SolveConfig(scratch_mib=4096))
    pairs = [blk for blk in applies if blk[1] - blk[0] == blk[3] - blk[2] == L]
    assert len(applies) == T // L - 1 and len(pairs) == T // L // 2
    assert fwd["triton.probs_kernel"] == len(applies) - len(pairs) + 1
    assert fwd["triton.lse_partial_kernel"] == fwd["triton.lse_reduce_kernel"] == 1
    assert fwd["torch.bmm"] >= T // L  # the leaf products
    assert bwd["triton.probs_kernel"] == len(applies) - len(between) - len(pairs) + 1
    assert len(starts) == 2 and bwd["triton.ds_kernel"] == len(between) + 1 and bwd["triton.rowsum_kernel"] == 1


def test_bands_split_the_schedule_so_each_pair_is_formed_once():
    """The backward's bands: ranges of the recursion, in order, covering [0, T), each a single leaf or
    at most `band` rows; every apply of the schedule lies inside one band or between two (its rows and
    keys in different bands); the pairs inside bands and those of the applies between them are all
    causal pairs, each once."""
    pytest.importorskip("triton")
    from sessa_scale.ops.feedback_gemm import bands
    from sessa_scale.ops.feedback_leaves import schedule

    for T, L, band in ((130, 32, 64), (37, 8, 16), (16384, 1024, 4096), (5000, 1024, 4096), (1, 32, 64), (96, 32, 32)):
        ranges = bands(T, L, band)
        assert ranges[0][0] == 0 and ranges[-1][1] == T and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(b - a <= max(band, L) for a, b in ranges)
        band_of = [n for n, (a, b) in enumerate(ranges) for _ in range(a, b)]
        inside = sum((b - a) * (b - a - 1) // 2 for a, b in ranges)
        applies = []
        schedule(T, L, lambda a: None, lambda *blk: applies.append(blk), True, 0, -(-T // L))
        between = 0
        for l0, l1, e0, e1 in applies:
            rows, keys = set(band_of[l0:l1]), set(band_of[e0:e1])
            assert (len(rows) == 1 and rows == keys) or not rows & keys, (T, L, band, l0, l1, e0, e1)
            between += (l1 - l0) * (e1 - e0) if rows != keys else 0
        assert inside + between == T * (T - 1) // 2


def test_graph_policy_captures_the_gemm_path_up_to_32k_tokens_of_one_768_head():
    """CUDA graphs: the GEMM path (launch-bound leaf chain) up to T = 32k and 2^26 elements, the fused
    path up to 16k and 2^25."""
    pytest.importorskip("triton")
    from sessa_scale.ops.feedback_triton import SolveConfig, _fit, graph_eligible

    def captured(B, T, H, D):
        return graph_eligible(B, T, H, D, D, _fit(SolveConfig(), T, D, D, 2))

    assert captured(8, 2048, 1, 768) and captured(2, 8192, 1, 768) and captured(1, 16384, 1, 768)
    assert captured(1, 32768, 1, 768) and not captured(2, 32768, 1, 768) and not captured(1, 65536, 1, 768)
    assert captured(8, 2048, 6, 128) and captured(2, 8192, 6, 128) and captured(1, 16384, 6, 128)
    assert not captured(1, 32768, 6, 128) and not captured(16, 4096, 6, 128)
    assert not graph_eligible(2, 8192, 1, 768, 768, _fit(SolveConfig(graphs=0), 8192, 768, 768, 2))


# ----------------------------------------------------------------------------- GPU
# Shapes are chosen to share compiled kernels (one Triton compilation per dtype, head widths and
# H == 1 or not), which is most of this file's time on a fresh machine.

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _triton_impl(**fields):
    from sessa_scale.ops.feedback_triton import SolveConfig, feedback_solve_triton

    if not fields:
        return feedback_solve_triton
    cfg = SolveConfig(**fields)
    return lambda *a: feedback_solve_triton(*a, config=cfg)


@gpu
@needs_cuda
@pytest.mark.parametrize("T,shape", [(1, (2, 3, 64, 64)), (130, (2, 3, 64, 64)), (1000, (2, 3, 64, 64)),
                                     (2049, (1, 2, 64, 64)), (17, (1, 1, 24, 40)), (577, (1, 1, 24, 40))])
def test_gpu_fp32_against_dense(T, shape):
    """The fused path (head widths <= 128) in fp32 against the float64 dense oracle."""
    B, H, Dk, Dv = shape
    _check_against_dense(_triton_impl(), B, T, H, Dk, Dv, torch.float32, "cuda", seed=T, tol_s=1e-5, tol_g=1e-5)


@gpu
@needs_cuda
@pytest.mark.parametrize("fields", [{"gemm": 1, "scratch_mib": 1}, {"gemm": 0, "fuse_dk": 0}])
def test_gpu_paths_against_dense(fields):
    """The GEMM path on narrow heads with a 1 MiB scratch (many row chunks), and the fused path
    with one dk pass over all pairs, in fp32 against dense."""
    _check_against_dense(_triton_impl(**fields), 2, 1500, 3, 64, 64, torch.float32, "cuda", seed=21, tol_s=1e-5,
                         tol_g=1e-5)


@gpu
@needs_cuda
@pytest.mark.parametrize("Dk,Dv,T", [(768, 768, 700), (4096, 256, 130)])
def test_gpu_fp32_large_widths(Dk, Dv, T):
    """The GEMM path (wide heads) in fp32 against dense."""
    _check_against_dense(_triton_impl(), 1, T, 1, Dk, Dv, torch.float32, "cuda", seed=Dk + T, tol_s=1e-5, tol_g=1e-5)


# bf16 inputs: off-diagonal P and s enter tensor-core products in bf16 (fp32 accumulation);
# lse, accumulators and diagonal inverses stay fp32. Stated tolerances (relative, L2):
BF16_TOL_S, BF16_TOL_G = 1e-2, 2e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,B,T,H,D", [(torch.bfloat16, 2, 1000, 3, 64), (torch.bfloat16, 1, 2048, 2, 128),
                                           (torch.bfloat16, 1, 777, 1, 768), (torch.bfloat16, 1, 5000, 1, 768),
                                           (torch.bfloat16, 1, 4096, 1, 768), (torch.float16, 1, 1500, 2, 128)])
def test_gpu_half_against_dense(dtype, B, T, H, D):
    """1x768 at T = 4096: four leaves of 1024, whose pairs (starts 0 and 2048) both passes form in one batched
    launch (at 5000 only one pair is whole)."""
    _check_against_dense(_triton_impl(), B, T, H, D, D, dtype, "cuda", seed=T + D, tol_s=BF16_TOL_S, tol_g=BF16_TOL_G)


@gpu
@needs_cuda
def test_gpu_deterministic_and_auto():
    from sessa_scale.ops.feedback_solve import feedback_solve, resolve_impl

    assert resolve_impl("auto", torch.device("cuda")) == "triton"
    # the fused path; the GEMM path with two bands and an apply between them
    for B, T, H, D in ((2, 1500, 3, 64), (1, 5000, 1, 768)):
        (q, k, g, f), ds = _inputs(B, T, H, D, D, torch.bfloat16, "cuda", seed=3)
        outs = []
        for _ in range(2):
            s = feedback_solve(q, k, g, f)
            outs.append([s, *torch.autograd.grad(s, (q, k, g, f), ds)])
        for a, b in zip(*outs):
            assert torch.equal(a, b)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,H,D", [(torch.bfloat16, 3, 64), (torch.float32, 2, 64), (torch.bfloat16, 1, 768)])
def test_gpu_graph_replays_equal_eager_and_keep_each_calls_results(dtype, H, D):
    """CUDA graphs: calls on new tensors (copying graphs) give bitwise the eager (graphs=0) results,
    also when two calls of one shape run their forwards before either backward (each call's results
    are its own) and when graphs of two shapes, which share one memory pool and one input arena,
    alternate."""
    import sessa_scale.ops.feedback_triton as ft
    from sessa_scale.ops import graph_cache

    graph_cache.clear_graphs()
    eager, graphed = ft.SolveConfig(graphs=0), ft.SolveConfig()
    lengths = (3000, 2000, 3000, 3000, 3000, 3000, 2000, 2000, 2000, 2000, 3000)  # q, k, f above STAGED_BYTES
    inputs = [_inputs(2, T, H, D, D, dtype, "cuda", seed=seed) for seed, T in enumerate(lengths)]

    def forward(cfg, i):
        (q, k, g, f), ds = inputs[i]
        return ft.feedback_solve_triton(q, k, g, f, D ** -0.5, config=cfg), (q, k, g, f), ds

    def grads(s, leaves, ds):
        return [s, *torch.autograd.grad(s, leaves, ds)]

    def two_calls(i, j):  # two forwards, then the backwards in reverse order (as in a model)
        call_i, call_j = forward(graphed, i), forward(graphed, j)
        got[j], got[i] = grads(*call_j), grads(*call_i)

    want = [grads(*forward(eager, i)) for i in range(len(lengths))]
    assert not len(graph_cache.GRAPHS)
    # Every call comes with new tensors: a shape's first two sets of addresses run eagerly, the third
    # captures the shape's copying graph (forward: call 3, backward: call 2's), later calls replay it.
    got = {i: grads(*forward(graphed, i)) for i in (0, 1)}
    assert not len(graph_cache.GRAPHS)
    two_calls(2, 3)
    assert len(graph_cache.GRAPHS) == 2
    two_calls(4, 5)  # both replay: call 5's forward over the statics of call 4's
    two_calls(6, 7)  # the other shape: captured, sharing pool and arena
    two_calls(8, 9)
    got[10] = grads(*forward(graphed, 10))  # the first shape again, after the second one's replays
    assert len(graph_cache.GRAPHS) == 4 and graph_cache.GRAPHS.counts["copying"] == 14, graph_cache.GRAPHS.counts
    for i, g in got.items():
        for name, a, b in zip(("s", "dq", "dk", "dgamma", "df"), g, want[i]):
            assert a.dtype == b.dtype and torch.equal(a, b), f"call {i}: {name} differs from eager"
    graph_cache.clear_graphs()


@gpu
@needs_cuda
@pytest.mark.parametrize("H,D", [(3, 64), (1, 768)])
def test_gpu_direct_graphs_read_and_write_the_calls_own_tensors(H, D):
    """Calls on the same tensors, changed in place between calls (a training loop's steady state),
    replay a direct graph that reads and writes those tensors in place: every call gives bitwise the
    eager results on its inputs' current contents, and the graph is not a copying one.  gamma, a
    small tensor (graph_cache.STAGED_BYTES), comes at a new address every call, as the allocator's
    small blocks do when other work runs between the calls: the direct graph copies it in."""
    import sessa_scale.ops.feedback_triton as ft
    from sessa_scale.ops import graph_cache

    steps = 5
    contents = [_inputs(2, 1400, H, D, D, torch.bfloat16, "cuda", seed=seed) for seed in range(steps)]
    (q, k, g, f), ds = (t.detach().clone().requires_grad_() for t in contents[0][0]), contents[0][1].clone()
    assert g.nbytes < graph_cache.STAGED_BYTES <= q.nbytes
    gammas = []  # every call's gamma, kept: no two at one address

    def run(cfg, step):
        with torch.no_grad():
            for t, new in zip((q, k, f, ds), (contents[step][0][0], contents[step][0][1], contents[step][0][3],
                                              contents[step][1])):
                t.copy_(new)
        gammas.append(contents[step][0][2].detach().clone().requires_grad_())
        g = gammas[-1]
        s = ft.feedback_solve_triton(q, k, g, f, D ** -0.5, config=cfg)
        return [t.cpu() for t in (s, *torch.autograd.grad(s, (q, k, g, f), ds))]

    graph_cache.clear_graphs()
    want = [run(ft.SolveConfig(graphs=0), step) for step in range(steps)]
    got = [run(ft.SolveConfig(), step) for step in range(steps)]
    counts = dict(graph_cache.GRAPHS.counts)
    graph_cache.clear_graphs()
    for step in range(steps):
        for name, a, b in zip(("s", "dq", "dk", "dgamma", "df"), got[step], want[step]):
            assert torch.equal(a, b), f"step {step}: {name} differs from eager"
    # step 0 runs eagerly, step 1 captures forward and backward for the tensors' addresses, 2.. replay
    assert counts.get("direct", 0) == 2 * (steps - 1) and counts.get("copying", 0) == 0, counts


@gpu
@needs_cuda
def test_gpu_graph_captures_beside_a_thread_pinning_host_memory():
    """A training loop's data loader pins host memory in its own thread (DataLoader(pin_memory=True):
    cudaHostAlloc) while the training thread runs the solve.  Captures made meanwhile, copying and
    direct, succeed and replay bitwise the eager results: a capture in CUDA's "global" mode is
    invalidated by such a call from any thread, and the training step fails."""
    import threading

    import sessa_scale.ops.feedback_triton as ft
    from sessa_scale.ops import graph_cache

    empty_host_cache = getattr(torch._C, "_host_emptyCache", None) or torch._C._accelerator_emptyHostCache
    stop, pinned = threading.Event(), []

    def pin_batches():  # fresh page-locked buffers; the host cache emptied so that each one calls cudaHostAlloc
        while not stop.is_set():
            torch.empty(1 << 20, dtype=torch.uint8).pin_memory()
            empty_host_cache()
            pinned.append(1)

    fresh = [_inputs(2, 700, 1, 768, 768, torch.bfloat16, "cuda", seed=seed) for seed in range(4)]
    calls = fresh + [fresh[0]] * 3  # new tensors (copying graph from the third), then the same ones (direct)

    def run(cfg, i):
        (q, k, g, f), ds = calls[i]
        s = ft.feedback_solve_triton(q, k, g, f, 768 ** -0.5, config=cfg)
        return [t.cpu() for t in (s, *torch.autograd.grad(s, (q, k, g, f), ds))]

    graph_cache.clear_graphs()
    want = [run(ft.SolveConfig(graphs=0), i) for i in range(len(calls))]
    thread = threading.Thread(target=pin_batches, daemon=True)
    thread.start()
    try:
        got = [run(ft.SolveConfig(), i) for i in range(len(calls))]
    finally:
        stop.set()
        thread.join()
    counts = dict(graph_cache.GRAPHS.counts)
    graph_cache.clear_graphs()
    assert len(pinned) > 0 and counts.get("captures", 0) >= 4 and counts.get("direct", 0) >= 2, (len(pinned), counts)
    for i in range(len(calls)):
        for name, a, b in zip(("s", "dq", "dk", "dgamma", "df"), got[i], want[i]):
            assert torch.equal(a, b), f"call {i}: {name} differs from eager"


@gpu
@needs_cuda
def test_gpu_power_law_tail():
    """Uniform routing (q = 0) and constant gamma: ds_t/df_0 has the closed form of docs/sessa_math.md."""
    T, gam = 300, 0.9
    q = torch.zeros(1, T, 1, 24, device="cuda")
    k = torch.randn(1, T, 1, 24, device="cuda")
    g = torch.full((1, T, 1), gam, device="cuda")
    f = torch.zeros(1, T, 1, 40, device="cuda")
    f[0, 0, 0, :] = 1.0
    s = _triton_impl()(q, k, g, f, 1.0 / math.sqrt(24))[0, :, 0, 0].double().cpu()
    expect = [1.0]
    prod = 1.0
    for t in range(1, T):
        expect.append(gam / t * prod)
        prod *= 1 + gam / t
    assert _rel(s, torch.tensor(expect, dtype=torch.float64)) < 1e-5


@gpu
@needs_cuda
def test_gpu_against_deltaformer():
    """fla-core's DeltaFormer computes u = v - beta * softmax-strict(qk) u: beta = -gamma gives s."""
    from sessa_scale.bench.baselines import fla_deltaformer_solve
    from sessa_scale.ops.ssd import fla_available

    if not fla_available():
        pytest.skip("fla-core (fla.ops.deltaformer) not installed")
    (q, k, g, f), ds = _inputs(2, 2048, 4, 64, 64, torch.bfloat16, "cuda", seed=11)
    s = _triton_impl()(q, k, g, f, 1.0 / 8.0)
    grads = torch.autograd.grad(s, (q, k, g, f), ds)
    u = fla_deltaformer_solve(q, k, g, f, 1.0 / 8.0)
    grads_fla = torch.autograd.grad(u, (q, k, g, f), ds)
    assert _rel(s, u) < BF16_TOL_S
    for name, a, b in zip(("dq", "dk", "dgamma", "df"), grads, grads_fla):
        assert _rel(a, b) < 3 * BF16_TOL_G, name


def _op_peak_bytes(impl, inputs, ds, scale) -> int:
    """Peak CUDA memory of a warm fwd+bwd beyond its inputs (cached CUDA graphs count), as the benches
    measure it (gradients of the previous call dropped first)."""
    from sessa_scale.bench import cuda_peak_bytes

    def fwd_bwd():
        for t in inputs:
            t.grad = None
        impl(*inputs, scale).backward(ds)

    return cuda_peak_bytes(fwd_bwd, warm=True)


# The GEMM path's backward as the first CUDA work of the autograd engine's device thread (a fresh
# process, eager calls; `s.backward(ds)` so that no other backward op runs there before it, and
# freed blocks cached for all its buffers, so that no cudaMalloc, a runtime call, comes first).
_BACKWARD_FIRST_ON_ITS_THREAD = """
import torch
from sessa_scale.ops.feedback_triton import SolveConfig, feedback_solve_triton
x = [torch.randn(1, 300, 1, 320, device="cuda", requires_grad=True) for _ in range(3)]
gamma = torch.rand(1, 300, 1, device="cuda", requires_grad=True)
s = feedback_solve_triton(x[0], x[1], gamma, x[2], 0.05, config=SolveConfig(gemm=1, graphs=0))
ds = torch.randn_like(s)
cached = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in [1 << 28] + [1 << 18] * 256]
del cached
s.backward(ds)
torch.cuda.synchronize()
print("finite", all(bool(torch.isfinite(t.grad).all()) for t in (*x, gamma)))
"""


@gpu
@needs_cuda
def test_gpu_gemm_backward_first_on_the_autograd_thread():
    """The autograd engine's device thread has no current CUDA context until a runtime call there; the
    GEMM path's TMA descriptors are encoded in the current context, so a backward that began with a
    logit launch failed there ("invalid device context")."""
    import subprocess

    from tests.helpers import repo_first_pythonpath

    env = {**os.environ, "PYTHONPATH": repo_first_pythonpath()}
    proc = subprocess.run([sys.executable, "-c", _BACKWARD_FIRST_ON_ITS_THREAD], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0 and "finite True" in proc.stdout, proc.stderr[-3000:]


@gpu
@needs_cuda
def test_gpu_single_head_768_memory_linear_in_T():
    """Single head D = 768: fwd+bwd at T = 32k, B = 1 in < 1 GiB for the op, and the op's memory
    grows at most linearly with T (x4 from 8k to 32k)."""
    peaks = {}
    for T in (8192, 32768):
        inputs, ds = _inputs(1, T, 1, 768, 768, torch.bfloat16, "cuda", seed=5)
        peaks[T] = _op_peak_bytes(_triton_impl(), inputs, ds, 768 ** -0.5)
        assert all(torch.isfinite(t.grad).all() for t in inputs)
        del inputs, ds
    print(f"peak op memory 1x768: T=8k {peaks[8192] / 2**20:.0f} MiB, T=32k {peaks[32768] / 2**20:.0f} MiB")
    assert peaks[32768] < 2**30
    assert peaks[32768] <= 4 * peaks[8192]


@gpu
@needs_cuda
def test_gpu_memory_within_3x_sdpa():
    """6 heads of 128 at T = 8192, B = 2 (graphs on, as in training): the op's fwd+bwd peak memory is
    at most 3x that of causal SDPA flash attention of the same shape."""
    from sessa_scale.bench.baselines import sdpa_flash_same_shape

    inputs, ds = _inputs(2, 8192, 6, 128, 128, torch.bfloat16, "cuda", seed=9)
    peaks = {name: _op_peak_bytes(impl, inputs, ds, 128 ** -0.5)
             for name, impl in (("sdpa", sdpa_flash_same_shape), ("triton", _triton_impl()))}
    print(f"peak op memory 6x128 T=8k B=2: triton {peaks['triton'] / 2**20:.0f} MiB, "
          f"sdpa {peaks['sdpa'] / 2**20:.0f} MiB")
    assert peaks["triton"] <= 3 * peaks["sdpa"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interp-worker":
        _interp_worker(sys.argv[2])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --interp-worker float32|float64")
