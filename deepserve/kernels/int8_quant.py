"""Per-token dynamic symmetric INT8 quantisation of activations, optionally fused with residual add +
RMSNorm (the pre-norm block's norm feeding a W8A8 linear).

    int8_quant(x [T, K])                           -> Int8Activations(q [T, K] int8, scale [T] f32, None)
    rms_norm_int8_quant(x, residual, weight, eps)  -> Int8Activations(q, scale, x + residual or None)

Per row t (the math of `deepserve.quant.int8.quantize_per_token_ref`, bit for bit):

    scale_t = max(max_k |v_tk|, 1e-8) / 127,     q_tk = clamp(round(v_tk / scale_t), -127, 127)

with IEEE divisions (`tl.div_rn`) and round-half-to-even (`torch.round`): on the GPU libdevice's
rint (HW_ROUND); under the Triton interpreter, which has no libdevice, the same rounding written with
`floor` (`round_half_even` below, exact for |v| < 2^23).

The fused variant first computes, in registers, what `kernels/rms_norm.py` writes (exactly, up to
the order of the row's sum of squares where the two kernels' warp counts differ: rows above 8192):
    s = x + residual (in x's dtype; stored as the new residual),
    v = weight * (s.f32 * rsqrt(mean(s.f32^2) + eps)).to(x.dtype), rounded to promote(x, weight)
and quantises v; the normalised activations never go to memory. One program per row, the whole row
in registers (K <= 65536), so x is read once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from deepserve.kernels.rms_norm import check_rows, load_row_add_residual, rms_normalize, row_num_warps

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


class Int8Activations(NamedTuple):
    q: torch.Tensor  # [T, K] int8
    scale: torch.Tensor  # [T] f32: row t ~ q[t] * scale[t]
    residual: torch.Tensor | None  # [T, K] x.dtype: x + residual (fused variant with a residual), else None


@triton.jit
def round_half_even(y):
    """float32 -> the nearest integer as float32, ties to even (torch.round); |y| < 2^23."""
    f = tl.floor(y)
    frac = y - f  # exact
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _int8_quant_kernel(x_ptr, res_ptr, w_ptr, q_ptr, scale_ptr, res_out_ptr, hidden,
                       x_stride, res_stride, q_stride, res_out_stride, eps,
                       NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, NORM_DTYPE: tl.constexpr,
                       BLOCK: tl.constexpr, HW_ROUND: tl.constexpr = False):
    """One program per row; NORM: (residual add +) RMSNorm, rounded to NORM_DTYPE, before quantising."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = load_row_add_residual(x_ptr, res_ptr, res_out_ptr, row, cols, mask, x_stride, res_stride, res_out_stride,
                              HAS_RESIDUAL)
    v = x.to(tl.float32)
    if NORM:
        v = rms_normalize(x, w_ptr, cols, mask, hidden, eps).to(NORM_DTYPE).to(tl.float32)
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(v), axis=0), 1e-8), 127.0)
    y = tl.div_rn(v, scale)
    if HW_ROUND:  # one cvt.rni per element on the GPU; the interpreter has no libdevice
        y = libdevice.rint(y)
    else:
        y = round_half_even(y)
    q = tl.minimum(tl.maximum(y, -127.0), 127.0)
    tl.store(q_ptr + row * q_stride + cols, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)


def quant_num_warps(block: int) -> int:
    """Warps for a program holding one row of `block` elements: at most 16 elements per thread up to
    32 warps (a 18944-wide row at 16 warps kept 64 per thread and spilled: 0.68 ms for 8192 rows of
    qwen-7b's down projection input on an H200, 6x its bytes' time)."""
    return max(4, min(32, block // 512))


def _check(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None) -> None:
    """rms_norm's row checks, restricted to the dtypes the kernel stores (f16/bf16/f32)."""
    check_rows(x, residual, weight)
    for name, t in (("x", x), ("weight", weight)):
        if t is not None and t.dtype not in _FLOATS:
            raise ValueError(f"{name} must be f16/bf16/f32, got {t.dtype}")


def _launch(x, residual, weight, eps: float, norm: bool) -> Int8Activations:
    num_tokens, hidden = x.shape
    q = torch.empty((num_tokens, hidden), dtype=torch.int8, device=x.device)
    scale = torch.empty(num_tokens, dtype=torch.float32, device=x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if num_tokens == 0:
        return Int8Activations(q, scale, res_out)
    block = triton.next_power_of_2(hidden)
    res_in = residual if residual is not None else x  # unused pointers when HAS_RESIDUAL is off
    res_dst = res_out if res_out is not None else x
    norm_dtype = torch.promote_types(x.dtype, weight.dtype) if weight is not None else x.dtype
    _int8_quant_kernel[(num_tokens,)](
        x, res_in, weight if weight is not None else x, q, scale, res_dst, hidden,
        x.stride(0), res_in.stride(0), q.stride(0), res_dst.stride(0), eps,
        NORM=norm, HAS_RESIDUAL=residual is not None, NORM_DTYPE=_TL_DTYPES[norm_dtype], BLOCK=block,
        HW_ROUND=x.is_cuda, num_warps=quant_num_warps(block))
    return Int8Activations(q, scale, res_out)


def int8_quant(x: torch.Tensor) -> Int8Activations:
    """x [T, K] f16/bf16/f32 (rows may be strided) -> (q [T, K] int8, scale [T] f32, None)."""
    _check(x, None, None)
    return _launch(x, None, None, 0.0, norm=False)


def rms_norm_int8_quant(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> Int8Activations:
    """x [T, H], residual like x or None, weight [H] -> (q [T, H] int8 of the normalised rows,
    scale [T] f32, x + residual [T, H] x.dtype or None). Inputs are not modified."""
    _check(x, residual, weight)
    return _launch(x, residual, weight, eps, norm=True)


def int8_quant_ref(x: torch.Tensor) -> Int8Activations:
    """Pure-PyTorch reference: `deepserve.quant.int8.quantize_per_token_ref`."""
    from deepserve.quant.int8 import quantize_per_token_ref

    return Int8Activations(*quantize_per_token_ref(x), None)


def rms_norm_int8_quant_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                            eps: float) -> Int8Activations:
    """Pure-PyTorch reference: `kernels.rms_norm.rms_norm_ref`, then the per-token quantisation."""
    from deepserve.kernels.rms_norm import rms_norm_ref  # pure PyTorch part of that module
    from deepserve.quant.int8 import quantize_per_token_ref

    out, new_residual = rms_norm_ref(x, residual, weight, eps)
    return Int8Activations(*quantize_per_token_ref(out), new_residual)
