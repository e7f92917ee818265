"""The torch ops the Mamba-2 mixer issues around its Triton kernels (copies, concatenations,
reductions, elementwise ops, allocations), forward and backward, counted with a dispatch mode
that skips what the kernels themselves do (the CPU interpreter runs them on torch tensors; on a
GPU a launch issues no torch op). Every op is a host call and most a launch: pinned here so that
glue does not creep back. Runs in a fresh process with TRITON_INTERPRET=1 (``--interp-worker``);
one head split in the dB/dC kernel, as at the 350m shapes on an H200."""

from __future__ import annotations

import collections
import json
import os
import sys

import pytest
import torch

from tests.helpers.interpreter import run_interpreter_worker
from tests.helpers.op_counter import OpCounter

VIEWS = {"view", "_unsafe_view", "t", "split_with_sizes", "slice", "select", "unsqueeze", "expand", "detach",
         "as_strided", "alias", "transpose", "permute", "squeeze", "unbind", "promote_types"}


class _Uncounted:
    """A kernel whose launches the counter does not see (what the interpreter does inside them)."""

    def __init__(self, kernel, counter: OpCounter):
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.counter.paused = True
            try:
                return launch(*args, **kwargs)
            finally:
                self.counter.paused = False

        return run


def _interp_worker() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    os.environ["SESSA_SSD_CFG"] = "head_split=1"
    import sessa_scale.kernels.mamba2_fused as km
    import sessa_scale.kernels.ssd as ks
    from sessa_scale.models.mamba2 import Mamba2Mixer

    counter = OpCounter()
    for module in (ks, km):
        for name in [n for n in dir(module) if n.endswith("_kernel")]:
            setattr(module, name, _Uncounted(getattr(module, name), counter))
    torch.manual_seed(0)
    mixer = Mamba2Mixer(32, d_state=16, head_dim=16, n_groups=1, chunk_size=16, scan="triton", kernels="triton")
    u = torch.randn(2, 17, 32, requires_grad=True)
    upstream = torch.randn(2, 17, 32)
    with counter:
        out = mixer(u)
    forward, counter.ops = counter.ops, collections.Counter()
    with counter:
        torch.autograd.backward(out, upstream)
    print(json.dumps({phase: {k: v for k, v in ops.items() if k not in VIEWS}
                      for phase, ops in (("forward", forward), ("backward", counter.ops))}))


def test_mixer_glue_ops_forward_and_backward():
    """Forward: three weight concatenations (the fused input projection's weights, the convs' taps
    and biases), the two GEMMs and the kernels' output buffers. Backward: the four GEMMs, no
    concatenation (the norm, the conv and the dt op write dz, d[x | B | C] and d dt_raw into one
    gradient of the projection, and the SSD scan dx, dB, dC into one gradient of the conv output;
    before, the projection's [dz | dxbc | ddt] was concatenated), two reductions (the norm weight's
    partial sums, and dA's and dD's in one: before, one each). No copy, cast or elementwise op
    either way."""
    pytest.importorskip("triton")
    counts = json.loads(run_interpreter_worker(__file__).strip().splitlines()[-1])
    fwd, bwd = counts["forward"], counts["backward"]
    assert {k: v for k, v in fwd.items() if k != "empty"} == {"cat": 3, "mm": 2}, counts
    assert {k: v for k, v in bwd.items() if k != "empty"} == {"mm": 4, "sum": 2}, counts
    assert fwd["empty"] <= 9 and bwd["empty"] <= 18, counts  # output and work buffers


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "--interp-worker":
        _interp_worker()
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --interp-worker")
