"""Write the new tokens' MLA cache entries (latent, rope key) into the paged latent cache.

Cache layout (one layer): `kv_cache [num_blocks, block_size, R + Dr]`, the normalised latent in the
first R columns and the rotated shared rope key in the last Dr. Slot `s` is block
`s // block_size`, offset `s % block_size`. Token t goes to slot `slot_mapping[t]`; a negative slot
means "skip" (padding tokens of a CUDA-graph batch), where an indexed copy would wrap to the end.

One program per token copies its latent row and rope row, casting to the cache dtype. An int8 /
float8_e4m3fn cache (`--kv-cache-dtype int8|fp8`) has `kv_scales [num_blocks, block_size]` float32
beside it: the whole row [latent | rope] (MLA's one "KV head") is quantised with ONE scale,
s = max(amax|row|, 1e-8) / QMAX (deepserve/layers/kv_quant.py, whose per-token references this kernel
matches bit for bit: the amax spans both halves, then each half is quantised on the same grid).
One scale rather than one for the latent and one for the rope key: the rope key's range is larger
(mean row amax 11.1 against the latent's 2.8 on the bundled tiny-deepseek-v3), so it sets the grid,
but fake-quantising that model's cache both ways gave no consistent gain for separate scales (int8:
greedy runs forked earlier on 2 of 4 prompts, later on none; fp8: later forks, larger logprob drift),
and one scale keeps the dense format's rule (scales [N, bs] = the cache shape without its last dim).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.int8_quant import round_half_even, round_to_e4m3_grid
from deepserve.kernels.sizes import next_power_of_2
from deepserve.layers.kv_quant import QUANT_MAX, is_quantized, quantize_kv, scales_shape


def mla_cache_write_ref(kv_cache: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor,
                        slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
    """In place. kv_cache [N, bs, R + Dr]; latent [T, R]; rope [T, Dr]; slot_mapping [T] int64 (< 0: skip);
    kv_scales [N, bs] f32 for an 8-bit cache (quantised rows, one scale per row), else None."""
    keep = slot_mapping >= 0
    flat = kv_cache.view(-1, kv_cache.shape[2])  # [slots, R + Dr]
    rows = torch.cat([latent[keep], rope[keep]], dim=-1)  # [T', R + Dr]
    if is_quantized(kv_cache.dtype):
        rows, scales = quantize_kv(rows, kv_cache.dtype)  # [T', R + Dr], [T']
        kv_scales.view(-1)[slot_mapping[keep]] = scales
    flat[slot_mapping[keep]] = rows.to(kv_cache.dtype)


@triton.jit
def _quantize(x, scale, QMAX: tl.constexpr, FP8: tl.constexpr):
    """x [BLOCK] f32, scale f32 -> x / scale clamped to +-QMAX, on the int8 / e4m3 grid (f32)."""
    y = tl.minimum(tl.maximum(tl.div_rn(x, scale), -QMAX), QMAX)
    if FP8:
        return round_to_e4m3_grid(y)
    return round_half_even(y)  # |y| <= 127 after the clamp: the clamp commutes with rounding


@triton.jit
def row_scale(amax, QMAX: tl.constexpr):
    """The scale of a cache row whose largest |value| is amax (f32): max(amax, 1e-8) / QMAX."""
    return tl.div_rn(tl.maximum(amax, 1e-8), QMAX)


@triton.jit
def store_row_part(ptrs, x, mask, scale, QUANT: tl.constexpr, QMAX: tl.constexpr, FP8: tl.constexpr):
    """Part of a cache row at ptrs: x cast to the cache dtype, or (QUANT) x f32 quantised by the row's scale.
    Shared with the kernels that fuse this write (mla_norm_rope_write)."""
    if QUANT:
        x = _quantize(x, scale, QMAX, FP8)
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _mla_cache_write_kernel(
    latent_ptr, rope_ptr, cache_ptr, scale_ptr, slot_ptr, stride_lt, stride_rt, stride_cb, stride_co,
    stride_sb, RANK: tl.constexpr, ROPE_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr, FP8: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        row = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co
        r = tl.arange(0, BLOCK_R)
        e = tl.arange(0, BLOCK_DR)
        lat = tl.load(latent_ptr + token.to(tl.int64) * stride_lt + r, mask=r < RANK)
        rope = tl.load(rope_ptr + token.to(tl.int64) * stride_rt + e, mask=e < ROPE_DIM)
        scale = 1.0  # unused by a float cache
        if QUANT:  # one scale for the whole row [latent | rope]
            lat = tl.where(r < RANK, lat.to(tl.float32), 0.0)
            rope = tl.where(e < ROPE_DIM, rope.to(tl.float32), 0.0)
            scale = row_scale(tl.maximum(tl.max(tl.abs(lat), axis=0), tl.max(tl.abs(rope), axis=0)), QMAX)
            tl.store(scale_ptr + (slot // BLOCK_SIZE) * stride_sb + slot % BLOCK_SIZE, scale)
        store_row_part(row + r, lat, r < RANK, scale, QUANT, QMAX, FP8)
        store_row_part(row + RANK + e, rope, e < ROPE_DIM, scale, QUANT, QMAX, FP8)


def check_latent_scales(kv_cache: torch.Tensor, kv_scales: torch.Tensor | None) -> None:
    """ValueError unless kv_cache [N, bs, R + Dr] is a float cache without scales, or int8 /
    float8_e4m3fn with contiguous float32 kv_scales [N, bs] on its device."""
    if not is_quantized(kv_cache.dtype):
        if kv_scales is not None:
            raise ValueError(f"a {kv_cache.dtype} latent cache takes no kv_scales")
        return
    if kv_scales is None or tuple(kv_scales.shape) != scales_shape(kv_cache.shape) \
            or kv_scales.dtype != torch.float32 or not kv_scales.is_contiguous() or kv_scales.device != kv_cache.device:
        got = None if kv_scales is None else (tuple(kv_scales.shape), kv_scales.dtype)
        raise ValueError(f"an 8-bit latent cache needs contiguous float32 kv_scales {scales_shape(kv_cache.shape)} "
                         f"on its device, got {got}")


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
                    slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
    """In place. kv_cache [N, bs, R + Dr] (bf16/f16/f32, or int8/float8_e4m3fn with kv_scales [N, bs] f32,
    contiguous); latent [T, R], rope [T, Dr] any float dtype, any token stride (e.g. views of one
    [T, R + Dr] tensor); slot_mapping [T] int64 (< 0: skip)."""
    _check(kv_cache, latent, rope, slot_mapping)
    check_latent_scales(kv_cache, kv_scales)
    if latent.shape[0] == 0:
        return
    rank, rope_dim = latent.shape[1], rope.shape[1]
    quant = kv_scales is not None
    _mla_cache_write_kernel[(latent.shape[0],)](
        latent, rope, kv_cache, kv_scales if quant else kv_cache, slot_mapping, latent.stride(0), rope.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_scales.stride(0) if quant else 0,
        RANK=rank, ROPE_DIM=rope_dim, BLOCK_R=next_power_of_2(rank),
        BLOCK_DR=next_power_of_2(rope_dim), BLOCK_SIZE=kv_cache.shape[1], QUANT=quant,
        QMAX=QUANT_MAX.get(kv_cache.dtype, 0.0), FP8=kv_cache.dtype == torch.float8_e4m3fn, num_warps=4,
    )
