"""Per-token-group dynamic FP8 quantisation of activations (the input side of block-FP8 linears).

    block_fp8_quant(x [M, K] f16/bf16/f32, group_size=128) -> GroupQuant(q [M, K] float8_e4m3fn,
                                                                        scale [M, ceil(K / group)] f32)

Per row m and group g of `group_size` columns (the last one may be partial), as
`block_fp8_quant_ref` computes it, bit for bit:

    scale[m, g] = max(max |x[m, g]|, 1e-10) / 448        q[m, k] = e4m3(clamp(x[m, k] / scale, +-448))

e4m3() rounds to nearest, ties to even, as torch's cast does. The kernel rounds onto the e4m3 grid
itself in float32 (`_round_to_e4m3`) and then casts a value the format holds exactly: the Triton
interpreter's own float32 -> fp8 cast rounds ties away from zero and loses the carry into the next
binade (127.9 -> 64), and this way every backend gives the same bits. Divisions use `div_rn`
(IEEE), not the GPU's default approximate division, for the same reason.

One program handles GROUPS groups of one row: a [GROUPS, group_size] tile, so short rows (decode)
and long rows (K = 18432) both launch few programs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deepserve.kernels.sizes import cdiv, next_power_of_2

from deepserve.quant.block_fp8_ref import AMAX_EPS, FP8_DTYPE, FP8_MAX, block_fp8_quant_ref

__all__ = ["GroupQuant", "block_fp8_quant", "block_fp8_quant_ref"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_TILE_ELEMENTS = 1024  # groups per program: as many as fit in this many elements


class GroupQuant(NamedTuple):
    q: torch.Tensor  # [M, K] float8_e4m3fn
    scale: torch.Tensor  # [M, ceil(K / group_size)] f32: x[m, k] ~ q[m, k] * scale[m, k // group_size]


@triton.jit
def _rint(t):
    """Round half to even for |t| < 2^22: adding 1.5 * 2^23 leaves no fraction bits."""
    return (t + 12582912.0) - 12582912.0


@triton.jit
def _round_to_e4m3(v):
    """float32 v with |v| <= 448 -> the nearest float8_e4m3fn value (ties to even), as float32.

    e4m3 keeps 3 fraction bits: in [2^e, 2^(e+1)) the spacing is 2^(e-3); below 2^-6 (subnormals)
    it is 2^-9. Scaling by powers of two is exact, so only `_rint` rounds. The sign is re-applied
    from the input's sign bit (so -0.0 and small negatives keep it, as torch's cast does) by bit
    operations: `-mag` would not do, Triton 3.6 compiles unary minus as 0 - mag (+0.0 for +0.0)."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3)
    inv_step = ((3 - exponent + 127) << 23).to(tl.float32, bitcast=True)  # 2^(3-e)
    mag = _rint(tl.abs(v) * inv_step) * step  # >= +0.0
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    return (mag.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _block_fp8_quant_kernel(x_ptr, q_ptr, s_ptr, K, num_groups, stride_xm, stride_qm, stride_sm,
                            GROUP: tl.constexpr, GROUPS: tl.constexpr, EPS: tl.constexpr,
                            FP8_MAX: tl.constexpr):
    """Program (row, chunk): groups [chunk * GROUPS, (chunk + 1) * GROUPS) of one row."""
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)  # [GROUPS]
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [GROUPS, GROUP]
    mask = (groups[:, None] < num_groups) & (cols < K)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), EPS)  # [GROUPS]
    scale = tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32))
    y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + row * stride_qm + cols, _round_to_e4m3(y).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + groups, scale, mask=groups < num_groups)


def _check(x: torch.Tensor, group_size: int) -> None:
    if x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"x must be [M, K] f16/bf16/f32, got {tuple(x.shape)} {x.dtype}")
    if x.shape[1] and x.stride(1) != 1:
        raise ValueError("x must be unit-stride in its last dim")
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size}")


def block_fp8_quant(x: torch.Tensor, group_size: int = 128) -> GroupQuant:
    """x [M, K] f16/bf16/f32 (rows may be strided) -> GroupQuant(q [M, K] e4m3, scale [M, G] f32)."""
    _check(x, group_size)
    m, k = x.shape
    num_groups = cdiv(k, group_size)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, num_groups), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return GroupQuant(q, scale)
    per_program = min(next_power_of_2(num_groups), max(1, _TILE_ELEMENTS // group_size))
    grid = (m, cdiv(num_groups, per_program))
    _block_fp8_quant_kernel[grid](x, q, scale, k, num_groups, x.stride(0), q.stride(0), scale.stride(0),
                                  GROUP=group_size, GROUPS=per_program, EPS=AMAX_EPS, FP8_MAX=FP8_MAX,
                                  num_warps=4)
    return GroupQuant(q, scale)
