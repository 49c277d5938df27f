"""The dequantising epilogue of a W8A8 GEMM done by cuBLAS (`torch._int_mm`): one pass over the
int32 product instead of four eager ops (convert, two scalings, bias) and their float32 temporaries.

    int8_epilogue(acc [M, N] int32, x_scale [M] f32, w_scale [N] f32, bias [N] | None, out_dtype)
        -> y [M, N] out_dtype,   y = (float(acc) * x_scale[:, None]) * w_scale[None, :] (+ bias)

The float32 operations are those of `int8_gemm`'s fused epilogue, in the same order, so both W8A8
paths give the same numbers, and those of `int8_epilogue_ref` bit for bit: the launch passes
`enable_fp_fusion=False`, otherwise the GPU compiler contracts `(. * w_scale) + bias` into one FMA,
which skips the product's rounding (1 bf16 ulp off the reference on ~0.1% of the outputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.sizes import cdiv

_BLOCK_M, _BLOCK_N = 16, 256


@triton.jit
def _int8_epilogue_kernel(acc_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, stride_am, stride_om,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (m-block, n-block): a [BLOCK_M, BLOCK_N] tile."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    acc = tl.load(acc_ptr + rows * stride_am + offs_n[None, :], mask=mask, other=0)
    x_scale = tl.load(x_scale_ptr + offs_m, mask=m_mask, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def int8_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """acc [M, N] int32 (unit stride in N; rows may be strided), x_scale [M] f32, w_scale [N] f32,
    bias [N] float or None -> [M, N] out_dtype."""
    if acc.dim() != 2 or acc.dtype != torch.int32 or acc.stride(1) != 1:
        raise ValueError(f"acc must be [M, N] int32 with unit stride in N, got {tuple(acc.shape)} {acc.dtype}")
    m, n = acc.shape
    for name, t, size in (("x_scale", x_scale, m), ("w_scale", w_scale, n)):
        if t.shape != (size,) or t.dtype != torch.float32 or t.device != acc.device:
            raise ValueError(f"{name} must be [{size}] float32 on {acc.device}, got {tuple(t.shape)} {t.dtype}")
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point() or bias.device != acc.device):
        raise ValueError(f"bias must be [{n}] float on {acc.device}, got {tuple(bias.shape)} {bias.dtype}")
    out = torch.empty((m, n), dtype=out_dtype, device=acc.device)
    if out.numel() == 0:
        return out
    grid = (cdiv(m, _BLOCK_M), cdiv(n, _BLOCK_N))
    _int8_epilogue_kernel[grid](acc, x_scale, w_scale, bias if bias is not None else w_scale, out, m, n,
                                acc.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                                BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, num_warps=4, enable_fp_fusion=False)
    return out


def int8_epilogue_ref(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """Pure-PyTorch reference (the CPU method's eager ops)."""
    y = acc.float() * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
