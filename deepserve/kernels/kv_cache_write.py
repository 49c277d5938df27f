"""Write the new tokens' K/V into the paged KV cache.

Cache layout (one layer): `kv_cache [2, num_blocks, block_size, H_kv, D]`, K = [0], V = [1];
slot `s` is block `s // block_size`, offset `s % block_size`. Token t goes to slot
`slot_mapping[t]`; a negative slot means "skip" (padding tokens of a CUDA-graph batch).

One program per token copies its K and V rows ([H_kv, D] each, contiguous in the head dim), casting
to the cache dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def kv_cache_write_ref(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """In place. kv_cache [2, N, bs, H_kv, D]; k, v [T, H_kv, D]; slot_mapping [T] int64 (< 0: skip)."""
    _, num_blocks, block_size, heads, dim = kv_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat = kv_cache.view(2, num_blocks * block_size, heads, dim)  # [2, slots, H_kv, D]
    flat[0, slots] = k[keep].to(kv_cache.dtype)
    flat[1, slots] = v[keep].to(kv_cache.dtype)


@triton.jit
def _kv_cache_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_co, stride_ch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_D)
        mask = (heads[:, None] < NUM_HEADS) & (dims[None, :] < HEAD_DIM)
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        dst = block * stride_cb + offset * stride_co + heads[:, None] * stride_ch + dims[None, :]
        src_k = token.to(tl.int64) * stride_kt + heads[:, None] * stride_kh + dims[None, :]
        src_v = token.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + dims[None, :]
        k = tl.load(k_ptr + src_k, mask=mask)
        v = tl.load(v_ptr + src_v, mask=mask)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, H_kv, D], got {tuple(kv_cache.shape)}")
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
    if kv_cache.stride(4) != 1 or kv_cache.stride(1) != kv_cache.shape[2] * kv_cache.stride(2):
        raise ValueError(f"kv_cache must be contiguous within each block, strides {kv_cache.stride()}")
    if not (k.device == v.device == kv_cache.device == slot_mapping.device):
        raise ValueError("k, v, kv_cache and slot_mapping must be on one device")


def kv_cache_write(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """In place. kv_cache [2, N, bs, H_kv, D] (bf16/f16/f32); k, v [T, H_kv, D] any float dtype,
    any token/head strides (e.g. views of a fused qkv projection); slot_mapping [T] int64 (< 0: skip)."""
    _check(kv_cache, k, v, slot_mapping)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    heads, dim = kv_cache.shape[3], kv_cache.shape[4]
    _kv_cache_write_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=heads, HEAD_DIM=dim, BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(dim), BLOCK_SIZE=kv_cache.shape[2], num_warps=4,
    )
