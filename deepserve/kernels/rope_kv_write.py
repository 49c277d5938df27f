"""The dense (Llama / Qwen2) attention prologue in one launch: the rotary embedding of q and k, and the paged
KV-cache write of the rotated k and of v.

    positions     [T] int64/int32;  cos, sin [max_position, R / 2] f32, R <= D (the rotary module's tables;
                  only dims [0, R) of each head rotate, neox or interleaved pairs: kernels/rotary.py)
    q             [T, H, D]     not rotated; tokens and heads may be strided (a view of the qkv GEMM output)
    k, v          [T, H_kv, D]  k not rotated; strided likewise
    kv_cache      [2, N, bs, H_kv, D] (K = [0], V = [1]), slot_mapping [T] int64/int32 (< 0: skip, CUDA-graph
                  padding), kv_scales [2, N, bs, H_kv] f32 beside an int8 / float8_e4m3fn cache
    -> q rotated [T, H, D] q.dtype, a new contiguous tensor; the cache rows of each written token = (rope(k), v)

It replaces two launches, kernels/rotary.py over q and k and kernels/kv_cache_write.py, and matches them bit for
bit: the rotated k is rounded to k's dtype as `rotary_embedding` returns it, then cast to the cache dtype or
quantised with one scale per (token, head) row as `kv_cache_write` stores it. The jitted pieces are those
kernels' own (`rotated_heads`, `rotate_pair`, `store_rows`, `write_rows`, ...), so each rounding is the same
expression. (On a GPU the compiler contracts rotate_pair's `x1 cos - x2 sin` into an FMA in both kernels
alike: this kernel equals the two kernels there, and the PyTorch reference only up to that contraction.)

Grid (T, 1 + ceil(H / BLOCK_HQ)): program (t, 0) rotates token t's k heads and writes its K and V rows;
program (t, b) rotates q heads of block b - 1, at most rotary.py's _MAX_PAIRS pairs each (qwen-7b: H = 28,
D = 128 gives 8 heads a block, 4 blocks). A slot < 0 skips the cache write, not the rotation of q.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.kv_cache_write import _check as check_cache_write
from deepserve.kernels.kv_cache_write import (kv_cache_write_ref, row_amax, row_scales, slot_rows, store_rows,
                                              write_rows)
from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.rotary import _check as check_rotary
from deepserve.kernels.rotary import (_MAX_PAIRS, _rotate_heads, load_cos_sin, rotary_embedding_ref, rotated_heads,
                                      unrotated_dims)
from deepserve.kernels.sizes import cdiv, next_power_of_2
from deepserve.layers.kv_quant import QUANT_MAX


@triton.jit
def _write_rotated_k(k_ptr, cache_ptr, scale_ptr, token, slot, k_st, k_sh, cos, sin, half, stride_cb, stride_co,
                     stride_ch, stride_sb, stride_so, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     INTERLEAVED: tl.constexpr, HAS_REST: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
                     FP8: tl.constexpr):
    """Token `token`'s k heads rotated into cache slot `slot` >= 0, as rotary_embedding + kv_cache_write store
    them: the pairs rounded to k's dtype, dims past the rotary ones as they are; cast to the cache dtype, or
    quantised with one scale per head over the whole row (pairs and rest)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    k1, k2, off1, off2, mask = rotated_heads(k_ptr, token, heads, k_st, k_sh, NUM_HEADS, cos, sin, half, BLOCK_HALF,
                                             INTERLEAVED)
    k1, k2 = k1.to(k_ptr.dtype.element_ty), k2.to(k_ptr.dtype.element_ty)  # the rotary kernel's output dtype
    rest, rest_offs, rest_mask = k1, off1, mask  # placeholders when every dim rotates
    if HAS_REST:
        rest, rest_offs, rest_mask = unrotated_dims(k_ptr, token, heads, k_st, k_sh, NUM_HEADS, half, HEAD_DIM,
                                                    BLOCK_REST)
    scale = 1.0  # unused by a float cache
    if QUANT:
        k1, k2, rest = k1.to(tl.float32), k2.to(tl.float32), rest.to(tl.float32)
        amax = tl.maximum(row_amax(k1), row_amax(k2))  # [BLOCK_H, 1]
        if HAS_REST:
            amax = tl.maximum(amax, row_amax(rest))
        scale = row_scales(amax, QMAX)
        tl.store(scale_ptr + slot_rows(slot, heads, stride_sb, stride_so, 1, BLOCK_SIZE), scale, mask=heads < NUM_HEADS)
    row = cache_ptr + slot_rows(slot, heads, stride_cb, stride_co, stride_ch, BLOCK_SIZE)  # [BLOCK_H, 1] pointers
    store_rows(row + off1, k1, mask, scale, QUANT, QMAX, FP8)
    store_rows(row + off2, k2, mask, scale, QUANT, QMAX, FP8)
    if HAS_REST:
        store_rows(row + rest_offs, rest, rest_mask, scale, QUANT, QMAX, FP8)


@triton.jit
def _rope_kv_write_kernel(
    pos_ptr, cos_ptr, sin_ptr, cos_stride,
    q_ptr, qo_ptr, q_st, q_sh, qo_st, qo_sh, num_q_heads,
    k_ptr, v_ptr, k_st, k_sh, v_st, v_sh,
    k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
    stride_cb, stride_co, stride_ch, stride_sb, stride_so, half,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_REST: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr, FP8: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Program (token, 0): the token's K and V rows; program (token, b > 0): q heads [(b - 1) BLOCK_HQ, b BLOCK_HQ)."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    token = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    if part > 0:
        cos, sin = load_cos_sin(pos_ptr, cos_ptr, sin_ptr, cos_stride, token, half, BLOCK_HALF)
        _rotate_heads(q_ptr, qo_ptr, token, (part - 1) * BLOCK_HQ, q_st, q_sh, qo_st, qo_sh, num_q_heads, cos, sin,
                      half, HEAD_DIM, BLOCK_HQ, BLOCK_HALF, BLOCK_REST, INTERLEAVED, HAS_REST)
    else:
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            cos, sin = load_cos_sin(pos_ptr, cos_ptr, sin_ptr, cos_stride, token, half, BLOCK_HALF)
            _write_rotated_k(k_ptr, k_cache_ptr, k_scale_ptr, token, slot, k_st, k_sh, cos, sin, half, stride_cb,
                             stride_co, stride_ch, stride_sb, stride_so, NUM_KV_HEADS, HEAD_DIM, BLOCK_HK, BLOCK_HALF,
                             BLOCK_REST, BLOCK_SIZE, INTERLEAVED, HAS_REST, QUANT, QMAX, FP8)
            write_rows(v_ptr, v_cache_ptr, v_scale_ptr, token, slot, v_st, v_sh, stride_cb, stride_co, stride_ch,
                       stride_sb, stride_so, NUM_KV_HEADS, HEAD_DIM, BLOCK_HK, BLOCK_D, BLOCK_SIZE, QUANT, QMAX, FP8)


def _check(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
           kv_scales: torch.Tensor | None) -> None:
    """ValueError unless the inputs are what both unfused kernels accept (rotary_embedding over q and k,
    kv_cache_write of k and v); together they put every tensor on q's device."""
    check_rotary(positions, q, k, cos, sin)
    check_cache_write(kv_cache, k, v, slot_mapping, kv_scales)


def rope_kv_write(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, interleaved: bool, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """positions [T] int64/int32 (< max_position, not checked: that would sync), q [T, H, D], k, v [T, H_kv, D]
    any float dtype (tokens and heads may be strided, unit-stride head dim), cos, sin [max_position, R / 2] f32
    with R <= D, kv_cache [2, N, bs, H_kv, D] (bf16/f16/f32, or int8/float8_e4m3fn with kv_scales
    [2, N, bs, H_kv] f32, contiguous), slot_mapping [T] int64/int32 (< 0: skip).

    Writes rope(k) and v into the cache rows of the tokens with a slot (and their scales); returns q rotated
    [T, H, D] in q's dtype, a new contiguous tensor (the only allocation: CUDA-graph safe). q, k, v are not
    modified. Equals rotary_embedding(positions, q, k, ...) then kv_cache_write(kv_cache, k_rotated, v, ...).
    """
    _check(positions, q, k, v, cos, sin, kv_cache, slot_mapping, kv_scales)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D]
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return q_out
    half, kv_heads = cos.shape[1], k.shape[1]
    rest = head_dim - 2 * half
    block_half = next_power_of_2(half)
    block_hq = min(next_power_of_2(num_heads), max(1, _MAX_PAIRS // block_half))  # rotary.py's q blocks
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    quant = kv_scales is not None
    k_scales, v_scales = (kv_scales[0], kv_scales[1]) if quant else (k_cache, v_cache)  # unused unless quant
    _rope_kv_write_kernel[(num_tokens, 1 + cdiv(num_heads, block_hq))](
        positions, cos, sin, cos.stride(0),
        q, q_out, q.stride(0), q.stride(1), q_out.stride(0), q_out.stride(1), num_heads,
        k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache, v_cache, k_scales, v_scales, slot_mapping,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_scales.stride(0), k_scales.stride(1), half,
        NUM_KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_HQ=block_hq, BLOCK_HK=next_power_of_2(kv_heads),
        BLOCK_HALF=block_half, BLOCK_REST=next_power_of_2(max(rest, 1)),
        BLOCK_D=next_power_of_2(head_dim), BLOCK_SIZE=kv_cache.shape[2], INTERLEAVED=interleaved,
        HAS_REST=rest > 0, QUANT=quant, QMAX=QUANT_MAX.get(kv_cache.dtype, 0.0),
        FP8=kv_cache.dtype == torch.float8_e4m3fn, num_warps=4,
        **pdl_launch(q.device),
    )
    return q_out


def rope_kv_write_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, interleaved: bool, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch reference, the two references composed: rotary_embedding_ref, then kv_cache_write_ref of
    the rotated k and v (in place on kv_cache / kv_scales). Returns q rotated [T, H, D]."""
    q_rot, k_rot = rotary_embedding_ref(positions, q, k, cos, sin, interleaved)  # [T, H, D], [T, H_kv, D]
    kv_cache_write_ref(kv_cache, k_rot, v, slot_mapping, kv_scales)
    return q_rot
