"""Split-K (flash-decoding) pieces shared by the decode attention kernels (paged MHA/GQA and MLA).

A decode kernel cuts each sequence's context into `num_splits` chunks; each program writes its
chunk's normalised partial output and log2-sum-exp. The merge combines them:

    mid_o [B, H, S, D] f32, mid_lse [B, H, S] f32 (log2 domain, -inf for an empty split)
        -> out[b, h] = sum_s 2^(lse_s - max) * mid_o[b, h, s] / sum_s 2^(lse_s - max)

in out's dtype (zeros where every split is empty). `merge_group` is that merge for a group of heads
(MERGE_G at a time) and a range of D (MERGE_D columns at a time); it runs either

  * in its own launch, `merge_splits` (grid (B, head chunks, D chunks)), or
  * fused into the decode kernel, `merge_if_last` ("last program merges"): every split program of one
    (sequence, head group) increments that group's int32 counter after storing its partials, and the one
    that sees the old value num_splits - 1 merges the group's heads with `merge_group` (same tiles, same
    operations as the separate launch) and sets the counter back to 0. The counters, [B_max, groups] int32
    zeros, belong to the caller and persist across launches (each launch leaves them zero: CUDA-graph
    replays need no memset); `check_split_counters` validates them.

Memory ordering of the fused merge (PTX memory model; the pattern of CUTLASS's split-K semaphore):
  1. a scalar `tl.atomic_add` is executed by ONE thread of the program (Triton's lowering), and its
     release half orders only what that thread has observed. The partials were stored by all threads, so
     a CTA barrier (`tl.debug_barrier`, bar.sync) comes first: every thread's stores happen-before the
     barrier, the barrier before the atomic, and the atomic's gpu-scope release is cumulative over them.
     Without the barrier another warp's stores could still be in flight when the counter says "done".
  2. the atomic's acquire half (acq_rel, gpu scope) in the last program synchronises with every earlier
     program's release (all are RMWs on one counter: a release sequence), so their partials are visible
     to it. Triton broadcasts the atomic's result to the other threads through shared memory behind a
     barrier, and `merge_if_last` adds one more barrier at the top of the merge branch so no load of the
     partials is issued (or hoisted by the compiler) before the acquire.
  3. the reset to 0 is the last access to the counter in the launch (all num_splits increments have
     happened); the next launch that uses it starts after this grid has completed (stream order, or
     `griddepcontrol.wait` under PDL), so it reads 0.
No program waits for another (no spinning), so the scheme cannot deadlock however the programs are
scheduled. Under TRITON_INTERPRET=1 programs run one after another, so the last split merges.

`choose_num_splits` and `num_sms` pick S.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.sizes import cdiv, next_power_of_2


_WHOLE_TILE_MAX = 8192  # f32 elements of [S, D] partials one program reads at once
# The fused merge runs in ONE program, tile after tile, where the separate launch spreads the tiles over
# programs: it is used only where that program has at most this many tiles to walk. W-b1 qwen-7b (GQA group
# 7, 6 splits, D 128) is one tile: the shape measured (run s10g, together with the K/V prefetch). With 64
# splits (a long max_model_len's graphs) the same group is 8 tiles, and MLA's 16 heads x 512 latent columns
# 8 or more: unmeasured, so they keep the separate launch.
MAX_FUSED_MERGE_TILES = 2


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


@triton.jit
def merge_group(mid_o_ptr, mid_lse_ptr, out_ptr, head0, num_heads, stride_mh, stride_ms, stride_lh, stride_oh,
                num_splits, d_start, d_stop, DIM: tl.constexpr, MERGE_G: tl.constexpr, MERGE_S: tl.constexpr,
                MERGE_D: tl.constexpr):
    """Heads head0 .. head0 + num_heads - 1 of one sequence, columns d_start .. d_stop - 1 (MERGE_D at a time):
    mid_o_ptr -> its [H, S, D] f32 partials (unit column stride), mid_lse_ptr -> its [H, S] f32 LSEs (unit
    split stride), out_ptr -> its [H, D] rows. MERGE_G heads at a time, all splits at once ([MERGE_G, MERGE_S]
    LSEs, [MERGE_G, MERGE_S, MERGE_D] partial tiles: no serial loop over splits or over the heads of a tile);
    an empty split's partial is never read."""
    g = tl.arange(0, MERGE_G)
    s = tl.arange(0, MERGE_S)
    for h0 in range(0, num_heads, MERGE_G):
        g_ok = h0 + g < num_heads
        h = head0 + h0 + g  # [G]
        lse = tl.load(mid_lse_ptr + h[:, None] * stride_lh + s[None, :],
                      mask=g_ok[:, None] & (s < num_splits)[None, :], other=float("-inf"))  # [G, S]
        lse_max = tl.max(lse, 1)
        lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
        w = tl.exp2(lse - lse_max[:, None])  # [G, S], 0 for an empty split, whose partial never counts
        total = tl.sum(w, 1)  # [G], 0 when every split is empty
        total = tl.where(total > 0.0, total, 1.0)
        for d0 in range(d_start, d_stop, MERGE_D):
            d = d0 + tl.arange(0, MERGE_D)
            o = tl.load(mid_o_ptr + h[:, None, None] * stride_mh + s[None, :, None] * stride_ms + d[None, None, :],
                        mask=(w > 0.0)[:, :, None] & (d < DIM)[None, None, :], other=0.0)  # [G, S, D]
            result = tl.sum(o * w[:, :, None], 1) / total[:, None]
            tl.store(out_ptr + h[:, None] * stride_oh + d[None, :], result.to(out_ptr.dtype.element_ty),
                     mask=g_ok[:, None] & (d < DIM)[None, :])


@triton.jit(do_not_specialize=["num_splits"])  # chosen per step in eager decode
def _merge_kernel(mid_o_ptr, mid_lse_ptr, out_ptr, num_heads,
                  stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh, num_splits,
                  DIM: tl.constexpr, MERGE_G: tl.constexpr, MERGE_S: tl.constexpr, MERGE_D: tl.constexpr,
                  PDL: tl.constexpr = False):
    """One program per (sequence, MERGE_G heads, MERGE_D columns): `merge_group`."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    b = tl.program_id(0)
    head0 = tl.program_id(1) * MERGE_G
    d0 = tl.program_id(2) * MERGE_D
    merge_group(mid_o_ptr + b * stride_mb, mid_lse_ptr + b * stride_lb, out_ptr + b * stride_ob, head0,
                tl.minimum(MERGE_G, num_heads - head0), stride_mh, stride_ms, stride_lh, stride_oh, num_splits,
                d0, d0 + MERGE_D, DIM, MERGE_G, MERGE_S, MERGE_D)


@triton.jit
def merge_if_last(counter_ptr, mid_o_ptr, mid_lse_ptr, out_ptr, head0, num_heads,
                  stride_mh, stride_ms, stride_lh, stride_oh, num_splits,
                  DIM: tl.constexpr, MERGE_G: tl.constexpr, MERGE_S: tl.constexpr, MERGE_D: tl.constexpr):
    """The fused merge, called by EVERY split program of one (sequence, head group) after it stored its
    partials (an empty split too): counter_ptr -> the group's int32 counter; mid_o_ptr / mid_lse_ptr / out_ptr
    -> the sequence's [H, S, D] / [H, S] / [H, D] rows; the group is heads head0 .. head0 + num_heads - 1.
    The program that arrives last merges them (`merge_group`, the separate launch's tiles) and resets the
    counter to 0. Memory ordering: see the module docstring."""
    tl.debug_barrier()  # every thread's partial stores happen-before the one thread's release below
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")  # programs that arrived before this one
    if arrived == num_splits - 1:
        tl.debug_barrier()  # no load of the partials before the acquire
        merge_group(mid_o_ptr, mid_lse_ptr, out_ptr, head0, num_heads, stride_mh, stride_ms, stride_lh, stride_oh,
                    num_splits, 0, DIM, DIM, MERGE_G, MERGE_S, MERGE_D)
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")  # zero again for the next launch


def merge_tiles(splits: int, dim: int, heads: int) -> tuple[int, int, int]:
    """(MERGE_G, MERGE_S, MERGE_D) of a merge over `heads` heads: every split at once; heads (up to 16) and D
    cut so a [MERGE_G, MERGE_S, MERGE_D] f32 tile stays within _WHOLE_TILE_MAX elements (D at least 16)."""
    block_s = next_power_of_2(splits)
    block_g = min(next_power_of_2(heads), 16, max(1, _WHOLE_TILE_MAX // (block_s * 16)))
    return block_g, block_s, min(next_power_of_2(dim), max(16, _WHOLE_TILE_MAX // (block_s * block_g)))


def fused_merge_args(split_counters: torch.Tensor | None, num_splits: int, dim: int, heads: int,
                     placeholder: torch.Tensor) -> tuple[torch.Tensor, dict[str, object]]:
    """A split kernel's counter argument and its FUSED_MERGE / MERGE_G / MERGE_S / MERGE_D constexprs: the merge
    is fused (`merge_if_last` over groups of `heads` heads, the tiles of `merge_tiles`) when counters are given,
    num_splits > 1 and the last program merges in at most MAX_FUSED_MERGE_TILES tiles; otherwise `placeholder`
    (never read) and fixed constexprs, so the unfused kernel compiles once."""
    if split_counters is None or num_splits == 1 or fused_merge_tiles(num_splits, dim, heads) > MAX_FUSED_MERGE_TILES:
        return placeholder, {"FUSED_MERGE": False, "MERGE_G": 1, "MERGE_S": 1, "MERGE_D": 16}
    merge_g, merge_s, merge_d = merge_tiles(num_splits, dim, heads)
    return split_counters, {"FUSED_MERGE": True, "MERGE_G": merge_g, "MERGE_S": merge_s, "MERGE_D": merge_d}


def fused_merge_tiles(splits: int, dim: int, heads: int) -> int:
    """[MERGE_G, MERGE_S, MERGE_D] tiles one program walks to merge `heads` heads (one after another)."""
    merge_g, _, merge_d = merge_tiles(splits, dim, heads)
    return cdiv(heads, merge_g) * cdiv(dim, merge_d)


def merge_splits(mid_o: torch.Tensor, mid_lse: torch.Tensor, out: torch.Tensor, group: int | None = None
                 ) -> torch.Tensor:
    """mid_o [B, H, S, D] f32 (unit last stride), mid_lse [B, H, S] f32 -> out [B, H, D] (written, returned).
    `group`: the heads the fused path merges together (its tiles: `merge_tiles`, so both paths compute every
    head with the same tile shapes); default all H."""
    group = mid_o.shape[1] if group is None else group
    batch, heads, splits, dim = mid_o.shape
    if mid_lse.shape != (batch, heads, splits) or out.shape != (batch, heads, dim) or mid_o.stride(3) != 1 \
            or out.stride(2) != 1:
        raise ValueError(f"mid_o {tuple(mid_o.shape)}, mid_lse {tuple(mid_lse.shape)} and out "
                         f"{tuple(out.shape)} do not fit [B, H, S, D] / [B, H, S] / [B, H, D]")
    merge_g, merge_s, merge_d = merge_tiles(splits, dim, group)
    _merge_kernel[(batch, cdiv(heads, merge_g), cdiv(dim, merge_d))](
        mid_o, mid_lse, out, heads,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), splits,
        DIM=dim, MERGE_G=merge_g, MERGE_S=merge_s, MERGE_D=merge_d, num_warps=4, **pdl_launch(out.device))
    return out


def check_split_counters(counters: torch.Tensor, batch: int, groups: int, device: torch.device) -> None:
    """ValueError unless `counters` can serve a fused-merge launch of `batch` sequences x `groups` counters:
    int32, on `device`, contiguous, 2-D with at least [batch, groups] (the extra rows and columns are unused)."""
    if counters.dtype != torch.int32:
        raise ValueError(f"split_counters must be int32, got {counters.dtype}")
    if counters.device != device:
        raise ValueError(f"split_counters must be on {device}, got {counters.device}")
    if counters.dim() != 2 or counters.shape[0] < batch or counters.shape[1] < groups:
        raise ValueError(f"split_counters {tuple(counters.shape)} must be 2-D and cover [{batch}, {groups}] "
                         "(batch x counters per sequence)")
    if not counters.is_contiguous():
        raise ValueError("split_counters must be contiguous")
