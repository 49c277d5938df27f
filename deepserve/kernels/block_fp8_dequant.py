"""Block-FP8 weight dequantisation on the GPU (loading a block-FP8 checkpoint as bf16, or int8).

    block_fp8_dequant(w [..., N, K] e4m3, scale_inv [..., ceil(N/bn), ceil(K/bk)] f32,
                      block=(128, 128), out_dtype=bf16) -> [..., N, K] out_dtype

out[.., n, k] = w[.., n, k] * scale_inv[.., n // bn, k // bk], computed in float32 and rounded once
to out_dtype, as `block_fp8_dequant_ref`. One program per (bn x bk) block of one matrix (leading
dimensions, e.g. stacked experts, are flattened into the third grid axis); it loads one scale.
Used tensor by tensor while loading, so only one weight is ever held in both formats.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.sizes import cdiv

from deepserve.quant.block_fp8_ref import DEFAULT_BLOCK, FP8_DTYPE, block_fp8_dequant_ref, scale_shape

__all__ = ["block_fp8_dequant", "block_fp8_dequant_ref"]

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _block_fp8_dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wb, stride_wn, stride_sb, stride_sn,
                              stride_ob, stride_on, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (n block, k block, matrix): one scale times one [BLOCK_N, BLOCK_K] tile."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + batch * stride_wb + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :],
                mask=mask, other=0.0)
    scale = tl.load(s_ptr + batch * stride_sb + pid_n * stride_sn + pid_k)
    out = w.to(tl.float32) * scale
    tl.store(out_ptr + batch * stride_ob + rows.to(tl.int64)[:, None] * stride_on + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


def _check(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], out_dtype: torch.dtype) -> None:
    if w.dtype != FP8_DTYPE or w.dim() < 2:
        raise ValueError(f"w must be [..., N, K] float8_e4m3fn, got {tuple(w.shape)} {w.dtype}")
    if tuple(scale_inv.shape) != scale_shape(w.shape, block) or scale_inv.dtype != torch.float32:
        raise ValueError(f"scale_inv {tuple(scale_inv.shape)} {scale_inv.dtype} does not fit w {tuple(w.shape)} "
                         f"with {block[0]}x{block[1]} blocks (expected float32 {scale_shape(w.shape, block)})")
    if any(b < 1 or b & (b - 1) for b in block):
        raise ValueError(f"block {block}: both sizes must be powers of two")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")


def block_fp8_dequant(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                      out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """See the module docstring. Inputs are made contiguous; the output is contiguous."""
    _check(w, scale_inv, block, out_dtype)
    *lead, n, k = w.shape
    w3 = w.contiguous().view(-1, n, k)  # [B, N, K]
    s3 = scale_inv.contiguous().view(-1, *scale_inv.shape[-2:])  # [B, Nb, Kb]
    out = torch.empty((w3.shape[0], n, k), dtype=out_dtype, device=w.device)
    if out.numel() == 0:
        return out.view(*lead, n, k)
    bn, bk = block
    grid = (cdiv(n, bn), cdiv(k, bk), w3.shape[0])
    _block_fp8_dequant_kernel[grid](w3, s3, out, n, k, w3.stride(0), w3.stride(1), s3.stride(0), s3.stride(1),
                                    out.stride(0), out.stride(1), BLOCK_N=bn, BLOCK_K=bk,
                                    num_warps=8 if bn * bk >= 8192 else 4)
    return out.view(*lead, n, k)
