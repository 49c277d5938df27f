"""Write the new tokens' MLA cache entries (latent, rope key) into the paged latent cache.

Cache layout (one layer): `kv_cache [num_blocks, block_size, R + Dr]`, the normalised latent in the
first R columns and the rotated shared rope key in the last Dr. Slot `s` is block
`s // block_size`, offset `s % block_size`. Token t goes to slot `slot_mapping[t]`; a negative slot
means "skip" (padding tokens of a CUDA-graph batch), where an indexed copy would wrap to the end.

One program per token copies its latent row and rope row, casting to the cache dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def mla_cache_write_ref(kv_cache: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    """In place. kv_cache [N, bs, R + Dr]; latent [T, R]; rope [T, Dr]; slot_mapping [T] int64 (< 0: skip)."""
    keep = slot_mapping >= 0
    flat = kv_cache.view(-1, kv_cache.shape[2])  # [slots, R + Dr]
    flat[slot_mapping[keep]] = torch.cat([latent[keep], rope[keep]], dim=-1).to(kv_cache.dtype)


@triton.jit
def _mla_cache_write_kernel(
    latent_ptr, rope_ptr, cache_ptr, slot_ptr, stride_lt, stride_rt, stride_cb, stride_co,
    RANK: tl.constexpr, ROPE_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        row = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co
        r = tl.arange(0, BLOCK_R)
        e = tl.arange(0, BLOCK_DR)
        lat = tl.load(latent_ptr + token.to(tl.int64) * stride_lt + r, mask=r < RANK)
        rope = tl.load(rope_ptr + token.to(tl.int64) * stride_rt + e, mask=e < ROPE_DIM)
        tl.store(row + r, lat.to(cache_ptr.dtype.element_ty), mask=r < RANK)
        tl.store(row + RANK + e, rope.to(cache_ptr.dtype.element_ty), mask=e < ROPE_DIM)


def _check(kv_cache: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if kv_cache.dim() != 3 or latent.dim() != 2 or rope.dim() != 2:
        raise ValueError(f"kv_cache [N, bs, R + Dr], latent [T, R], rope [T, Dr] expected; got "
                         f"{tuple(kv_cache.shape)}, {tuple(latent.shape)}, {tuple(rope.shape)}")
    if latent.shape[1] + rope.shape[1] != kv_cache.shape[2]:
        raise ValueError(f"latent {tuple(latent.shape)} + rope {tuple(rope.shape)} do not fill the cache row "
                         f"{kv_cache.shape[2]} (R + Dr)")
    if latent.shape[0] != rope.shape[0] or slot_mapping.shape != (latent.shape[0],):
        raise ValueError(f"latent {tuple(latent.shape)}, rope {tuple(rope.shape)}, slot_mapping "
                         f"{tuple(slot_mapping.shape)} disagree on the number of tokens")
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be int64 or int32, got {slot_mapping.dtype}")
    if latent.stride(1) != 1 or rope.stride(1) != 1 or kv_cache.stride(2) != 1:
        raise ValueError("latent, rope and kv_cache must be contiguous in their last dim")
    if not (latent.device == rope.device == kv_cache.device == slot_mapping.device):
        raise ValueError("latent, rope, kv_cache and slot_mapping must be on one device")


def mla_cache_write(kv_cache: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """In place. kv_cache [N, bs, R + Dr] (bf16/f16/f32); latent [T, R], rope [T, Dr] any float dtype, any
    token stride (e.g. views of one [T, R + Dr] tensor); slot_mapping [T] int64 (< 0: skip)."""
    _check(kv_cache, latent, rope, slot_mapping)
    if latent.shape[0] == 0:
        return
    rank, rope_dim = latent.shape[1], rope.shape[1]
    _mla_cache_write_kernel[(latent.shape[0],)](
        latent, rope, kv_cache, slot_mapping, latent.stride(0), rope.stride(0),
        kv_cache.stride(0), kv_cache.stride(1),
        RANK=rank, ROPE_DIM=rope_dim, BLOCK_R=triton.next_power_of_2(rank),
        BLOCK_DR=triton.next_power_of_2(rope_dim), BLOCK_SIZE=kv_cache.shape[1], num_warps=4,
    )
