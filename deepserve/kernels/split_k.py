"""Split-K (flash-decoding) pieces shared by the decode attention kernels (paged MHA/GQA and MLA).

A decode kernel cuts each sequence's context into `num_splits` chunks; each program writes its
chunk's normalised partial output and log2-sum-exp. `merge_splits` combines them:

    mid_o [B, H, S, D] f32, mid_lse [B, H, S] f32 (log2 domain, -inf for an empty split)
        -> out[b, h] = sum_s 2^(lse_s - max) * mid_o[b, h, s] / sum_s 2^(lse_s - max)

in out's dtype (zeros where every split is empty). `choose_num_splits` and `num_sms` pick S.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.sizes import cdiv, next_power_of_2


_WHOLE_TILE_MAX = 8192  # f32 elements of [S, D] partials one program reads at once


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (any small number under the interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      min_keys_per_split: int = 128, max_splits: int = 64) -> int:
    """Splits per sequence so that batch * H_kv * splits programs fill ~4 waves of `num_sms`,
    each split keeping at least `min_keys_per_split` keys of the longest sequence."""
    programs = batch * num_kv_heads
    wanted = cdiv(4 * num_sms, programs)
    by_length = max(1, max_seq_len // min_keys_per_split)
    return max(1, min(wanted, by_length, max_splits))


def merge_splits_ref(mid_o: torch.Tensor, mid_lse: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Reference: mid_o [B, H, S, D], mid_lse [B, H, S] -> [B, H, D] in out_dtype."""
    lse_max = mid_lse.amax(dim=-1, keepdim=True)
    lse_max = torch.where(torch.isinf(lse_max), torch.zeros_like(lse_max), lse_max)
    w = torch.exp2(mid_lse - lse_max)  # [B, H, S], 0 for empty splits
    total = w.sum(dim=-1, keepdim=True)
    out = (w[..., None] * mid_o).sum(dim=-2) / torch.where(total > 0, total, torch.ones_like(total))
    return out.to(out_dtype)


@triton.jit(do_not_specialize=["num_splits"])  # chosen per step in eager decode
def _merge_kernel(mid_o_ptr, mid_lse_ptr, out_ptr,
                  stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh, num_splits,
                  DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
    """One program per (sequence, head, BLOCK_D columns): the [S, BLOCK_D] partials are read as one tile,
    all splits at once (no serial loop over splits); an empty split's partial is never read."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.arange(0, BLOCK_S)
    lse = tl.load(mid_lse_ptr + b * stride_lb + h * stride_lh + s, mask=s < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp2(lse - lse_max)  # [BLOCK_S], 0 for an empty split, whose partial never counts
    total = tl.sum(w, 0)  # 0 when every split is empty
    o = tl.load(mid_o_ptr + b * stride_mb + h * stride_mh + s[:, None] * stride_ms + d[None, :],
                mask=(w > 0.0)[:, None] & (d[None, :] < DIM), other=0.0)  # [BLOCK_S, BLOCK_D]
    result = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, result.to(out_ptr.dtype.element_ty), mask=d < DIM)


def merge_tiles(splits: int, dim: int) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_D) of the merge: every split at once, D cut so a [BLOCK_S, BLOCK_D] f32 tile stays
    within _WHOLE_TILE_MAX elements (head dims <= 128 with <= 64 splits: the whole row, one program)."""
    block_s = next_power_of_2(splits)
    return block_s, min(next_power_of_2(dim), max(16, _WHOLE_TILE_MAX // block_s))


def merge_splits(mid_o: torch.Tensor, mid_lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """mid_o [B, H, S, D] f32 (unit last stride), mid_lse [B, H, S] f32 -> out [B, H, D] (written, returned)."""
    batch, heads, splits, dim = mid_o.shape
    if mid_lse.shape != (batch, heads, splits) or out.shape != (batch, heads, dim) or mid_o.stride(3) != 1 \
            or out.stride(2) != 1:
        raise ValueError(f"mid_o {tuple(mid_o.shape)}, mid_lse {tuple(mid_lse.shape)} and out "
                         f"{tuple(out.shape)} do not fit [B, H, S, D] / [B, H, S] / [B, H, D]")
    block_s, block_d = merge_tiles(splits, dim)
    _merge_kernel[(batch, heads, cdiv(dim, block_d))](
        mid_o, mid_lse, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), splits,
        DIM=dim, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=4, **pdl_launch(out.device))
    return out
