"""Dispatch for the small fused ops: Triton kernels on CUDA tensors, the eager math elsewhere.

Model layers call these instead of writing the math inline, so the GPU gets one pass over memory
per op while CPU (and any non-CUDA platform) keeps the reference semantics. Every function has
the same results on both paths up to float rounding (see deepserve/kernels/*).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from deepserve.layers.linear_method import PerTokenQuant


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with optional fused residual add, as `RMSNorm.forward`.

    x [..., H], residual like x or None, weight [H]. Returns norm(x) when residual is None,
    else (norm(x + residual), x + residual).
    """
    if not _use_triton(x):
        return _rms_norm_eager(x, residual, weight, eps)
    from deepserve.kernels.rms_norm import rms_norm as kernel

    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # [T, H]
    res2 = None if residual is None else residual.reshape(-1, shape[-1])
    out, new_res = kernel(x2, res2, weight, eps)
    if residual is None:
        return out.view(shape)
    return out.view(shape), new_res.view(shape)


def rms_norm_quant(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                   qdtype: torch.dtype = torch.int8) -> tuple[PerTokenQuant, torch.Tensor | None]:
    """RMSNorm (with optional fused residual add) quantised per token to int8 (or, qdtype float8_e4m3fn, to
    e4m3), the normalised rows never written out: `(PerTokenQuant of rms_norm(x, residual, weight, eps)'s
    normalised output, x + residual or None)`, bit for bit (see kernels/int8_quant.py for the one caveat, the
    order of the row's sum of squares).

    x [..., H], residual like x or None, weight [H] -> (q [..., H] qdtype, scale [...] f32,
    dtype promote(x, weight)), new residual [..., H] x.dtype or None. CUDA: one launch of
    `kernels/int8_quant.rms_norm_int8_quant` (`kernels/fp8_quant.rms_norm_fp8_quant`); elsewhere the eager
    norm, then `quantize_per_token_ref` (`quantize_per_token_fp8_ref`).
    """
    from deepserve.layers.linear_method import PerTokenQuant  # lazy: linear_method imports this module

    if qdtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"rms_norm_quant quantises to int8 or float8_e4m3fn, got {qdtype}")
    fp8 = qdtype == torch.float8_e4m3fn
    shape, dtype = x.shape, torch.promote_types(x.dtype, weight.dtype)
    x2 = x.reshape(-1, shape[-1])  # [T, H]
    res2 = None if residual is None else residual.reshape(-1, shape[-1])
    if _use_triton(x):
        if fp8:
            from deepserve.kernels.fp8_quant import rms_norm_fp8_quant as kernel
        else:
            from deepserve.kernels.int8_quant import rms_norm_int8_quant as kernel

        q, scale, new_res = kernel(x2, res2, weight, eps)
    else:
        from deepserve.quant.fp8 import quantize_per_token_fp8_ref
        from deepserve.quant.int8 import quantize_per_token_ref

        out = _rms_norm_eager(x2, res2, weight, eps)
        out, new_res = (out, None) if residual is None else out
        q, scale = (quantize_per_token_fp8_ref if fp8 else quantize_per_token_ref)(out)
    new_res = None if new_res is None else new_res.view(shape)
    return PerTokenQuant(q.view(shape), scale.view(shape[:-1]), dtype), new_res


def _rms_norm_eager(x, residual, weight, eps):
    if residual is not None:
        x = x + residual
    xf = x.float()
    out = weight * (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return out if residual is None else (out, x)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:]  [..., I]."""
    if not _use_triton(x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    from deepserve.kernels.silu_and_mul import silu_and_mul as kernel

    return kernel(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], x.shape[-1] // 2)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None,
                 cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] (or None) by positions [T] int64, out of place.

    cos, sin: [max_position, R/2] f32, R <= D (the first R dims of each head rotate).
    """
    if _use_triton(q):
        from deepserve.kernels.rotary import rotary_embedding as kernel

        return tuple(kernel(positions, q, k, cos, sin, interleaved))
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [T, 1, R/2]
    return rotate_eager(q, c, s, interleaved), None if k is None else rotate_eager(k, c, s, interleaved)


def rotate_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [T, H, D], cos/sin [T, 1, R/2] -> [T, H, D]: `RotaryEmbedding.rotate` on the first R dims."""
    rot_dim = 2 * cos.shape[-1]
    xf = x[..., :rot_dim].float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = out.to(x.dtype)
    return out if rot_dim == x.shape[-1] else torch.cat((out, x[..., rot_dim:]), dim=-1)
