"""SSDConfig.keep_states (model.ssm_keep_states): the Triton SSD scan's backward reads the chunk
states its forward wrote instead of recomputing them; the gradients must be those of the
recomputing backward bit for bit (the same kernel on the same inputs made both), and the kept
tensor is exactly the B H NC N P elements the docs state.

CPU (CI), under TRITON_INTERPRET=1 in a fresh subprocess (this file with ``--interp-worker``), NaN-
poisoned buffers: the plain and the packed scan on the fused and the split state schedules at T in
{1, 17, 65} (float32: outputs and every gradient bitwise against keep_states=False and within
2e-5 of the float64 recurrence; state-pass launches 2 instead of 3; saved elements), and a Mamba-2
block built from model.ssm_keep_states under bf16 autocast (states kept in bf16) bitwise against
the recomputing one. In-process: SESSA_SSD_CFG's keep_states parsing and its precedence.
GPU (``-m gpu``): keep on / off bitwise at T = 2048 in bf16 and fp32 on both schedules.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import replace

import pytest
import torch

from tests.helpers.interpreter import run_interpreter_worker
from tests.ops.test_ssd_triton import INTERP_TOL, NAMES, _inputs, _outputs, _rel, _sequential

# (T, packed) per state schedule: each schedule meets the plain and the packed scan; chunks of 16
# (T = 65: five chunks, the last masked), 2 heads in 1 group, P = 20 and N = 24 over two 16-wide tiles.
CASES = {"fused": ((1, False), (17, True), (65, False)), "split": ((1, True), (17, False), (65, True))}
STATE_KERNELS = ("state_scan_kernel", "chunk_local_state_kernel")  # one per state pass (fused, split)


class _CountedKernel:
    """A Triton kernel whose launches (kernel[grid](...)) are appended, by name, to `passes`."""

    def __init__(self, kernel, passes: list):
        self.kernel, self.passes = kernel, passes

    def __getitem__(self, grid):
        self.passes.append(self.kernel.fn.__name__)
        return self.kernel[grid]


@contextlib.contextmanager
def counting_state_passes():
    """Counts the state passes (B, H, NC, N, P) that the scan launches inside the block: yields a list
    whose length is that count (the state kernels are wrapped, and still run)."""
    from sessa_scale.kernels import ssd as K

    passes, kernels = [], {name: getattr(K, name) for name in STATE_KERNELS}
    for name, kernel in kernels.items():
        setattr(K, name, _CountedKernel(kernel, passes))
    try:
        yield passes
    finally:
        for name, kernel in kernels.items():
            setattr(K, name, kernel)


def _scan(config, packed: bool, chunk: int):
    """The scan (plain or packed [x | B | C]) on this SSDConfig, as _outputs calls it:
    (x, dt, A, B, C, h0, D) -> (y, final)."""
    from sessa_scale.ops.ssd_triton import ssd_scan_triton, ssd_scan_triton_packed

    def scan(x, dt, A, B, C, h0, D):
        if not packed:
            return ssd_scan_triton(x, dt, A, B, C, h0, chunk, config, D)
        xbc = torch.cat([x.flatten(-2), B.flatten(-2), C.flatten(-2)], dim=-1)
        return ssd_scan_triton_packed(xbc, dt, A, x.shape[-1], B.shape[-1], h0, chunk, config, D)

    return scan


def check_scan(base, T: int, packed: bool, dtype=torch.float32, device="cpu", chunk=16, shape=(1, 2, 1, 20, 24)):
    """On SSDConfig base (its state_schedule) with keep_states on and off: outputs and gradients equal
    bit for bit, 2 state passes on and 3 off, B H NC N P more saved elements on (shape: B, H, G, P,
    N); on CPU also within INTERP_TOL (float32) of the float64 recurrence. -> those relative errors."""
    batch, H, G, P, N = shape
    args, gy, gh = _inputs(batch, T, H, G, P, N, dtype, device, seed=T, strided=not packed)
    runs = {}
    for keep in (True, False):
        saved = []
        with counting_state_passes() as passes, torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel()) or t, lambda t: t):
            y, h, grads = _outputs(_scan(replace(base, keep_states=keep), packed, chunk), args, gy, gh)
        runs[keep] = ([y, h, *grads], len(passes), sum(saved))
    label = f"{base.state_schedule} T={T} packed={packed} {dtype}"
    names = [n for n, a in zip(NAMES, [1, 1, *args]) if a is not None]
    differ = [n for n, a, b in zip(names, runs[True][0], runs[False][0]) if not torch.equal(a, b)]
    assert not differ, f"{label}: keep_states changed {differ}"
    passes = (runs[True][1], runs[False][1])
    assert passes == (2, 3), f"{label}: state passes (keep, recompute) {passes}, expected (2, 3)"
    kept = runs[True][2] - runs[False][2]
    assert kept == batch * H * -(-T // chunk) * N * P, f"{label}: {kept} more saved elements"
    if device != "cpu":
        return {}
    ref_args = [None if a is None else a.detach().double().requires_grad_() for a in args]
    y_ref, h_ref, g_ref = _outputs(_sequential, ref_args, gy, gh)
    errs = {n: _rel(a, b) for n, a, b in zip(names, runs[True][0], [y_ref, h_ref, *g_ref])}
    bad = {n: e for n, e in errs.items() if not e <= INTERP_TOL["float32"]}
    assert not bad, f"{label}: relative errors against the recurrence above {INTERP_TOL['float32']}: {bad}"
    return errs


def check_block(T: int, device: str = "cpu"):
    """A Mamba-2 block built from model.ssm_keep_states (Triton scan and kernels) under bf16 autocast,
    as training runs it (DOT = bf16: the kept states are bf16): output, input and parameter gradients
    with the key true equal those with it false bit for bit; the scan runs 2 state passes, then 3."""
    from sessa_scale.config.schema import ModelConfig
    from sessa_scale.models.mamba2 import build_mamba2_block

    cfg = ModelConfig(arch="mamba2", d_model=32, ssm_state=16, ssm_head_dim=16, ssm_groups=2, ssm_chunk=16,
                      ssm_scan="triton", ssm_kernels="triton")
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(2, T, 32, generator=gen).to(device=device, dtype=torch.bfloat16)
    up = torch.randn(2, T, 32, generator=gen).to(device=device, dtype=torch.bfloat16)
    results, counts = [], []
    for keep in (True, False):
        torch.manual_seed(0)
        block = build_mamba2_block(replace(cfg, ssm_keep_states=keep), 0).to(device)
        assert block.mixer.keep_states is keep
        xi = x.clone().requires_grad_()
        with counting_state_passes() as passes:
            with torch.autocast(device, dtype=torch.bfloat16):
                out = block(xi)
            out.backward(up)
        counts.append(len(passes))
        results.append({"out": out.detach(), "dx": xi.grad, **{n: p.grad for n, p in block.named_parameters()}})
    differ = [k for k in results[0] if not torch.equal(results[0][k], results[1][k])]
    assert not differ, f"block T={T}: ssm_keep_states changed {differ}"
    assert counts == [2, 3], f"block T={T}: state passes (keep, recompute) {counts}"


# ----------------------------------------------------------------------------- CPU interpreter


def _interp_worker(what: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from sessa_scale.ops.ssd_triton import INTERPRET_CONFIG
    from sessa_scale.ops.work_buffers import poisoned_buffers

    with poisoned_buffers():  # every buffer the kernels write starts as NaN
        if what == "block":
            check_block(17)
            print("ok block T=17", flush=True)
            return
        for T, packed in CASES[what]:
            errs = check_scan(replace(INTERPRET_CONFIG, state_schedule=what), T, packed)
            print(f"ok {what} T={T} packed={packed} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)


@pytest.mark.parametrize("schedule", sorted(CASES))
def test_interpreter_kept_states_give_the_recomputed_gradients(schedule):
    pytest.importorskip("triton")
    out = run_interpreter_worker(__file__, schedule)
    assert out.count(f"ok {schedule} ") == len(CASES[schedule]), out


def test_interpreter_mamba2_block_ssm_keep_states_is_bitwise():
    pytest.importorskip("triton")
    out = run_interpreter_worker(__file__, "block")
    assert "ok block T=17" in out, out


def test_keep_states_from_the_caller_and_sessa_ssd_cfg(monkeypatch):
    """The caller's keep_states (the model key) sets SSDConfig.keep_states; SESSA_SSD_CFG's keep_states
    (true / false / 1 / 0) wins over it; other values are named."""
    pytest.importorskip("triton")
    import sessa_scale.ops.ssd_triton as st

    monkeypatch.setattr(st, "INTERPRET", True)  # _triton_config takes CPU tensors in the interpreter
    x = torch.zeros(1)

    def keeps(keep_states, env=None):
        if env is None:
            monkeypatch.delenv("SESSA_SSD_CFG", raising=False)
        else:
            monkeypatch.setenv("SESSA_SSD_CFG", env)
        return st._triton_config(x, (x,), None, keep_states).keep_states

    assert st.SSDConfig().keep_states is True
    assert [keeps(None), keeps(False), keeps(True)] == [True, False, True]
    assert [keeps(True, "keep_states=false"), keeps(True, "keep_states=0"), keeps(False, "keep_states=TRUE")] == [
        False, False, True]
    assert st._triton_config(x, (x,), st.SSDConfig(BN=32), False) == st.SSDConfig(BN=32, keep_states=False)
    with pytest.raises(ValueError, match="keep_states='maybe' is not a boolean; use keep_states=true or"):
        keeps(True, "keep_states=maybe")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("schedule", ["fused", "split"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_kept_states_give_the_recomputed_gradients(schedule, dtype):
    """T = 2048, 350m head shapes (P = 64, N = 128), 4 heads in 2 groups, chunks of 64, the GPU
    tiles: keep on / off bitwise (the forward's state pass is compiled with WRITE_END, the
    recomputation without: this checks they make the same states), state passes, saved elements;
    the plain and the packed scan."""
    from sessa_scale.ops.ssd_triton import DEFAULT_CONFIG

    for packed in (False, True):
        check_scan(replace(DEFAULT_CONFIG, state_schedule=schedule), 2048, packed, getattr(torch, dtype), "cuda",
                   chunk=64, shape=(2, 4, 2, 64, 128))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interp-worker":
        _interp_worker(sys.argv[2])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --interp-worker fused|split|block")
