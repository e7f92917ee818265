"""What both paths of the Triton feedback solve share: launch options, the leaf
inverses and the recursive schedule over leaves (see ``kernels/feedback.py`` for the kernels and
``sessa_scale/ops/feedback_triton.py`` for the op)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import triton

from sessa_scale.kernels import feedback as K
from sessa_scale.ops.work_buffers import INTERPRET, new_buffer

LOG2E = 1.4426950408889634  # the kernels work in base 2: P = 2^(scale*log2(e)*q.k - lse)


def launch_options(num_warps: int, num_stages: int) -> dict:
    return {} if INTERPRET else {"num_warps": num_warps, "num_stages": num_stages}


def leaf_precision(product_dtype: torch.dtype) -> str:
    """Precision of the fp32 leaf products: TF32 when the inputs are half precision (their own
    products are bf16/fp16), full fp32 otherwise."""
    return "tf32" if product_dtype in (torch.float16, torch.bfloat16) else "ieee"


@contextmanager
def fp32_matmul(prec: str = "ieee"):
    """torch fp32 matmuls in full fp32 (prec "ieee") or TF32 ("tf32"), whatever the caller's setting."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def leaf_inverses(q, k, gamma, lse, cfg, qk_scale: float, fill_below=None) -> torch.Tensor:
    """W (B*H, NL*L, L) in lse's dtype: per leaf of cfg.L rows the inverse N of (I - gamma*P_leaf),
    lower triangular (rows past T padded with identity), its fp32 products in TF32 for half-precision
    inputs (as the leaf products).  q, k (B, T, H, Dk) (head stride Dk,
    unit last stride), gamma (B, T, H) contiguous, lse (B*H, T) in base 2.  fill_below(W), when
    given, writes each leaf's gamma*P strictly below the diagonal and zeros elsewhere (the GEMM path,
    on the tensor cores); leaf_prep_kernel then writes only the diagonal blocks' inverses."""
    B, T, H, Dk = q.shape
    C, L = cfg.C, cfg.L
    NL = triton.cdiv(T, L)
    W = new_buffer((B * H, NL * L, L), lse.dtype, q.device)
    if fill_below is not None:
        fill_below(W)
    K.leaf_prep_kernel[(NL * L // C, B * H)](
        q, k, gamma, lse, W, T, H, Dk, qk_scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        gamma.stride(0), gamma.stride(1), NL * L, L, C=C, BK=cfg.BK_PREP, NK=triton.cdiv(Dk, cfg.BK_PREP),
        LOG2C=int(math.log2(C)), PREC="ieee", INV_PREC=leaf_precision(q.dtype), DIAG_ONLY=fill_below is not None,
        **launch_options(cfg.LEAF_WARPS, 2))
    _merge_leaf_inverses(W, L, C, leaf_precision(q.dtype), cfg.MERGE_TILE)
    return W


MERGE_WARPS = 4


def _merge_leaf_inverses(W: torch.Tensor, L: int, C: int, prec: str, tile: int) -> None:
    """In place: W (B*H, NL*L, L), contiguous, holds, per leaf, the blocks of A = gamma*P below the
    diagonal, the inverses of the C x C diagonal blocks of (I - A) and zeros above; doubling
    the block size h = C, 2C, ..., L/2, N21 = N22 A21 N11 turns it into the full inverse of (I - A).
    Two launches per level on W itself (kernels/feedback.py: merge_rows_kernel, merge_cols_kernel),
    no copies, in B x B chunks, B = min(tile, h) (powers of two).  prec: "tf32" for half-precision
    inputs (as the leaf products), else "ieee"."""
    assert W.is_contiguous() and W.shape[-1] == L, "the merge kernels address W as (n, L, L) contiguous"
    n = W.numel() // (L * L)
    h = C
    while h < L:
        B = min(tile, h)
        grid = (h // B * (L // (2 * h)) * n,)
        for kernel in (K.merge_rows_kernel, K.merge_cols_kernel):
            kernel[grid](W, L, H=h, B=B, PREC=prec, **launch_options(MERGE_WARPS, 2))
        h *= 2


def schedule(T: int, L: int, leaf, apply, reverse: bool, a: int, n: int) -> None:
    """Recursive solve over the n leaves [a, a + n * L): first half, apply(l0, l1, e0, e1) of the
    block gamma*P[l0:l1, e0:e1] (later rows x earlier columns), second half; reverse (the
    transposed system of the backward) runs the later half first.  A plain function, not a
    self-referencing closure: such a cycle would keep the call's buffers (held by leaf and apply)
    alive until Python's cyclic garbage collector ran."""
    if n == 1:
        leaf(a)
        return
    mid = a + (n // 2) * L
    first, second = ((mid, n - n // 2), (a, n // 2)) if reverse else ((a, n // 2), (mid, n - n // 2))
    schedule(T, L, leaf, apply, reverse, *first)
    apply(mid, min(a + n * L, T), a, mid)
    schedule(T, L, leaf, apply, reverse, *second)
