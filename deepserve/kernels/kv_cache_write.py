"""Write the new tokens' K/V into the paged KV cache, quantising them for an 8-bit cache.

Cache layout (one layer): `kv_cache [2, num_blocks, block_size, H_kv, D]`, K = [0], V = [1];
slot `s` is block `s // block_size`, offset `s % block_size`. Token t goes to slot
`slot_mapping[t]`; a negative slot means "skip" (padding tokens of a CUDA-graph batch).
An int8 / float8_e4m3fn cache has `kv_scales [2, num_blocks, block_size, H_kv]` float32 beside it:
each row (token, head) is stored as q = round(x / s) with s = max(amax|x|, 1e-8) / QMAX
(deepserve/layers/kv_quant.py, whose references this kernel matches bit for bit: IEEE divisions,
ties to even, e4m3 rounding done on the float32 grid as in kernels/fp8_quant.py).

One program per token copies (or quantises) its K and V rows ([H_kv, D] each, contiguous in the
head dim), casting to the cache dtype. `load_kv_tile` (with `load_kv_scales`) is the paged attention
kernels' read of a K/V tile and its scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.int8_convert import int8_to_f32
from deepserve.kernels.int8_quant import round_half_even, round_to_e4m3_grid
from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.sizes import next_power_of_2
from deepserve.layers.kv_quant import QUANT_MAX, dequantize_kv, is_quantized, quantize_kv, scales_shape


def kv_cache_write_ref(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
    """In place. kv_cache [2, N, bs, H_kv, D]; k, v [T, H_kv, D]; slot_mapping [T] int64 (< 0: skip);
    kv_scales [2, N, bs, H_kv] f32 for an 8-bit cache (quantised rows, their scales), else None."""
    _, num_blocks, block_size, heads, dim = kv_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat = kv_cache.view(2, num_blocks * block_size, heads, dim)  # [2, slots, H_kv, D]
    new = torch.stack([k[keep], v[keep]])  # [2, T', H_kv, D]
    if is_quantized(kv_cache.dtype):
        new, scales = quantize_kv(new, kv_cache.dtype)  # [2, T', H_kv, D], [2, T', H_kv]
        kv_scales.view(2, num_blocks * block_size, heads)[:, slots] = scales
    flat[:, slots] = new.to(kv_cache.dtype)


def dequantized_cache_ref(kv_cache: torch.Tensor, kv_scales: torch.Tensor | None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The cache as the attention kernels read it: [2, N, bs, H_kv, D] in `dtype` (q * s when 8-bit)."""
    if kv_scales is None:
        return kv_cache.to(dtype)
    return dequantize_kv(kv_cache, kv_scales, dtype)


@triton.jit
def load_kv_scales(k_scale_ptr, v_scale_ptr, page, offset, kv_head, mask, stride_sb, stride_so):
    """Scales [BLOCK_N] f32 of the K and V rows at (page, offset, kv_head) [BLOCK_N]; 0 where masked."""
    rows = page * stride_sb + offset * stride_so + kv_head
    return tl.load(k_scale_ptr + rows, mask=mask, other=0.0), tl.load(v_scale_ptr + rows, mask=mask, other=0.0)


@triton.jit
def tile_scores(q, k, k_scale, scale_log2, DOT_PRECISION: tl.constexpr, KV_SCALED: tl.constexpr):
    """The attention kernels' scores of q [BLOCK_Q, BLOCK_D] against a `load_kv_tile` key tile
    [BLOCK_N, BLOCK_D]: (q k^T (* k_scale per key column on an 8-bit cache)) * scale_log2, in float32,
    [BLOCK_Q, BLOCK_N]; masking is the caller's."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if KV_SCALED:  # 8-bit cache: K's per-key scales on the score columns (V came dequantised, f32)
        s = s * k_scale[None, :]
    return s * scale_log2


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, kv_head, pos, p_mask, d, d_mask,
                 stride_cb, stride_co, stride_ch, stride_sb, stride_so, DTYPE: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, KV_SCALED: tl.constexpr, PTX: tl.constexpr = False):
    """The attention kernels' read of BLOCK_N keys: positions pos [BLOCK_N] (valid where p_mask) of
    kv_head, gathered through the block table row `table`, head dim d [BLOCK_D] (valid where d_mask).
    Returns K [BLOCK_N, BLOCK_D] in DTYPE (exact from an 8-bit cache), V [BLOCK_N, BLOCK_D] and K's
    per-key scales [BLOCK_N] f32. KV_SCALED (8-bit cache): V is dequantised in float32 (v * s_v) and
    the caller multiplies the scales into its score columns (q.k * s_k); otherwise V keeps the cache
    dtype and the scales are a placeholder 1.0. Masked rows are 0. An int8 cache converts through
    `int8_convert.int8_to_f32` (PTX: its inline-assembly form), not I2F, the conversion that bounded this read
    (run s11a: W-offline qwen-7b with --kv-cache-dtype int8 ran slower than with the bf16 cache)."""
    page = tl.load(table + pos // BLOCK_SIZE, mask=p_mask, other=0).to(tl.int64)
    rows = page * stride_cb + (pos % BLOCK_SIZE) * stride_co + kv_head * stride_ch  # [BLOCK_N]
    kv_mask = p_mask[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    if k_cache_ptr.dtype.element_ty == tl.int8:
        k = int8_to_f32(k, PTX)
        v = int8_to_f32(v, PTX)
    k = k.to(DTYPE)  # exact: an 8-bit value fits bf16 / f16
    k_scale = 1.0
    if KV_SCALED:
        k_scale, v_scale = load_kv_scales(k_scale_ptr, v_scale_ptr, page, pos % BLOCK_SIZE, kv_head, p_mask,
                                          stride_sb, stride_so)
        v = v.to(tl.float32) * v_scale[:, None]
    return k, v, k_scale


@triton.jit
def slot_rows(slot, heads, stride_b, stride_o, stride_h, BLOCK_SIZE: tl.constexpr):
    """Offsets of the rows of `heads` (any shape) at cache slot `slot` >= 0: block slot // BLOCK_SIZE, offset
    slot % BLOCK_SIZE, with the cache's (or its scales') strides of a block, an offset and a head."""
    return (slot // BLOCK_SIZE) * stride_b + (slot % BLOCK_SIZE) * stride_o + heads * stride_h


@triton.jit
def row_amax(x):
    """x [BLOCK_H, N] f32 (0 in padding) -> max |x| of each row [BLOCK_H, 1]."""
    return tl.max(tl.abs(x), axis=1, keep_dims=True)


@triton.jit
def row_scales(amax, QMAX: tl.constexpr):
    """The scales of cache rows whose largest |value| is amax (f32, [BLOCK_H, 1]): max(amax, 1e-8) / QMAX."""
    return tl.div_rn(tl.maximum(amax, 1e-8), QMAX)


@triton.jit
def store_rows(ptrs, x, mask, scale, QUANT: tl.constexpr, QMAX: tl.constexpr, FP8: tl.constexpr):
    """Rows x [BLOCK_H, N] (or a part of each: its columns at ptrs) cast to the cache dtype, or (QUANT) x f32
    divided by its row's scale [BLOCK_H, 1], clamped to +-QMAX and rounded onto the int8 / e4m3 grid.
    Shared with the kernels that fuse this write (rope_kv_write)."""
    if QUANT:
        y = tl.minimum(tl.maximum(tl.div_rn(x, scale), -QMAX), QMAX)
        if FP8:
            x = round_to_e4m3_grid(y)
        else:
            x = round_half_even(y)  # |y| <= 127 after the clamp: the clamp commutes with rounding
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def write_rows(x_ptr, cache_ptr, scale_ptr, token, slot, stride_xt, stride_xh, stride_cb, stride_co, stride_ch,
               stride_sb, stride_so, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
               FP8: tl.constexpr):
    """One token's rows x [NUM_HEADS, HEAD_DIM] (its K or its V; token int64) into cache slot `slot` >= 0, and
    (QUANT) their scales. Shared with the kernels that fuse this write (rope_kv_write)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM)
    x = tl.load(x_ptr + token * stride_xt + heads * stride_xh + dims, mask=mask, other=0.0)  # [BLOCK_H, BLOCK_D]
    scale = 1.0  # unused by a float cache
    if QUANT:
        x = x.to(tl.float32)
        scale = row_scales(row_amax(x), QMAX)
        tl.store(scale_ptr + slot_rows(slot, heads, stride_sb, stride_so, 1, BLOCK_SIZE), scale,
                 mask=heads < NUM_HEADS)
    store_rows(cache_ptr + slot_rows(slot, heads, stride_cb, stride_co, stride_ch, BLOCK_SIZE) + dims, x, mask,
               scale, QUANT, QMAX, FP8)


@triton.jit
def _kv_cache_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_co, stride_ch, stride_sb, stride_so,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr, FP8: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        write_rows(k_ptr, k_cache_ptr, k_scale_ptr, token, slot, stride_kt, stride_kh, stride_cb, stride_co, stride_ch,
                   stride_sb, stride_so, NUM_HEADS, HEAD_DIM, BLOCK_H, BLOCK_D, BLOCK_SIZE, QUANT, QMAX, FP8)
        write_rows(v_ptr, v_cache_ptr, v_scale_ptr, token, slot, stride_vt, stride_vh, stride_cb, stride_co, stride_ch,
                   stride_sb, stride_so, NUM_HEADS, HEAD_DIM, BLOCK_H, BLOCK_D, BLOCK_SIZE, QUANT, QMAX, FP8)


def check_cache(kv_cache: torch.Tensor, kv_scales: torch.Tensor | None, float_dtype: torch.dtype | None = None) -> None:
    """ValueError unless kv_cache [2, N, bs, H_kv, D] is either in `float_dtype` (any float when
    None) without scales, or int8 / float8_e4m3fn with contiguous f32 kv_scales [2, N, bs, H_kv]."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, H_kv, D], got {tuple(kv_cache.shape)}")
    if not is_quantized(kv_cache.dtype):
        if kv_scales is not None:
            raise ValueError(f"a {kv_cache.dtype} kv_cache takes no kv_scales")
        if float_dtype is not None and kv_cache.dtype != float_dtype:
            raise ValueError(f"kv_cache must be {float_dtype} (q's dtype) or int8 / float8_e4m3fn, got {kv_cache.dtype}")
        return
    if kv_scales is None or tuple(kv_scales.shape) != scales_shape(kv_cache.shape) \
            or kv_scales.dtype != torch.float32 or not kv_scales.is_contiguous():
        got = None if kv_scales is None else (tuple(kv_scales.shape), kv_scales.dtype)
        raise ValueError(f"an 8-bit kv_cache needs contiguous float32 kv_scales {scales_shape(kv_cache.shape)}, "
                         f"got {got}")
    if kv_scales.device != kv_cache.device:
        raise ValueError("kv_cache and kv_scales must be on one device")


def _check(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
           kv_scales: torch.Tensor | None) -> None:
    check_cache(kv_cache, kv_scales)
    if kv_cache.stride(4) != 1 or kv_cache.stride(1) != kv_cache.shape[2] * kv_cache.stride(2):
        raise ValueError(f"kv_cache must be contiguous within each block, strides {kv_cache.stride()}")
    heads, dim = kv_cache.shape[3], kv_cache.shape[4]
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or tuple(t.shape[1:]) != (heads, dim):
            raise ValueError(f"{name} must be [T, {heads}, {dim}], got {tuple(t.shape)}")
        if t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in the head dim, strides {t.stride()}")
    if k.shape[0] != v.shape[0] or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)}, slot_mapping {tuple(slot_mapping.shape)} disagree")
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be int64 or int32, got {slot_mapping.dtype}")
    if not (k.device == v.device == kv_cache.device == slot_mapping.device):
        raise ValueError("k, v, kv_cache and slot_mapping must be on one device")


def kv_cache_write(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                   kv_scales: torch.Tensor | None = None) -> None:
    """In place. kv_cache [2, N, bs, H_kv, D] (bf16/f16/f32, or int8/float8_e4m3fn with kv_scales
    [2, N, bs, H_kv] f32, contiguous); k, v [T, H_kv, D] any float dtype, any token/head strides
    (e.g. views of a fused qkv projection); slot_mapping [T] int64 (< 0: skip)."""
    _check(kv_cache, k, v, slot_mapping, kv_scales)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    quant = kv_scales is not None
    k_scales, v_scales = (kv_scales[0], kv_scales[1]) if quant else (k_cache, v_cache)  # unused unless quant
    heads, dim = kv_cache.shape[3], kv_cache.shape[4]
    _kv_cache_write_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, k_scales, v_scales, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_scales.stride(0), k_scales.stride(1),
        NUM_HEADS=heads, HEAD_DIM=dim, BLOCK_H=next_power_of_2(heads),
        BLOCK_D=next_power_of_2(dim), BLOCK_SIZE=kv_cache.shape[2], QUANT=quant,
        QMAX=QUANT_MAX.get(kv_cache.dtype, 0.0), FP8=kv_cache.dtype == torch.float8_e4m3fn, num_warps=4,
        **pdl_launch(kv_cache.device),
    )
