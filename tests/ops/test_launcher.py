"""The lean Triton launch path (sessa_scale/ops/launcher.py).

CPU: the launch key against triton's own (host-only) code: two arguments get equal keys exactly where
``native_specialize_impl`` (what the JIT's binder calls per argument) specializes them the same way;
two launches get equal keys exactly where triton's in-memory cache key (binder + compute_cache_key)
is equal, over calls that differ in a constexpr, a launch option, an argument's alignment, dtype or
integer specialization, or in values triton does not specialize on (do_not_specialize T); the
constexpr values passed after the arguments are those triton's binder binds; the switch.
GPU (``-m gpu``): the SSD scan and the fused Mamba-2 ops give bitwise the same outputs and gradients
through the lean path as through ``kernel[grid](...)``, the lean path is taken, and compiles nothing
after warm-up.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import triton
import triton.language as tl

from sessa_scale.errors import UserError
from sessa_scale.kernels import ssd as K
from sessa_scale.ops import launcher
from sessa_scale.ops.launcher import constexpr_values, kernel_rules, launch_key, lean_enabled, specialization_key


class FakeTensor:
    """What triton's specialization reads of a tensor: data_ptr() and dtype."""

    def __init__(self, ptr: int, dtype: torch.dtype):
        self.ptr, self.dtype = ptr, dtype

    def data_ptr(self) -> int:
        return self.ptr


INTS = [0, 1, 2, 15, 16, 17, 32, 2049, -1, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -2**31, -2**31 - 1,
        -2**31 - 16, 2**63 - 16, 2**63 - 1, 2**63, 2**63 + 16, 2**64 - 1]
TENSORS = [FakeTensor(p, d) for p in (0, 8, 16, 24, 32, 1 << 40, (1 << 40) + 2)
           for d in (torch.bfloat16, torch.float32)]
ARGS = [*INTS, True, False, 0.5, 1.0, None, *TENSORS]
FLAGS = list(itertools.product([True, False], repeat=2))  # (specialize, align) of a non-constexpr parameter


@pytest.mark.parametrize("specialize,align", FLAGS)
def test_arg_keys_equal_exactly_where_triton_specializes_the_same(specialize, align):
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    def triton_spec(a):
        return native(BaseBackend, a, False, specialize, align)

    def ours(a):
        return specialization_key((a,), [(False, specialize, align)])

    wrong = [(a, b) for a, b in itertools.combinations_with_replacement(ARGS, 2)
             if (ours(a) == ours(b)) != (triton_spec(a) == triton_spec(b))]
    shown = [(getattr(a, "ptr", a), getattr(b, "ptr", b), triton_spec(a), triton_spec(b)) for a, b in wrong[:5]]
    assert not wrong, f"{len(wrong)} pairs keyed unlike triton's specialization, e.g. {shown}"


@triton.jit
def _toy_kernel(x_ptr, n, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    """A kernel with a defaulted constexpr (none of ours has one)."""
    pass


def _cb_args(T=2048, ptrs=(0, 256, 512), dtype=torch.bfloat16, stride=64):
    """cb_kernel's positional arguments: C, B, CB, T, G, N, NC, then eight strides."""
    return (*(FakeTensor(p, dtype) for p in ptrs), T, 1, 128, 32, *(stride,) * 8)


CONSTS = {"BN": 64, "L": 64, "ACC": "fp32", "DOT": "bf16", "PREC": "tf32", "num_warps": 4, "num_stages": 2}
# cb_kernel calls (T is in do_not_specialize) -> whether triton compiles another kernel than for "base"
CALLS = {
    "base": (_cb_args(), CONSTS, False),
    **{f"T={T}": (_cb_args(T=T), CONSTS, False) for T in (1, 17, 63, 65, 130, 2049, 8192)},
    "T beyond int32": (_cb_args(T=2**31), CONSTS, True),
    "other aligned pointers": (_cb_args(ptrs=(16, 4096, 1 << 40)), CONSTS, False),
    "another stride % 16 == 0": (_cb_args(stride=128), CONSTS, False),
    "misaligned tensor": (_cb_args(ptrs=(0, 258, 512)), CONSTS, True),
    "dtype": (_cb_args(dtype=torch.float32), CONSTS, True),
    "stride % 16 != 0": (_cb_args(stride=72), CONSTS, True),
    "stride == 1": (_cb_args(stride=1), CONSTS, True),
    "stride beyond int32": (_cb_args(stride=2**31), CONSTS, True),
    "constexpr value": (_cb_args(), {**CONSTS, "BN": 32}, True),
    "constexpr 1": (_cb_args(), {**CONSTS, "BN": 1}, True),
    "constexpr True (== 1 in Python)": (_cb_args(), {**CONSTS, "BN": True}, True),
    "num_warps": (_cb_args(), {**CONSTS, "num_warps": 8}, True),
    "maxnreg": (_cb_args(), {**CONSTS, "maxnreg": 128}, True),
    "L positionally": ((*_cb_args(), 64), {k: v for k, v in CONSTS.items() if k != "L"}, False),
    "L = 32 positionally": ((*_cb_args(), 32), {k: v for k, v in CONSTS.items() if k != "L"}, True),
}


def _binder(kernel):
    """triton's own binder of kernel (runtime/jit.py create_function_from_signature), host-only."""
    jit = pytest.importorskip("triton.runtime.jit")
    from triton.backends.compiler import BaseBackend

    return jit.create_function_from_signature(kernel.signature, kernel.params, BaseBackend)


def _triton_key(kernel, args, kwargs) -> str:
    """triton's in-memory cache key of a launch (JITFunction.run: binder, then compute_cache_key)."""
    from triton.runtime.jit import compute_cache_key

    _, specialization, options = _binder(kernel)(*args, **kwargs, debug=False, instrumentation_mode="")
    return compute_cache_key({}, specialization, options)


def _our_key(kernel, args, kwargs, device=0):
    return launch_key(id(kernel), device, kernel_rules(kernel)[0], args, kwargs)


def test_launch_keys_equal_exactly_where_triton_picks_the_same_kernel():
    theirs = {name: _triton_key(K.cb_kernel, a, kw) for name, (a, kw, _) in CALLS.items()}
    ours = {name: _our_key(K.cb_kernel, a, kw) for name, (a, kw, _) in CALLS.items()}
    assert [n for n, (_, _, other) in CALLS.items() if (theirs[n] != theirs["base"]) != other] == [], "stated cases"
    pairs = list(itertools.combinations(CALLS, 2))
    wrong = [(a, b) for a, b in pairs if ours[a] == ours[b] and theirs[a] != theirs[b]]
    assert not wrong, f"one key for calls triton compiles different kernels for: {wrong}"
    # finer than triton only where one call passes L positionally, the other by keyword: one more plain call
    missed = [(a, b) for a, b in pairs if ours[a] != ours[b] and theirs[a] == theirs[b]]
    assert all(("positionally" in a) != ("positionally" in b) for a, b in missed), f"reuse missed: {missed}"
    assert _our_key(K.cb_kernel, *CALLS["base"][:2], device=1) != ours["base"], "another device"


def test_constexpr_values_are_what_triton_binds_after_the_positional_arguments():
    for kernel, args, kwargs in [(K.cb_kernel, *CALLS["base"][:2]), (K.cb_kernel, *CALLS["L positionally"][:2]),
                                 (_toy_kernel, (FakeTensor(0, torch.float32), 3), {"BLOCK": 16}),
                                 (_toy_kernel, (FakeTensor(0, torch.float32), 3), {"BLOCK": 16, "FLAG": True})]:
        bound, _, _ = _binder(kernel)(*args, **kwargs)
        values = constexpr_values(kernel_rules(kernel)[1], len(args), kwargs)
        assert [*args, *values] == list(bound.values()), f"{kernel}: {kwargs}"
    assert constexpr_values(kernel_rules(_toy_kernel)[1], 1, {"n": 3, "BLOCK": 16}) is None, "n by keyword"


def test_switch(monkeypatch):
    assert lean_enabled({}, "3.6.0", False) and lean_enabled({"SESSA_TRITON_LAUNCH": "lean"}, "3.6.1", False)
    assert not lean_enabled({"SESSA_TRITON_LAUNCH": "plain"}, "3.6.0", False)
    assert not lean_enabled({}, "3.6.0", True), "the interpreter launches plainly"
    assert not lean_enabled({}, "3.9.0", False) and not lean_enabled({}, "3.5.1", False), "unverified triton"
    with pytest.raises(UserError, match="SESSA_TRITON_LAUNCH='fast' is not one of lean, plain"):
        lean_enabled({"SESSA_TRITON_LAUNCH": "fast"}, "3.6.0", False)


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def _mode(monkeypatch, mode: str):
    monkeypatch.setenv("SESSA_TRITON_LAUNCH", mode)
    launcher.lean_launches.cache_clear()
    try:
        yield
    finally:
        monkeypatch.delenv("SESSA_TRITON_LAUNCH")
        launcher.lean_launches.cache_clear()


def _scan_and_block(T: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """ssd_scan_triton on strided inputs (350m head shapes) and a Mamba-2 block (fused conv, norm, dt
    ops and the packed scan; bf16: under autocast, as training runs it): outputs and gradients."""
    from sessa_scale.models.mamba2 import Mamba2Block
    from sessa_scale.ops.ssd_triton import ssd_scan_triton
    from tests.ops.test_ssd_triton import _inputs, _outputs

    args, gy, gh = _inputs(2, T, 4, 2, 64, 128, dtype, "cuda", seed=T, strided=True)
    y, h, grads = _outputs(lambda *a: ssd_scan_triton(*a[:5], a[5], 64, None, a[6]), args, gy, gh)
    torch.manual_seed(T)
    block = Mamba2Block(256, d_state=128, head_dim=64, n_groups=1, chunk_size=64, scan="triton",
                        kernels="triton").cuda()
    x = torch.randn(2, T, 256, device="cuda").requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = block(x)
    out.float().square().sum().backward()
    return [y, h, *grads, out, x.grad, *(p.grad for p in block.parameters() if p.grad is not None)]


def _jit_runs(monkeypatch) -> list:
    """Records each JITFunction.run call (triton's own launch path), then runs it."""
    from triton.runtime.jit import JITFunction

    calls, run = [], JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **kw: calls.append(self) or run(self, *a, **kw))
    return calls


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [17, 2049])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_lean_launches_are_bitwise_the_plain_ones(monkeypatch, T, dtype):
    with _mode(monkeypatch, "plain"):
        plain, again = _scan_and_block(T, dtype), _scan_and_block(T, dtype)
    differ = [i for i, (a, b) in enumerate(zip(plain, again)) if not torch.equal(a, b)]
    assert not differ, f"results {differ} differ between two plain runs: the comparison below would mean nothing"
    with _mode(monkeypatch, "lean"):
        assert launcher.lean_launches(), "the lean path is off on this machine (triton 3.6 needed)"
        _scan_and_block(T, dtype)  # warm-up: the first call of each key launches plainly
        runs = _jit_runs(monkeypatch)
        lean = _scan_and_block(T, dtype)
    assert not runs, f"{len(runs)} launches went through JITFunction.run after warm-up"
    differ = [i for i, (a, b) in enumerate(zip(plain, lean)) if not torch.equal(a, b)]
    assert len(plain) == len(lean) and not differ, f"T={T} {dtype}: results {differ} differ from the plain path"


@gpu
@needs_cuda
def test_gpu_lean_launches_compile_nothing_after_warm_up(monkeypatch):
    from sessa_scale.kernels import mamba2_fused

    kernels = [k for m in (K, mamba2_fused) for k in vars(m).values() if k.__class__.__name__ == "JITFunction"]

    def compiled():
        return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())

    with _mode(monkeypatch, "lean"):
        for T in (17, 2049):
            _scan_and_block(T, torch.bfloat16)
        before, keys = compiled(), len(launcher._kept)
        for T in (17, 2049, 17):
            _scan_and_block(T, torch.bfloat16)
    assert before > 0 and compiled() == before, f"kernels compiled: {before} after warm-up, {compiled()} after"
    assert len(launcher._kept) == keys, f"launch keys: {keys} after warm-up, {len(launcher._kept)} after"
