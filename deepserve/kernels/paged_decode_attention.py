"""Decode attention over a paged KV cache: one query token per sequence, GQA, split-K.

Shapes: q [B, H, D]; kv_cache [2, num_blocks, block_size, H_kv, D] (K = [0], V = [1]);
block_tables [B, W] int32; seq_lens [B] int32 (context length including the new token, whose K/V
are already in the cache) -> out [B, H, D] in q's dtype.
An int8 / float8_e4m3fn cache comes with kv_scales [2, num_blocks, block_size, H_kv] f32 (one per
row, deepserve/layers/kv_quant.py), dequantised right after each tile load: K's 8-bit values convert
exactly to q's dtype and its per-key scales multiply the score columns (q.k * s_k, no scaled K
rounded to bf16); V is dequantised in float32 (v * s_v) and rounded once to q's dtype, as a cache in
that dtype would hold it. Compute stays in q's dtype with float32 accumulation.

Flash-decoding:
  1. `_decode_split_kernel`, grid (B, H_kv, num_splits): the G = H / H_kv query heads sharing one
     KV head are one [G, D] tile, so each K/V row is read once per KV head. Sequence b's context is
     cut into `num_splits` contiguous chunks (chunk length computed in the kernel from seq_lens[b],
     a multiple of BLOCK_N); each program runs an online softmax over its chunk, BLOCK_N keys at a
     time (keys are gathered through the block table, so any block_size works), and writes its
     normalised partial output [G, D] and log2-sum-exp [G] in fp32.
  2. the merge of the splits' partials with their LSE weights (`split_k.merge_group`: a group of heads,
     all splits at once), either
       * fused (`split_counters` given and a merge of at most split_k.MAX_FUSED_MERGE_TILES tiles: up to 16
         splits for a group of 7 heads of 128 columns): each program then increments its (sequence, KV head)
         counter and the last of the num_splits programs to arrive merges the G heads (`split_k.merge_if_last`, which
         documents the memory ordering) and resets the counter: ONE launch. The separate launch runs the
         same `merge_group` with the same tiles (`merge_tiles` of G heads), so the two paths give the same
         values (tests/kernels/test_decode_fused_merge.py, interpreter and one real shape on the GPU);
       * or in a second launch, `split_k.merge_splits` (`split_counters` None).
The split count (`choose_num_splits`, at least BLOCK_N keys a split) fills the SMs at batch 1: the W-b1
shape (384-token graphs, 4 KV heads) runs 6 splits of one 64-key tile each.

PDL and `prefetch_kv=True` (TritonAttention's decode: the kernel just before is the cache write of each
sequence's newest key): a program reads seq_lens, its block-table entries and its first tile's keys but
the newest BEFORE the PDL wait, i.e. while the cache write still runs, and the newest key (a masked load
of the same tile, combined with tl.where) after it. Nothing on the stream writes those older rows: the
kernels before the cache write have completed (kernels/pdl.py), and the write touches only the newest
slots. A split whose chunk is one tile then has every key in flight before the wait.
Measured only together (run s10g, H200, W-b1 qwen-7b, this tree against be6adbd in one call): bf16
3.658 vs 3.755 ms per token, W8A16 2.500 / 2.502 vs 2.515 / 2.516 (with the gated GEMV of kernels/gemv.py
and the fused merge); the W-b1 profile's attention went from 13.0 to 6.4 us a layer (exposed time, s10a and
s10b: two cards, not an A/B).
With one split the first kernel writes `out` directly and there is no merge.

Because chunking is derived in the kernel from seq_lens and num_splits, a launch depends on the
host only through (B, num_splits): fix num_splits and the launch can be captured in a CUDA graph.
Sequences with seq_len 0 (graph padding) produce zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deepserve.kernels.int8_convert import nvidia_ptx
from deepserve.kernels.kv_cache_write import check_cache, dequantized_cache_ref, load_kv_tile, tile_scores
from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.sizes import next_power_of_2
from deepserve.kernels.split_k import (check_split_counters, choose_num_splits, fused_merge_args, merge_if_last,
                                       merge_splits, num_sms)

LOG2E = 1.4426950408889634


def paged_decode_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                               seq_lens: torch.Tensor, scale: float,
                               kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Reference in fp32. q [B, H, D]; kv_cache [2, N, bs, H_kv, D] (8-bit: with kv_scales
    [2, N, bs, H_kv], dequantised first); block_tables [B, W]; seq_lens [B] -> [B, H, D] in q's dtype."""
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    kv_cache = dequantized_cache_ref(kv_cache, kv_scales)
    out = torch.zeros_like(q)
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        blocks = block_tables[b, : (seq_len + block_size - 1) // block_size].long()
        kv = kv_cache[:, blocks].flatten(1, 2)[:, :seq_len]  # [2, S, H_kv, D] f32
        k, v = kv[0].repeat_interleave(q.shape[1] // kv_heads, 1), kv[1].repeat_interleave(q.shape[1] // kv_heads, 1)
        scores = torch.einsum("hd,shd->hs", q[b].float(), k) * scale  # [H, S]
        out[b] = torch.einsum("hs,shd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


@triton.jit
def _split_range(seq_lens_ptr, b, split, num_splits, BLOCK_N: tl.constexpr):
    """(seq_len, start, end) of program `split`'s contiguous chunk of sequence b's context (a multiple of
    BLOCK_N keys; empty when start >= end)."""
    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    return seq_len, start, tl.minimum(start + chunk, seq_len)


@triton.jit
def _softmax_tile(q, k, v, k_scale, p_mask, m, l, acc, scale_log2, DOT_PRECISION: tl.constexpr,
                  KV_SCALED: tl.constexpr):
    """One online-softmax step over a [BLOCK_N] key tile (valid where p_mask) -> the new (m, l, acc). A tile
    with no valid key (an empty split's first tile) leaves l and acc 0 and m -inf."""
    s = tile_scores(q, k, k_scale, scale_log2, DOT_PRECISION, KV_SCALED)  # [BLOCK_G, BLOCK_N]
    s = tl.where(p_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # = m_new but for an all-masked tile: p = alpha = 0
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m - m_use)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return m_new, l, acc


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])  # per-step values: one compile
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, seq_lens_ptr, mid_o_ptr,
    mid_lse_ptr, out_ptr, counters_ptr, scale_log2,
    stride_qb, stride_qh, stride_cb, stride_co, stride_ch, stride_sb, stride_so, stride_bt,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh, stride_nb, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_SCALED: tl.constexpr,
    FUSED_MERGE: tl.constexpr = False, MERGE_G: tl.constexpr = 1, MERGE_S: tl.constexpr = 1,
    MERGE_D: tl.constexpr = 16, PREFETCH_KV: tl.constexpr = False, PTX: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """Program (b, kv_head, split). PREFETCH_KV: the first tile's keys but the newest (seq_len - 1) are read
    before the PDL wait, the newest after it (module docstring)."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    if PREFETCH_KV:  # seq_lens, the block table and the older keys: nothing on the stream is writing them
        seq_len, start, end = _split_range(seq_lens_ptr, b, split, num_splits, BLOCK_N)
        pos = start + tl.arange(0, BLOCK_N)
        k, v, k_scale = load_kv_tile(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, kv_head, pos,
                                     pos < tl.minimum(end, seq_len - 1), d, d_mask, stride_cb, stride_co, stride_ch,
                                     stride_sb, stride_so, q_ptr.dtype.element_ty, BLOCK_SIZE, KV_SCALED, PTX)
    pdl_prologue(PDL)  # everything else after the previous kernel (kernels/pdl.py)
    if PREFETCH_KV:  # the newest key, written by the kernel just before (the cache write)
        newest = (pos == seq_len - 1) & (pos < end)
        k_new, v_new, k_scale_new = load_kv_tile(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, kv_head,
                                                 pos, newest, d, d_mask, stride_cb, stride_co, stride_ch, stride_sb,
                                                 stride_so, q_ptr.dtype.element_ty, BLOCK_SIZE, KV_SCALED, PTX)
        k = tl.where(newest[:, None], k_new, k)
        v = tl.where(newest[:, None], v_new, v)
        if KV_SCALED:
            k_scale = tl.where(newest, k_scale_new, k_scale)
    else:
        seq_len, start, end = _split_range(seq_lens_ptr, b, split, num_splits, BLOCK_N)
        pos = start + tl.arange(0, BLOCK_N)
        k, v, k_scale = load_kv_tile(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, kv_head, pos,
                                     pos < end, d, d_mask, stride_cb, stride_co, stride_ch, stride_sb, stride_so,
                                     q_ptr.dtype.element_ty, BLOCK_SIZE, KV_SCALED, PTX)
    g = tl.arange(0, BLOCK_G)
    g_mask = g < GROUP
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    m, l, acc = _softmax_tile(q, k, v, k_scale, pos < end, tl.full([BLOCK_G], float("-inf"), tl.float32),
                              tl.zeros([BLOCK_G], tl.float32), tl.zeros([BLOCK_G, BLOCK_D], tl.float32),
                              scale_log2, DOT_PRECISION, KV_SCALED)
    for n0 in range(start + BLOCK_N, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        k, v, k_scale = load_kv_tile(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, kv_head, pos,
                                     pos < end, d, d_mask, stride_cb, stride_co, stride_ch, stride_sb, stride_so,
                                     q.dtype, BLOCK_SIZE, KV_SCALED, PTX)  # [BLOCK_N, BLOCK_D] x 2, [BLOCK_N]
        m, l, acc = _softmax_tile(q, k, v, k_scale, pos < end, m, l, acc, scale_log2, DOT_PRECISION, KV_SCALED)
    _finish_split(m, l, acc, b, kv_head, split, heads, g_mask, d, d_mask, out_ptr, mid_o_ptr, mid_lse_ptr,
                  counters_ptr, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh, stride_nb,
                  num_splits, GROUP, HEAD_DIM, DIRECT, FUSED_MERGE, MERGE_G, MERGE_S, MERGE_D)


@triton.jit
def _finish_split(m, l, acc, b, kv_head, split, heads, g_mask, d, d_mask, out_ptr, mid_o_ptr, mid_lse_ptr,
                  counters_ptr, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh, stride_nb,
                  num_splits, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DIRECT: tl.constexpr,
                  FUSED_MERGE: tl.constexpr, MERGE_G: tl.constexpr, MERGE_S: tl.constexpr, MERGE_D: tl.constexpr):
    """The split's normalised output [BLOCK_G, BLOCK_D]: to out (one split), or its partial and LSE to mid_o /
    mid_lse, then (FUSED_MERGE) the count whose last arrival merges the group (split_k.merge_if_last)."""
    l_safe = tl.where(l > 0.0, l, 1.0)
    o = acc / l_safe[:, None]
    o_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        lse = tl.where(l > 0.0, m + tl.log2(l_safe), float("-inf"))  # -inf for an empty split
        tl.store(mid_o_ptr + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + d[None, :],
                 o, mask=o_mask)
        tl.store(mid_lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)
        if FUSED_MERGE:  # every split program counts, an empty one too; the last one merges the G heads
            merge_if_last(counters_ptr + b * stride_nb + kv_head, mid_o_ptr + b * stride_mb,
                          mid_lse_ptr + b * stride_lb, out_ptr + b * stride_ob, kv_head * GROUP, GROUP,
                          stride_mh, stride_ms, stride_lh, stride_oh, num_splits, HEAD_DIM, MERGE_G, MERGE_S,
                          MERGE_D)


def _check(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
           kv_scales: torch.Tensor | None) -> None:
    if q.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"q must be [B, H, D] and kv_cache [2, N, bs, H_kv, D]; got {tuple(q.shape)}, "
                         f"{tuple(kv_cache.shape)}")
    batch, heads, dim = q.shape
    kv_heads = kv_cache.shape[3]
    if kv_cache.shape[4] != dim or heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit kv_cache {tuple(kv_cache.shape)} (GQA needs H % H_kv == 0)")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q must be bf16/f16/f32, got {q.dtype}")
    check_cache(kv_cache, kv_scales, q.dtype)
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} / seq_lens {tuple(seq_lens.shape)} "
                         f"do not match batch {batch}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError(f"block_tables and seq_lens must be int32, got {block_tables.dtype}, {seq_lens.dtype}")
    if q.stride(2) != 1 or kv_cache.stride(4) != 1 or block_tables.stride(1) != 1:
        raise ValueError("q, kv_cache and block_tables must be contiguous in their last dim")
    if dim < 16:
        raise ValueError(f"head_dim {dim} < 16 is not supported by tl.dot")
    if not (q.device == kv_cache.device == block_tables.device == seq_lens.device):
        raise ValueError("all inputs must be on one device")


class DecodeTiles(NamedTuple):
    block_n: int  # keys per tile
    num_stages: int  # tiles in flight (the software pipeline's depth)


def decode_tiles(batch: int, kv_heads: int, eight_bit: bool, sms: int) -> DecodeTiles:
    """The split kernel's tile: 64 keys, 2 stages; over an 8-bit cache with a program per (sequence, KV head) for
    every SM, 128 keys and 3 stages. An 8-bit tile of 64 keys carries half the bytes of a bf16 one and more
    arithmetic per byte (conversion, scales). Run s11c (H200, benchmarks/kernels_attention_sweep.py, qwen-7b
    shapes, 4 warps): B = 256 int8 cache 148.3 -> 118.9 us at context 640 and 429.0 -> 315.9 at 2048, fp8
    148.4 -> 112.7 and 433.0 -> 301.7 (each within 4.1% of its grid's best); bf16 kept 64 x 2, its best at
    B = 256. B = 32 (128 programs, fewer than the SMs) keeps the default: there the int8 cache's best tile was 32
    keys (94.2 vs 99.5 us) and fp8's 128 keys at 8 warps (88.5 vs 103.0), one sweep, no common rule."""
    if eight_bit and batch * kv_heads >= sms:
        return DecodeTiles(128, 3)
    return DecodeTiles(64, 2)


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, num_splits: int | None = None,
                           max_seq_len: int | None = None, block_n: int | None = None, num_warps: int = 4,
                           num_stages: int | None = None, kv_scales: torch.Tensor | None = None,
                           split_counters: torch.Tensor | None = None, prefetch_kv: bool = False) -> torch.Tensor:
    """q [B, H, D] bf16/f16/f32; kv_cache [2, N, bs, H_kv, D] in q's dtype, or int8 / float8_e4m3fn
    with kv_scales [2, N, bs, H_kv] f32 (contiguous); block_tables [B, W] int32; seq_lens [B] int32
    -> out [B, H, D] in q's dtype.

    num_splits: None picks it from B, H_kv, the SM count and `max_seq_len` (a host int; None uses the
    block-table capacity W * bs, so no device sync). Pass a fixed value under CUDA-graph capture.
    block_n, num_stages: both None take `decode_tiles`' tile; one given, the other defaults to 64 keys / 2 stages.
    split_counters: None, or [>= B, >= H_kv] int32 ZEROS on q's device (contiguous), owned by the caller and
    kept across calls (a layer's buffer: allocated here, it would put a memset into a captured graph). With
    num_splits > 1 the merge is fused into the split kernel (one launch), which leaves the counters zero
    again; None: a second launch merges. No two launches may use one counter buffer at the same time.
    prefetch_kv=True promises that the kernel launched just before this one on the stream writes no cache
    row of these sequences but their newest (position seq_len - 1: the decode step's cache write) and
    neither seq_lens nor block_tables, so under PDL the older keys of each split's first tile are read
    before the wait (module docstring); a caller that cannot promise it keeps the default (False).
    """
    _check(q, kv_cache, block_tables, seq_lens, kv_scales)
    batch, heads, dim = q.shape
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    if split_counters is not None:
        check_split_counters(split_counters, batch, kv_heads, q.device)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    sms = num_sms(q.device)
    if block_n is None and num_stages is None:
        block_n, num_stages = decode_tiles(batch, kv_heads, kv_scales is not None, sms)
    block_n, num_stages = block_n or 64, num_stages or 2
    if num_splits is None:
        longest = block_tables.shape[1] * block_size if max_seq_len is None else max_seq_len
        num_splits = choose_num_splits(batch, kv_heads, longest, sms, min_keys_per_split=block_n)
    mid_o = out  # unused when num_splits == 1
    mid_lse = out
    if num_splits > 1:
        mid_o = torch.empty(batch, heads, num_splits, dim, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q.device)
    group = heads // kv_heads
    counters, merge = fused_merge_args(split_counters, num_splits, dim, group, out)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    # the scale pointers are read only for an 8-bit cache
    k_scales, v_scales = (kv_scales[0], kv_scales[1]) if kv_scales is not None else (k_cache, v_cache)
    block_d = next_power_of_2(dim)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, k_scales, v_scales, block_tables, seq_lens, mid_o, mid_lse, out, counters, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_scales.stride(0), k_scales.stride(1), block_tables.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), counters.stride(0), num_splits,
        GROUP=group, HEAD_DIM=dim, BLOCK_G=max(16, next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, DIRECT=num_splits == 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", KV_SCALED=kv_scales is not None,
        PREFETCH_KV=prefetch_kv, PTX=nvidia_ptx(q.device), num_warps=num_warps, num_stages=num_stages,
        **merge, **pdl_launch(q.device),
    )
    if num_splits > 1 and not merge["FUSED_MERGE"]:
        merge_splits(mid_o, mid_lse, out, group)
    return out
