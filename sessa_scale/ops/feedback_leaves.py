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
    """Precision of fp32 leaf work (the fused path's leaf products, both paths' leaf-inverse merges):
    TF32 when the inputs are half precision (their own products are bf16/fp16), full fp32 otherwise."""
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


# Tiles of the memory-bound row kernels (widen; the GEMM path's delta and scaled rows): whole rows, up to
# ROW_TILE_MAX_BV columns wide, of ROW_TILE entries per operand: many programs per SM (one head of 768 at 16k:
# 32-row tiles of 128 columns ran at a third of the bandwidth)
ROW_TILE, ROW_TILE_MAX_BV = 4096, 2048


def row_tiles(Dv: int) -> tuple[int, int]:
    """(rows BM, columns BV) of a row kernel's tile over rows of Dv entries (BV a power of two; BV < Dv: column steps)."""
    BV = min(ROW_TILE_MAX_BV, triton.next_power_of_2(Dv))
    return max(1, ROW_TILE // BV), BV


def widen(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src) for (B, T, H, Dv) views with unit last strides, in dst's dtype (the accumulators X / Y
    in ACC from f / ds, half on GPUs) in one Triton pass: torch's casting copy half -> fp32 reads and writes
    at about half the bandwidth (one head of 768 at 16k: 38 us).  Returns dst."""
    B, T, H, Dv = dst.shape
    if src.shape != dst.shape or src.stride(-1) != 1 or dst.stride(-1) != 1:
        raise ValueError(f"widen needs equal (B, T, H, Dv) shapes with unit last strides; got "
                         f"{tuple(src.shape)} {src.stride()} and {tuple(dst.shape)} {dst.stride()}")
    BM, BV = row_tiles(Dv)
    K.widen_kernel[(triton.cdiv(T, BM), B * H)](
        src, dst, T, H, Dv, src.stride(0), src.stride(1), src.stride(2), dst.stride(0), dst.stride(1),
        dst.stride(2), BM=BM, BV=BV, **launch_options(4, 2))
    return dst


def leaf_inverse_shape(B: int, T: int, H: int, L: int) -> tuple[int, int, int]:
    """Shape of the leaf inverses W of leaf_inverses: (B*H, NL*L, L), NL = cdiv(T, L) leaves."""
    return B * H, triton.cdiv(T, L) * L, L


def leaf_inverses(q, k, gamma, lse, cfg, qk_scale: float, fill_below=None, W=None) -> torch.Tensor:
    """W (B*H, NL*L, L) in lse's dtype: per leaf of cfg.L rows the inverse N of (I - gamma*P_leaf),
    lower triangular (rows past T padded with identity), its fp32 products in TF32 for half-precision
    inputs (as the fused path's leaf products).  q, k (B, T, H, Dk) (head stride Dk,
    unit last stride), gamma (B, T, H) contiguous, lse (B*H, T) in base 2.  fill_below(W), when
    given, writes each leaf's gamma*P strictly below the diagonal and zeros elsewhere (the GEMM path,
    on the tensor cores); leaf_prep_kernel then writes only the diagonal blocks' inverses.  W, when
    given (leaf_inverse_shape, lse's dtype, contiguous), is written instead of a new buffer."""
    B, T, H, Dk = q.shape
    C, L = cfg.C, cfg.L
    NL = triton.cdiv(T, L)
    if W is None:
        W = new_buffer(leaf_inverse_shape(B, T, H, L), lse.dtype, q.device)
    if fill_below is not None:
        fill_below(W)
    K.leaf_prep_kernel[(NL * L // C, B * H)](
        q, k, gamma, lse, W, T, H, Dk, qk_scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        gamma.stride(0), gamma.stride(1), NL * L, L, C=C, BK=cfg.BK_PREP, NK=triton.cdiv(Dk, cfg.BK_PREP),
        LOG2C=int(math.log2(C)), PREC="ieee", INV_PREC=leaf_precision(q.dtype), DIAG_ONLY=fill_below is not None,
        **launch_options(cfg.LEAF_WARPS, 2))
    _merge_leaf_inverses(W, L, C, leaf_precision(q.dtype), cfg.MERGE_TILE, cfg.MERGE_GEMM_MIN)
    return W


MERGE_WARPS = 4


def _merge_leaf_inverses(W: torch.Tensor, L: int, C: int, prec: str, tile: int, gemm_min: int = 0) -> None:
    """In place: W (B*H, NL*L, L), contiguous, holds, per leaf, the blocks of A = gamma*P below the
    diagonal, the inverses of the C x C diagonal blocks of (I - A) and zeros above; doubling
    the block size h = C, 2C, ..., L/2, N21 = N22 A21 N11 turns it into the full inverse of (I - A).
    Levels h < gemm_min (all when gemm_min is 0): two launches on W itself (kernels/feedback.py:
    merge_rows_kernel, merge_cols_kernel), no copies, in B x B chunks, B = min(tile, h) (powers of
    two).  Levels h >= gemm_min: cuBLAS (_merge_level_gemm).  prec: "tf32" for half-precision
    inputs (as the leaf products), else "ieee"."""
    assert W.is_contiguous() and W.shape[-1] == L, "the merge kernels address W as (n, L, L) contiguous"
    n = W.numel() // (L * L)
    h = C
    while h < L:
        if 0 < gemm_min <= h:
            _merge_level_gemm(W.view(n, L, L), L, h, prec)
        else:
            B = min(tile, h)
            grid = (h // B * (L // (2 * h)) * n,)
            for kernel in (K.merge_rows_kernel, K.merge_cols_kernel):
                kernel[grid](W, L, H=h, B=B, PREC=prec, **launch_options(MERGE_WARPS, 2))
        h *= 2


def _merge_level_gemm(W: torch.Tensor, L: int, h: int, prec: str) -> None:
    """One merge level on W (n, L, L), contiguous, with batched cuBLAS products over the n leaves, in
    place, no scratch: per block pair at d0, the h x h block above its diagonal (rows d0.., columns
    d0 + h..), zero in W, holds T = A21 N11 while A21 <- N22 T; those blocks are zeroed again at the
    end.  cuBLAS also multiplies the triangular factors' zero halves (twice the merge kernels'
    products), at tensor-core rates the kernels' small chunks do not reach."""
    with fp32_matmul(prec):
        for d0 in range(0, L, 2 * h):
            first, second = slice(d0, d0 + h), slice(d0 + h, d0 + 2 * h)
            above = W[:, first, second]
            torch.bmm(W[:, second, first], W[:, first, first], out=above)
            torch.bmm(W[:, second, second], above, out=W[:, second, first])
    pairs = L // (2 * h)  # every pair's block above the diagonal: one strided view
    W.as_strided((W.shape[0], pairs, h, h), (L * L, 2 * h * (L + 1), L, 1), W.storage_offset() + h).zero_()


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
