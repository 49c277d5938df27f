"""Dequantise an int8 weight into a float matrix: the first half of W8A16's large-M path
(dequantise once per call, then one cuBLAS GEMM), which wins over the in-kernel dequantising GEMM
once M is large enough for the GEMM to be compute bound (see `deepserve.quant.int8`).

    w8a16_dequant(w_q [N, K] int8, w_scale [N] f32, w_zero [N] f32 | None, dtype) -> w [N, K] dtype
    w = ((w_q - w_zero) * w_scale) computed in float32, rounded once to dtype

One pass: int8 read, dtype written (3 bytes per element for bf16), no float32 temporaries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.sizes import cdiv

_BLOCK_N, _BLOCK_K = 16, 256


@triton.jit
def _w8a16_dequant_kernel(q_ptr, scale_ptr, zero_ptr, out_ptr, N, K, stride_qn, stride_on,
                          HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (n-block, k-block): a [BLOCK_N, BLOCK_K] tile."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    mask = n_mask[:, None] & (offs_k < K)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    w = tl.load(q_ptr + rows * stride_qn + offs_k[None, :], mask=mask, other=0).to(tl.float32)
    if HAS_ZERO:
        w = w - tl.load(zero_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
    w = w * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
    tl.store(out_ptr + rows * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def w8a16_dequant(w_q: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """w_q [N, K] int8 (unit stride in K), w_scale [N] f32, w_zero [N] f32 or None -> [N, K] dtype."""
    if w_q.dim() != 2 or w_q.dtype != torch.int8 or w_q.stride(1) != 1:
        raise ValueError(f"weight must be [N, K] int8 with unit stride in K, got {tuple(w_q.shape)} "
                         f"{w_q.dtype} strides {w_q.stride()}")
    n, k = w_q.shape
    for name, t in (("scale", w_scale), ("zero point", w_zero)):
        if t is not None and (t.shape != (n,) or t.dtype != torch.float32 or t.device != w_q.device):
            raise ValueError(f"{name} must be [{n}] float32 on {w_q.device}, got {tuple(t.shape)} {t.dtype}")
    out = torch.empty((n, k), dtype=dtype, device=w_q.device)
    if out.numel() == 0:
        return out
    grid = (cdiv(n, _BLOCK_N), cdiv(k, _BLOCK_K))
    _w8a16_dequant_kernel[grid](w_q, w_scale, w_zero if w_zero is not None else w_scale, out, n, k,
                                w_q.stride(0), out.stride(0), HAS_ZERO=w_zero is not None,
                                BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, num_warps=4)
    return out


def w8a16_dequant_ref(w_q: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
                      dtype: torch.dtype) -> torch.Tensor:
    """Pure-PyTorch reference: `deepserve.quant.int8.dequantize_per_channel_ref`, rounded to dtype."""
    from deepserve.quant.int8 import dequantize_per_channel_ref

    return dequantize_per_channel_ref(w_q, w_scale, w_zero).to(dtype)
