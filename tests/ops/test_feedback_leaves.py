"""Tests of the leaf inverses of the Triton feedback solve (``leaf_inverses`` in
sessa_scale/ops/feedback_leaves.py: ``leaf_prep_kernel``, then the in-place merge kernels).

CPU (CI): under TRITON_INTERPRET=1 (a fresh subprocess: this file with ``--interp-worker``), W equals,
per leaf, the float64 inverse of (I - A) with A = gamma_t P[t, j] from the dense definition
(strictly causal softmax), rows past T padded with identity; float32 and float64, ragged T, one
merge level (L = 2C) and three (L = 8C), work buffers poisoned with NaN; both ways of forming A
(leaf_prep_kernel alone, and the GEMM path's leaf_probs_kernel below the diagonal blocks); merges
in the kernels only, and with the larger levels through torch.bmm (``MERGE_GEMM_MIN``).

GPU (``-m gpu``): the merges (kernels, and cuBLAS levels) give the old batched torch.matmul
merge's W to 1e-5 relative in fp32 ("ieee") at the production leaf sizes.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import replace

import pytest
import torch

from tests.helpers.interpreter import run_interpreter_worker

INTERP_CASES = [(T, L) for L in (32, 128) for T in (17, 65, 130)]  # C = 16: 1 and 3 merge levels
INTERP_TOL = {"float32": 1e-6, "float64": 1e-12}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float("inf") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm()).item()


def _dense_leaf_inverses(q, k, gamma, scale: float, L: int) -> torch.Tensor:
    """The oracle, in float64: (B*H, NL*L, L), per leaf of L rows inv(I - A_leaf), A[t, j] =
    gamma_t softmax_{j<t}(scale q_t.k_j) (rows past T: A = 0)."""
    from sessa_scale.ops.feedback_reference import strictly_causal_alpha

    B, T, H, _ = q.shape
    NL = -(-T // L)
    A = torch.zeros(B, H, NL * L, NL * L, dtype=torch.float64)
    A[:, :, :T, :T] = gamma.double().permute(0, 2, 1)[..., None] * strictly_causal_alpha(q.double(), k.double(), scale)
    leaves = torch.stack([A[:, :, i * L:(i + 1) * L, i * L:(i + 1) * L] for i in range(NL)], 2)
    N = torch.linalg.inv(torch.eye(L, dtype=torch.float64) - leaves)  # (B, H, NL, L, L)
    return N.reshape(B * H, NL * L, L)


def _lse_base2(q, k, scale: float) -> torch.Tensor:
    """(B*H, T): log2 of the strictly causal softmax denominators (0 for row 0), the kernels' lse."""
    B, T, H, _ = q.shape
    logits = torch.einsum("bthd,bshd->bhts", q, k) * scale
    strict = torch.ones(T, T, dtype=torch.bool).tril(-1)
    lse = torch.logsumexp(logits.masked_fill(~strict, float("-inf")), -1).nan_to_num(neginf=0.0) * math.log2(math.e)
    return lse.reshape(B * H, T)


def _interp_worker(dtype_name: str) -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1 (set before any triton import)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from sessa_scale.ops.feedback_gemm import _Blocks
    from sessa_scale.ops.feedback_leaves import LOG2E, leaf_inverses
    from sessa_scale.ops.feedback_triton import INTERPRET_CONFIG
    from sessa_scale.ops.work_buffers import poisoned_buffers

    dtype = getattr(torch, dtype_name)
    B, H, Dk = 1, 2, 24
    scale = Dk ** -0.5
    for T, L in INTERP_CASES:
        gen = torch.Generator().manual_seed(T + L)
        q, k = (torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64) for _ in range(2))
        gamma = 0.999 * torch.tanh(torch.randn(B, T, H, generator=gen, dtype=torch.float64) + 1.0)
        q, k, gamma = (t.to(dtype) for t in (q, k, gamma))
        lse = _lse_base2(q, k, scale)
        want = _dense_leaf_inverses(q, k, gamma, scale, L)
        # merges: the fused path's in the kernels; the GEMM path's from block size L / 4 on through
        # torch.bmm (L = 2C: every level; L = 8C: the last two of three)
        for path, gemm_min in (("fused", 0), ("gemm", L // 4)):
            cfg = replace(INTERPRET_CONFIG, L=L, BK_PREP=32, MERGE_GEMM_MIN=gemm_min)
            with poisoned_buffers():  # entries no kernel wrote are NaN
                blocks = _Blocks(q, k, gamma, lse, scale, cfg, scaled=True) if path == "gemm" else None
                below = blocks.leaf_below if blocks else None
                W = leaf_inverses(q, k, gamma, lse, cfg, scale * LOG2E, below)
            err = _rel(W, want)
            case = f"{dtype_name} {path} T={T} L={L} C={cfg.C} MERGE_GEMM_MIN={gemm_min}"
            assert err <= INTERP_TOL[dtype_name], f"{case}: relative error {err:.1e}"
            print(f"ok {case} err={err:.1e}", flush=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_interpreter_leaf_inverses_against_dense(dtype):
    pytest.importorskip("triton")
    out = run_interpreter_worker(__file__, dtype)
    assert out.count("ok ") == 2 * len(INTERP_CASES), out


# ----------------------------------------------------------------------------- GPU


def _torch_merge(W: torch.Tensor, L: int, C: int) -> None:
    """The batched torch.matmul merge the kernels replaced (copies of strided operands), in place."""
    Wl = W.view(-1, L, L)
    n, h = Wl.shape[0], C
    while h < L:
        size, stride = (n, L // (2 * h), h, h), (L * L, 2 * h * L + 2 * h, L, 1)
        n11, a21, n22 = (Wl.as_strided(size, stride, off) for off in (0, h * L, h * L + h))
        a21.copy_(torch.matmul(n22, torch.matmul(a21, n11)))
        h *= 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("L,C,leaves,tile,gemm_min", [(512, 32, 12, 32, 0), (1024, 32, 4, 32, 0), (512, 32, 12, 64, 0),
                                                      (1024, 32, 4, 32, 128), (512, 32, 12, 32, 32)])
def test_gpu_merge_kernels_equal_torch_matmul_merge(L, C, leaves, tile, gemm_min):
    """Random leaves as leaf_prep_kernel leaves them (A below the diagonal blocks, inverses of the
    C x C diagonal blocks of I - A, zeros above): the merges' W (kernels, and cuBLAS from block size
    gemm_min on) equals the torch merge's in fp32."""
    from sessa_scale.ops.feedback_leaves import _merge_leaf_inverses, fp32_matmul

    gen = torch.Generator().manual_seed(L)
    A = torch.rand(leaves, L, L, generator=gen, dtype=torch.float64).tril(-1)
    A *= 0.99 / A.sum(-1, keepdim=True).clamp_min(1e-30)  # rows of a gamma*softmax: sums < 1
    W = A.clone()
    blk = torch.arange(L) // C
    W[:, blk[:, None] < blk[None, :]] = 0.0
    eye = torch.eye(C, dtype=torch.float64)
    for i in range(0, L, C):
        W[:, i:i + C, i:i + C] = torch.linalg.inv(eye - A[:, i:i + C, i:i + C])
    W = W.float().cuda().reshape(2, leaves // 2 * L, L)
    got, want = W.clone(), W.clone()
    _merge_leaf_inverses(got, L, C, "ieee", tile, gemm_min)
    with fp32_matmul("ieee"):
        _torch_merge(want, L, C)
    assert _rel(got, want) < 1e-5
    exact = torch.linalg.inv(torch.eye(L, dtype=torch.float64) - A)
    assert _rel(got.reshape(leaves, L, L).cpu(), exact) < 1e-5


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interp-worker":
        _interp_worker(sys.argv[2])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --interp-worker float32|float64")
