"""Fused residual add + RMSNorm: one read of x (and residual), one write of out (and the new residual).

Semantics are those of `deepserve.layers.norm.RMSNorm`, rounding included:

    s   = x + residual                     (in x's dtype; the new residual stream)
    out = weight * (s.float() * rsqrt(mean(s.float()^2) + eps)).to(x.dtype)

The statistics are float32 whatever the input dtype; the normalised row is rounded to x's dtype
before the weight multiply (as the module does), and `out` has dtype promote(x.dtype, weight.dtype).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.sizes import next_power_of_2

_MAX_HIDDEN = 65536  # one program holds a whole row in registers


class RMSNormOutput(NamedTuple):
    out: torch.Tensor  # [T, H] promote(x.dtype, weight.dtype)
    residual: torch.Tensor | None  # [T, H] x.dtype: x + residual; None when no residual was given


@triton.jit
def load_row_add_residual(x_ptr, res_ptr, res_out_ptr, row, cols, mask, x_stride, res_stride, res_out_stride,
                          HAS_RESIDUAL: tl.constexpr):
    """Row `row` of x [BLOCK] in x's dtype; HAS_RESIDUAL: + residual (rounded like the eager add),
    stored to res_out. Shared with the kernels that fuse this norm (int8_quant)."""
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * res_out_stride + cols, x, mask=mask)
    return x


@triton.jit
def rms_normalize(x, w_ptr, cols, mask, hidden, eps):
    """x [BLOCK] (one row, x's dtype) -> RMSNorm(x) * w in f32; the normalised row is rounded to x's
    dtype before the weight multiply, as the module does."""
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    return normed * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
                     hidden, x_stride, res_stride, out_stride, res_out_stride, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """One program per row: [BLOCK] covers the whole hidden dimension."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = load_row_add_residual(x_ptr, res_ptr, res_out_ptr, row, cols, mask, x_stride, res_stride, res_out_stride,
                              HAS_RESIDUAL)
    y = rms_normalize(x, w_ptr, cols, mask, hidden, eps)
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def check_rows(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None) -> None:
    """The inputs of a one-row-per-program kernel: x [T, hidden] float (hidden <= _MAX_HIDDEN),
    residual like x, weight [hidden] float (None: no weight), all unit-stride in the last dim and on
    x's device. Also used by the kernels that fuse this norm (int8_quant)."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a [num_tokens, hidden] float tensor, got {tuple(x.shape)} {x.dtype}")
    hidden = x.shape[1]
    if weight is not None and (weight.shape != (hidden,) or not weight.is_floating_point()):
        raise ValueError(f"weight must be [{hidden}] float, got {tuple(weight.shape)} {weight.dtype}")
    if hidden > _MAX_HIDDEN:
        raise ValueError(f"hidden {hidden} exceeds {_MAX_HIDDEN}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    for name, t in (("x", x), ("residual", residual), ("weight", weight)):
        if t is not None and (t.stride(-1) != 1 or t.device != x.device):
            raise ValueError(f"{name} must be unit-stride in its last dim and on {x.device}")


def row_num_warps(block: int) -> int:
    """Warps for a program holding one row of `block` elements."""
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> RMSNormOutput:
    """x [T, H] bf16/f16/f32 (rows may be strided), residual [T, H] like x or None, weight [H].

    Returns (out [T, H] promote(x, weight), new residual [T, H] x.dtype or None). Inputs are not
    modified.
    """
    check_rows(x, residual, weight)
    num_tokens, hidden = x.shape
    out = torch.empty((num_tokens, hidden), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if num_tokens == 0:
        return RMSNormOutput(out, res_out)
    block = next_power_of_2(hidden)
    res_in = residual if residual is not None else x  # unused pointers when HAS_RESIDUAL is off
    res_dst = res_out if res_out is not None else out
    _rms_norm_kernel[(num_tokens,)](
        x, res_in, weight, out, res_dst, hidden, x.stride(0), res_in.stride(0), out.stride(0),
        res_dst.stride(0), eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=row_num_warps(block), **pdl_launch(x.device))
    return RMSNormOutput(out, res_out)


def rms_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> RMSNormOutput:
    """Pure-PyTorch reference with the exact math of `deepserve.layers.norm.RMSNorm`."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return RMSNormOutput(weight * normed, x if residual is not None else None)
