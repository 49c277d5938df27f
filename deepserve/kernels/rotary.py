"""Rotary position embedding applied to q and k in one launch, from a cos/sin cache.

Pairings (see `deepserve.layers.rotary`): neox pairs dimension i with i + R/2, interleaved
(DeepSeek) pairs 2i with 2i + 1, where R = 2 * cos.shape[1] is the rotary dimension. With
R < head_dim (partial rotary) only the first R dimensions of each head rotate; the rest are copied
(out of place) or left alone (in place). DeepSeek MLA's rope part is a plain [T, H, R] tensor.
Math is float32; results are rounded to the input dtype, as the eager module does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.sizes import cdiv, next_power_of_2
from deepserve.layers.fused import rotate_eager

_MAX_PAIRS = 512  # rotated pairs per program (q heads x rot_dim / 2): bounds registers


class RotaryOutput(NamedTuple):
    q: torch.Tensor  # [T, Hq, D] q.dtype
    k: torch.Tensor | None  # [T, Hk, D] k.dtype; None when no k was given


@triton.jit
def pair_offsets(half, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Pairs [1, BLOCK_HALF]: (pair index, offset of its first dim, offset of its second dim) in a head."""
    idx = tl.arange(0, BLOCK_HALF)[None, :]
    if INTERLEAVED:
        off1, off2 = 2 * idx, 2 * idx + 1
    else:
        off1, off2 = idx, idx + half
    return idx, off1, off2


@triton.jit
def rotate_pair(x1, x2, cos, sin):
    """The pairs (x1, x2) f32 turned by the angles of (cos, sin) f32 -> (x1 cos - x2 sin, x2 cos + x1 sin) f32.
    Shared with the kernels that fuse this rotation (mla_norm_rope_write): one expression, one rounding."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def load_cos_sin(pos_ptr, cos_ptr, sin_ptr, cos_stride, token, half, BLOCK_HALF: tl.constexpr):
    """cos, sin [1, BLOCK_HALF] f32 (0 past half) at the position of `token`."""
    pos = tl.load(pos_ptr + token).to(tl.int64)
    idx = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_ptr + pos * cos_stride + idx, mask=idx < half, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * cos_stride + idx, mask=idx < half, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def rotated_heads(x_ptr, token, heads, sx_t, sx_h, num_heads, cos, sin, half, BLOCK_HALF: tl.constexpr,
                  INTERLEAVED: tl.constexpr):
    """Heads [BLOCK_H, 1] of one token (those < num_heads), their pairs turned by cos, sin [1, BLOCK_HALF] f32 ->
    (first dims, second dims of the pairs [BLOCK_H, BLOCK_HALF] f32, 0 where masked; their offsets in a head
    [1, BLOCK_HALF]; the mask). Shared with the kernels that fuse this rotation (rope_kv_write)."""
    idx, off1, off2 = pair_offsets(half, BLOCK_HALF, INTERLEAVED)
    mask = (heads < num_heads) & (idx < half)
    src = x_ptr + token * sx_t + heads * sx_h  # [BLOCK_H, 1] pointers
    x1 = tl.load(src + off1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + off2, mask=mask, other=0.0).to(tl.float32)
    o1, o2 = rotate_pair(x1, x2, cos, sin)
    return o1, o2, off1, off2, mask


@triton.jit
def unrotated_dims(x_ptr, token, heads, sx_t, sx_h, num_heads, half, head_dim, BLOCK_REST: tl.constexpr):
    """Dims [2 half, head_dim) of heads [BLOCK_H, 1] of one token, which a partial rotary leaves alone ->
    (values [BLOCK_H, BLOCK_REST] in x's dtype, 0 where masked; their offsets in a head [1, BLOCK_REST]; the mask)."""
    rest = 2 * half + tl.arange(0, BLOCK_REST)[None, :]
    mask = (heads < num_heads) & (rest < head_dim)
    return tl.load(x_ptr + token * sx_t + heads * sx_h + rest, mask=mask, other=0.0), rest, mask


@triton.jit
def _rotate_heads(x_ptr, o_ptr, token, first_head, sx_t, sx_h, so_t, so_h, num_heads, cos, sin, half,
                  head_dim, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
                  INTERLEAVED: tl.constexpr, COPY_REST: tl.constexpr):
    """Rotate heads [first_head, first_head + BLOCK_H) of one token: cos, sin [1, BLOCK_HALF] f32."""
    heads = first_head + tl.arange(0, BLOCK_H)[:, None]
    o1, o2, off1, off2, mask = rotated_heads(x_ptr, token, heads, sx_t, sx_h, num_heads, cos, sin, half, BLOCK_HALF,
                                             INTERLEAVED)
    dst = o_ptr + token * so_t + heads * so_h  # [BLOCK_H, 1] pointers
    tl.store(dst + off1, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + off2, o2.to(o_ptr.dtype.element_ty), mask=mask)
    if COPY_REST:
        rest, offsets, rest_mask = unrotated_dims(x_ptr, token, heads, sx_t, sx_h, num_heads, half, head_dim,
                                                  BLOCK_REST)
        tl.store(dst + offsets, rest, mask=rest_mask)


@triton.jit
def _rotary_kernel(pos_ptr, cos_ptr, sin_ptr, cos_stride,
                   q_ptr, qo_ptr, q_st, q_sh, qo_st, qo_sh, num_q_heads,
                   k_ptr, ko_ptr, k_st, k_sh, ko_st, ko_sh, num_k_heads, half, head_dim,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   BLOCK_REST: tl.constexpr, INTERLEAVED: tl.constexpr, COPY_REST: tl.constexpr,
                   HAS_K: tl.constexpr, PDL: tl.constexpr = False):
    """Program (token, q head block): those q heads, and (first block only) all k heads."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    cos, sin = load_cos_sin(pos_ptr, cos_ptr, sin_ptr, cos_stride, token, half, BLOCK_HALF)
    _rotate_heads(q_ptr, qo_ptr, token, head_block * BLOCK_HQ, q_st, q_sh, qo_st, qo_sh, num_q_heads,
                  cos, sin, half, head_dim, BLOCK_HQ, BLOCK_HALF, BLOCK_REST, INTERLEAVED, COPY_REST)
    if HAS_K:
        if head_block == 0:
            _rotate_heads(k_ptr, ko_ptr, token, 0, k_st, k_sh, ko_st, ko_sh, num_k_heads, cos, sin, half,
                          head_dim, BLOCK_HK, BLOCK_HALF, BLOCK_REST, INTERLEAVED, COPY_REST)


def _check(positions, q, k, cos, sin) -> None:
    if q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"q must be [num_tokens, heads, head_dim] float, got {tuple(q.shape)} {q.dtype}")
    num_tokens, _, head_dim = q.shape
    if k is not None and (k.dim() != 3 or k.shape[0] != num_tokens or k.shape[2] != head_dim):
        raise ValueError(f"k {tuple(k.shape)} must be [{num_tokens}, kv_heads, {head_dim}]")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"positions must be [{num_tokens}] int64/int32, got {tuple(positions.shape)}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.dtype != torch.float32 or sin.stride() != cos.stride():
        raise ValueError("cos and sin must be [max_position, rot_dim / 2] float32 with equal strides")
    if 2 * cos.shape[1] > head_dim:
        raise ValueError(f"rot_dim {2 * cos.shape[1]} exceeds head_dim {head_dim}")
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin), ("positions", positions)):
        if t is not None and (t.stride(-1) != 1 or t.device != q.device):
            raise ValueError(f"{name} must be unit-stride in its last dim and on {q.device}")


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None,
                     cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                     inplace: bool = False) -> RotaryOutput:
    """Rotate q [T, Hq, D] and k [T, Hk, D] (or None) by positions [T] int64.

    cos, sin: [max_position, R / 2] f32 with R <= D (only dims [0, R) of each head rotate).
    q, k: any float dtype, tokens and heads may be strided, last dim unit-stride. Positions must be
    < max_position (not checked: that would need a device sync). inplace=True writes into q and k
    and returns them; otherwise new contiguous tensors are returned.
    """
    _check(positions, q, k, cos, sin)
    q_out = q if inplace else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = None if k is None else (k if inplace else torch.empty(k.shape, dtype=k.dtype, device=k.device))
    num_tokens, head_dim, half = q.shape[0], q.shape[2], cos.shape[1]
    if num_tokens == 0:
        return RotaryOutput(q_out, k_out)
    kk, ko = (k, k_out) if k is not None else (q, q_out)  # placeholders when HAS_K is off
    rest = head_dim - 2 * half
    block_half = next_power_of_2(half)
    block_hq = min(next_power_of_2(q.shape[1]), max(1, _MAX_PAIRS // block_half))
    _rotary_kernel[(num_tokens, cdiv(q.shape[1], block_hq))](
        positions, cos, sin, cos.stride(0),
        q, q_out, q.stride(0), q.stride(1), q_out.stride(0), q_out.stride(1), q.shape[1],
        kk, ko, kk.stride(0), kk.stride(1), ko.stride(0), ko.stride(1), kk.shape[1], half, head_dim,
        BLOCK_HQ=block_hq, BLOCK_HK=next_power_of_2(kk.shape[1]), BLOCK_HALF=block_half, BLOCK_REST=next_power_of_2(max(rest, 1)),
        INTERLEAVED=interleaved, COPY_REST=rest > 0 and not inplace, HAS_K=k is not None,
        num_warps=4, **pdl_launch(q.device))
    return RotaryOutput(q_out, k_out)


def rotary_embedding_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None,
                         cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> RotaryOutput:
    """Pure-PyTorch reference (out of place): `deepserve.layers.rotary.RotaryEmbedding.rotate` math."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [T, 1, R/2]
    return RotaryOutput(rotate_eager(q, c, s, interleaved),
                        None if k is None else rotate_eager(k, c, s, interleaved))
