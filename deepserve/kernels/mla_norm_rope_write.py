"""MLA's decode-step epilogue of the kv_a projection in one launch: kv_a_layernorm of the latent, the rotary
embedding of q_pe and of the shared rope key, and the paged latent-cache write.

    kv            [T, R + Dr]   the kv_a projection output (rows may be strided): latent = kv[:, :R] (not
                                normalised), k_pe = kv[:, R:] (not rotated)
    norm_weight   [R]           kv_a_layernorm's weight; eps its epsilon
    q_pe          [T, h, Dr]    not rotated; tokens and heads may be strided (a view of the q projection)
    positions     [T] int64;    cos, sin [max_position, Dr / 2] f32 (the whole rope key rotates)
    kv_cache      [N, bs, R + Dr], slot_mapping [T] int64 (< 0: skip), kv_scales [N, bs] f32 (8-bit cache)
    -> q_pe rotated [T, h, Dr] q_pe.dtype, contiguous; cache row of each written token = [rms_norm(latent) |
       rope(k_pe)]

It replaces three launches (kernels/rms_norm.py, kernels/rotary.py over q_pe and k_pe, kernels/mla_cache_write.py)
and matches their composition bit for bit: the normalised latent is rounded to promote(kv, weight) as
`rms_norm` returns it, the rotated rope key to kv's dtype as `rotary_embedding` returns it, then both are cast to
the cache dtype or quantised with one scale per row as `mla_cache_write` stores them. The jitted pieces are
those kernels' own (`rms_normalize`, `rotate_pair`, `store_row_part`, ...), so each rounding step is the same
expression.

Grid (T, 1 + ceil(h / BLOCK_H)): program (t, 0) writes token t's cache row (R + Dr values: the norm's
reduction runs over the whole latent in one program, with the warps of the rms_norm kernel); program (t, b)
rotates q_pe heads of block b - 1, at most rotary.py's _MAX_PAIRS pairs each (V3: h = 128, Dr = 64 gives
16 heads a block, 8 blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.mla_cache_write import _check as check_cache_write
from deepserve.kernels.mla_cache_write import check_latent_scales, mla_cache_write_ref, row_scale, store_row_part
from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.rms_norm import check_rows, load_row_add_residual, rms_norm_ref, rms_normalize, row_num_warps
from deepserve.kernels.rotary import _MAX_PAIRS, _rotate_heads, load_cos_sin, pair_offsets, rotary_embedding_ref
from deepserve.kernels.rotary import _check as check_rotary
from deepserve.kernels.rotary import rotate_pair
from deepserve.kernels.sizes import cdiv, next_power_of_2
from deepserve.layers.kv_quant import QUANT_MAX


@triton.jit
def _rope_key(kv_ptr, token, kv_stride, rank, cos, sin, half, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """k_pe = kv[token, rank:] rotated: (first dims, second dims of the pairs [1, BLOCK_HALF] f32 rounded to kv's
    dtype (0 past half), their offsets in the rope key, the pair mask)."""
    idx, off1, off2 = pair_offsets(half, BLOCK_HALF, INTERLEAVED)
    mask = idx < half
    src = kv_ptr + token * kv_stride + rank
    k1 = tl.load(src + off1, mask=mask, other=0.0).to(tl.float32)
    k2 = tl.load(src + off2, mask=mask, other=0.0).to(tl.float32)
    k1, k2 = rotate_pair(k1, k2, cos, sin)
    kv_dtype = kv_ptr.dtype.element_ty  # the rotary kernel returns k_pe rotated in its own dtype
    return k1.to(kv_dtype).to(tl.float32), k2.to(kv_dtype).to(tl.float32), off1, off2, mask


@triton.jit
def _write_row(kv_ptr, w_ptr, cache_ptr, scale_ptr, token, slot, kv_stride, rank, eps, cos, sin, half,
               stride_cb, stride_co, stride_sb, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr,
               INTERLEAVED: tl.constexpr, ROUND_NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr,
               QMAX: tl.constexpr, FP8: tl.constexpr):
    """Cache slot `slot` = [rms_norm(latent) | rope(k_pe)] of one token, as the three unfused kernels store it."""
    r = tl.arange(0, BLOCK_R)
    x = load_row_add_residual(kv_ptr, kv_ptr, kv_ptr, token, r, r < rank, kv_stride, 0, 0, False)  # [BLOCK_R]
    lat = rms_normalize(x, w_ptr, r, r < rank, rank, eps)  # f32, 0 past rank
    if ROUND_NORM:  # rms_norm returns promote(kv, weight) = kv's dtype
        lat = lat.to(x.dtype).to(tl.float32)
    k1, k2, off1, off2, pair_mask = _rope_key(kv_ptr, token, kv_stride, rank, cos, sin, half, BLOCK_HALF,
                                              INTERLEAVED)
    row = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co
    scale = 1.0  # unused by a float cache
    if QUANT:  # one scale for the whole row [latent | rope]
        amax = tl.maximum(tl.max(tl.abs(lat), axis=0), tl.maximum(tl.max(tl.abs(k1)), tl.max(tl.abs(k2))))
        scale = row_scale(amax, QMAX)
        tl.store(scale_ptr + (slot // BLOCK_SIZE) * stride_sb + slot % BLOCK_SIZE, scale)
    store_row_part(row + r, lat, r < rank, scale, QUANT, QMAX, FP8)
    store_row_part(row + rank + off1, k1, pair_mask, scale, QUANT, QMAX, FP8)
    store_row_part(row + rank + off2, k2, pair_mask, scale, QUANT, QMAX, FP8)


@triton.jit
def _mla_norm_rope_write_kernel(
    kv_ptr, w_ptr, q_ptr, qo_ptr, pos_ptr, cos_ptr, sin_ptr, cache_ptr, scale_ptr, slot_ptr,
    kv_stride, rank, eps, q_st, q_sh, qo_st, qo_sh, num_heads, half, cos_stride, stride_cb, stride_co, stride_sb,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
    ROUND_NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr, FP8: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Program (token, 0): the token's cache row; program (token, b > 0): q_pe heads [(b - 1) BLOCK_H, b BLOCK_H)."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    token = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    cos, sin = load_cos_sin(pos_ptr, cos_ptr, sin_ptr, cos_stride, token, half, BLOCK_HALF)
    if part > 0:
        _rotate_heads(q_ptr, qo_ptr, token, (part - 1) * BLOCK_H, q_st, q_sh, qo_st, qo_sh, num_heads, cos, sin,
                      half, 2 * half, BLOCK_H, BLOCK_HALF, 1, INTERLEAVED, False)
    else:
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            _write_row(kv_ptr, w_ptr, cache_ptr, scale_ptr, token, slot, kv_stride, rank, eps, cos, sin, half,
                       stride_cb, stride_co, stride_sb, BLOCK_R, BLOCK_HALF, INTERLEAVED, ROUND_NORM, BLOCK_SIZE,
                       QUANT, QMAX, FP8)


def _check(kv: torch.Tensor, norm_weight: torch.Tensor, q_pe: torch.Tensor, positions: torch.Tensor,
           cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
           kv_scales: torch.Tensor | None) -> None:
    """ValueError unless the inputs are what each of the three unfused kernels accepts, with kv [T, R + Dr]
    split by norm_weight [R] and q_pe [T, h, Dr] and the whole rope key rotating (2 cos.shape[1] == Dr)."""
    if kv.dim() != 2 or norm_weight.dim() != 1 or q_pe.dim() != 3:
        raise ValueError(f"kv [T, R + Dr], norm_weight [R], q_pe [T, h, Dr] expected; got {tuple(kv.shape)}, "
                         f"{tuple(norm_weight.shape)}, {tuple(q_pe.shape)}")
    rank, rope_dim = norm_weight.shape[0], q_pe.shape[2]
    if kv.shape != (q_pe.shape[0], rank + rope_dim):
        raise ValueError(f"kv {tuple(kv.shape)} must be [{q_pe.shape[0]}, {rank} + {rope_dim}] (q_pe's tokens, "
                         f"norm_weight's R + q_pe's Dr)")
    if cos.dim() != 2 or 2 * cos.shape[1] != rope_dim:
        raise ValueError(f"cos {tuple(cos.shape)} must rotate the whole rope key: [max_position, {rope_dim // 2}]")
    latent, rope = kv[:, :rank], kv[:, rank:]  # [T, R], [T, Dr]
    check_rows(latent, None, norm_weight)
    check_rotary(positions, q_pe, rope.unsqueeze(1), cos, sin)
    check_cache_write(kv_cache, latent, rope, slot_mapping)
    check_latent_scales(kv_cache, kv_scales)


def mla_norm_rope_write(kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, q_pe: torch.Tensor,
                        positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                        kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """kv [T, R + Dr] float (rows may be strided), norm_weight [R] float, q_pe [T, h, Dr] float (tokens and heads
    may be strided), positions [T] int64/int32 (< max_position, not checked), cos, sin [max_position, Dr / 2] f32,
    kv_cache [N, bs, R + Dr] (bf16/f16/f32, or int8/float8_e4m3fn with kv_scales [N, bs] f32), slot_mapping [T]
    int64/int32 (< 0: skip).

    Writes [rms_norm(kv[:, :R]) | rope(kv[:, R:])] into the cache rows of the tokens with a slot (and their
    scales); returns q_pe rotated [T, h, Dr] in q_pe's dtype, a new contiguous tensor. Inputs are not modified.
    """
    _check(kv, norm_weight, q_pe, positions, cos, sin, kv_cache, slot_mapping, kv_scales)
    q_out = torch.empty(q_pe.shape, dtype=q_pe.dtype, device=q_pe.device)  # [T, h, Dr]
    num_tokens, num_heads = q_pe.shape[:2]
    if num_tokens == 0:
        return q_out
    rank, half = norm_weight.shape[0], cos.shape[1]
    block_r, block_half = next_power_of_2(rank), next_power_of_2(half)
    block_h = min(next_power_of_2(num_heads), max(1, _MAX_PAIRS // block_half))
    quant = kv_scales is not None
    _mla_norm_rope_write_kernel[(num_tokens, 1 + cdiv(num_heads, block_h))](
        kv, norm_weight, q_pe, q_out, positions, cos, sin, kv_cache, kv_scales if quant else kv_cache, slot_mapping,
        kv.stride(0), rank, eps, q_pe.stride(0), q_pe.stride(1), q_out.stride(0), q_out.stride(1), num_heads, half,
        cos.stride(0), kv_cache.stride(0), kv_cache.stride(1), kv_scales.stride(0) if quant else 0,
        BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_HALF=block_half, INTERLEAVED=interleaved,
        ROUND_NORM=torch.promote_types(kv.dtype, norm_weight.dtype) == kv.dtype, BLOCK_SIZE=kv_cache.shape[1],
        QUANT=quant, QMAX=QUANT_MAX.get(kv_cache.dtype, 0.0), FP8=kv_cache.dtype == torch.float8_e4m3fn,
        num_warps=row_num_warps(block_r),  # the rms_norm kernel's warps: the same reduction over the latent
        **pdl_launch(kv.device),
    )
    return q_out


def mla_norm_rope_write_ref(kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, q_pe: torch.Tensor,
                            positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                            kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                            kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch reference, the three references composed: rms_norm_ref, rotary_embedding_ref,
    mla_cache_write_ref (in place on kv_cache / kv_scales). Returns q_pe rotated [T, h, Dr]."""
    rank = norm_weight.shape[0]
    latent = rms_norm_ref(kv[:, :rank], None, norm_weight, eps).out  # [T, R]
    q_rot, k_rot = rotary_embedding_ref(positions, q_pe, kv[:, rank:].unsqueeze(1), cos, sin, interleaved)
    mla_cache_write_ref(kv_cache, latent, k_rot.squeeze(1), slot_mapping, kv_scales)
    return q_rot
