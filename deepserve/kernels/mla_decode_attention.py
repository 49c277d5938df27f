"""MLA decode attention in the absorbed form over the paged latent cache, split-K, heads tiled.

In DeepSeek's "absorb" form (layers/mla.py) every query head attends over one shared "KV head":
the cached latent (kv_lora_rank R, after kv_a_layernorm) followed by the rotated rope key (Dr).
The key of a context token is the whole row [latent | rope], its value is the latent alone:

    scores[h, s] = (q_latent[h] . latent[s] + q_rope[h] . rope[s]) * scale
    o_latent[h]  = softmax_s(scores[h]) @ latent          (W_UV is applied outside)

Shapes: q_latent [B, H, R] (q_nope @ W_UK); q_rope [B, H, Dr] (rotated); kv_cache
[num_blocks, block_size, R + Dr]; block_tables [B, W] int32; seq_lens [B] int32 (context length
including the new token, whose latent is already in the cache) -> o_latent [B, H, R] in q's dtype.

Flash-decoding, like `paged_decode_attention`:
  1. `_mla_split_kernel`, grid (B, cdiv(H, BLOCK_H), num_splits): BLOCK_H query heads form one
     [BLOCK_H, R] tile, so each latent row is read once per head tile (H=16: once; H=128: 8 times,
     mostly from L2). Sequence b's context is cut into `num_splits` chunks (a multiple of BLOCK_N,
     computed in the kernel from seq_lens[b]); each program runs an online softmax over its chunk
     in fp32 and writes its normalised partial [BLOCK_H, R] and log2-sum-exp [BLOCK_H]. A split past
     the end of its sequence is empty: it loads nothing and writes only its LSE (-inf), so a split
     count sized for max_model_len costs little on short sequences.
  2. the merge of the splits with their LSE weights, every split at once, never reading an empty split's
     partial, either
       * fused (`split_counters` given and a merge of at most split_k.MAX_FUSED_MERGE_TILES tiles: with R =
         512 latent columns, 2 splits at most): after its stores each program increments its (sequence, head tile)
         counter, and the last of the num_splits programs merges the tile's heads and resets the counter
         (`split_k.merge_if_last`: one launch, the separate merge's `merge_group` with the same tiles, the
         same values). What it saves or costs on a GPU is unmeasured: one program walks the tile's heads x R
         columns in [8-16 heads, S, 16-128 columns] tiles (64 of them at 64 splits) where the separate launch
         spreads them over B x head-chunks x column-chunks programs;
       * or in a second launch, `split_k.merge_splits` (`split_counters` None).
With one split the first kernel writes `o_latent` directly and there is no merge.

Split count (`mla_num_splits`, host only): the shared rule (~4 waves of programs, >= 128 keys a split,
the fp32 partials cost 2 x BLOCK_H x R x 4 bytes a split against (R + Dr) x 2 bytes a key) while the batch
alone fills the GPU; below one program per SM (batch 1: a single head tile at H=16) the kernel is latency-bound,
so splits may shrink to one BLOCK_N tile of keys, up to one wave of programs.

8-bit cache (`--kv-cache-dtype int8|fp8`, KV_SCALED): kv_cache int8 / float8_e4m3fn with kv_scales
[num_blocks, block_size] f32, one scale per row [latent | rope] (kernels/mla_cache_write.py). After each
tile load the latent and rope tiles are cast to q's dtype (exact: int8 and e4m3 values fit bf16) for the
score dots, whose columns are then multiplied by the rows' scales (q . (x_q * s) = (q . x_q) * s); the
latent tile for the value dot is dequantised in float32 (x_q * s). Without KV_SCALED the kernel is the
unscaled one, unchanged.

A launch depends on the host only through shapes and num_splits (a host int), so it can be captured
in a CUDA graph with a fixed num_splits. Rows with seq_len 0 (graph padding) produce zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.int8_convert import int8_to_f32, nvidia_ptx
from deepserve.kernels.mla_cache_write import check_latent_scales
from deepserve.kernels.paged_decode_attention import LOG2E
from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.sizes import cdiv, next_power_of_2
from deepserve.kernels.split_k import (check_split_counters, choose_num_splits, fused_merge_args, merge_if_last,
                                       merge_splits, num_sms)
from deepserve.layers.kv_quant import dequantize_kv, is_quantized


def mla_decode_attention_ref(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                             block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                             kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Reference in fp32. q_latent [B, H, R]; q_rope [B, H, Dr]; kv_cache [N, bs, R + Dr] (8-bit: with
    kv_scales [N, bs] f32, read dequantised); block_tables [B, W] int32; seq_lens [B] int32
    -> o_latent [B, H, R] in q_latent's dtype."""
    if kv_scales is not None:
        kv_cache = dequantize_kv(kv_cache, kv_scales, torch.float32)
    rank, block_size = q_latent.shape[-1], kv_cache.shape[1]
    out = torch.zeros_like(q_latent)
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        blocks = block_tables[b, : (seq_len + block_size - 1) // block_size].long()
        rows = kv_cache[blocks].flatten(0, 1)[:seq_len].float()  # [S, R + Dr]
        latent, rope = rows[:, :rank], rows[:, rank:]
        scores = (q_latent[b].float() @ latent.T + q_rope[b].float() @ rope.T) * scale  # [H, S]
        out[b] = (scores.softmax(-1) @ latent).to(q_latent.dtype)
    return out


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])  # per-step values: one compile
def _mla_split_kernel(
    q_lat_ptr, q_rope_ptr, cache_ptr, kv_scale_ptr, block_tables_ptr, seq_lens_ptr, mid_o_ptr, mid_lse_ptr,
    out_ptr, counters_ptr, scale_log2,
    stride_qb, stride_qh, stride_rb, stride_rh, stride_cb, stride_co, stride_sb, stride_bt,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh, stride_nb, num_splits,
    NUM_HEADS: tl.constexpr, RANK: tl.constexpr, ROPE_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_SCALED: tl.constexpr,
    FUSED_MERGE: tl.constexpr = False, MERGE_G: tl.constexpr = 1, MERGE_D: tl.constexpr = 16,
    MERGE_S: tl.constexpr = 1, PTX: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    b = tl.program_id(0)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    live = heads < tl.where(start < end, NUM_HEADS, 0)  # [BLOCK_H]: none in an empty split (no q, no partial)
    r = tl.arange(0, BLOCK_R)
    e = tl.arange(0, BLOCK_DR)
    h_mask = heads < NUM_HEADS
    r_mask = r < RANK
    e_mask = e < ROPE_DIM
    q_lat = tl.load(q_lat_ptr + b * stride_qb + heads[:, None] * stride_qh + r[None, :],
                    mask=live[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_R]
    q_rope = tl.load(q_rope_ptr + b * stride_rb + heads[:, None] * stride_rh + e[None, :],
                     mask=live[:, None] & e_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_DR]

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_mask = pos < end
        page = tl.load(table + pos // BLOCK_SIZE, mask=p_mask, other=0).to(tl.int64)
        rows = cache_ptr + page * stride_cb + (pos % BLOCK_SIZE) * stride_co  # [BLOCK_N] row starts
        latent = tl.load(rows[:, None] + r[None, :], mask=p_mask[:, None] & r_mask[None, :],
                         other=0.0)  # [BLOCK_N, BLOCK_R]
        rope = tl.load(rows[:, None] + RANK + e[None, :], mask=p_mask[:, None] & e_mask[None, :],
                       other=0.0)  # [BLOCK_N, BLOCK_DR]
        if KV_SCALED:  # 8-bit rows: exact casts for the score dots, one scale per key (column)
            row_scale = tl.load(kv_scale_ptr + page * stride_sb + pos % BLOCK_SIZE, mask=p_mask,
                                other=0.0)  # [BLOCK_N] f32
            if cache_ptr.dtype.element_ty == tl.int8:  # exact, without I2F (kernels/int8_convert.py)
                latent = int8_to_f32(latent, PTX)
                rope = int8_to_f32(rope, PTX)
            s = tl.dot(q_lat, tl.trans(latent.to(q_lat.dtype)), input_precision=DOT_PRECISION)
            s = tl.dot(q_rope, tl.trans(rope.to(q_rope.dtype)), acc=s, input_precision=DOT_PRECISION)
            s = s * (row_scale * scale_log2)[None, :]  # [BLOCK_H, BLOCK_N]
            value = latent.to(tl.float32) * row_scale[:, None]  # [BLOCK_N, BLOCK_R] dequantised in f32
        else:
            s = tl.dot(q_lat, tl.trans(latent), input_precision=DOT_PRECISION)
            s = tl.dot(q_rope, tl.trans(rope), acc=s, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_H, BLOCK_N]
            value = latent
        s = tl.where(p_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(value.dtype), value, input_precision=DOT_PRECISION)
        m = m_new

    l_safe = tl.where(l > 0.0, l, 1.0)
    o = acc / l_safe[:, None]  # zeros for an empty chunk
    o_mask = h_mask[:, None] & r_mask[None, :]
    if DIRECT:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + r[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        lse = tl.where(l > 0.0, m + tl.log2(l_safe), float("-inf"))  # -inf for an empty split
        tl.store(mid_o_ptr + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + r[None, :],
                 o, mask=live[:, None] & r_mask[None, :])  # the merge never reads an empty split's partial
        tl.store(mid_lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=h_mask)
        if FUSED_MERGE:  # every split program counts, an empty one too; the last one merges the tile's heads
            head0 = tl.program_id(1) * BLOCK_H
            merge_if_last(counters_ptr + b * stride_nb + tl.program_id(1), mid_o_ptr + b * stride_mb,
                          mid_lse_ptr + b * stride_lb, out_ptr + b * stride_ob, head0,
                          tl.minimum(BLOCK_H, NUM_HEADS - head0), stride_mh, stride_ms, stride_lh, stride_oh,
                          num_splits, RANK, MERGE_G, MERGE_S, MERGE_D)


def _check(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
    check_latent_scales(kv_cache, kv_scales)
    if q_latent.dim() != 3 or q_rope.dim() != 3 or kv_cache.dim() != 3:
        raise ValueError(f"q_latent [B, H, R], q_rope [B, H, Dr] and kv_cache [N, bs, R + Dr] expected; got "
                         f"{tuple(q_latent.shape)}, {tuple(q_rope.shape)}, {tuple(kv_cache.shape)}")
    batch, heads, rank = q_latent.shape
    if q_rope.shape[:2] != (batch, heads) or kv_cache.shape[2] != rank + q_rope.shape[2]:
        raise ValueError(f"q_latent {tuple(q_latent.shape)} / q_rope {tuple(q_rope.shape)} do not fit "
                         f"kv_cache {tuple(kv_cache.shape)} (last dim must be R + Dr)")
    cache_dtype = q_latent.dtype if is_quantized(kv_cache.dtype) else kv_cache.dtype  # 8-bit: any float q
    if not (q_latent.dtype == q_rope.dtype == cache_dtype) or q_latent.dtype not in (
            torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q_latent, q_rope and kv_cache (unless 8-bit) must share a float dtype (bf16/f16/f32), got "
                         f"{q_latent.dtype}, {q_rope.dtype}, {kv_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} / seq_lens {tuple(seq_lens.shape)} "
                         f"do not match batch {batch}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError(f"block_tables and seq_lens must be int32, got {block_tables.dtype}, {seq_lens.dtype}")
    if q_latent.stride(2) != 1 or q_rope.stride(2) != 1 or kv_cache.stride(2) != 1 or block_tables.stride(1) != 1:
        raise ValueError("q_latent, q_rope, kv_cache and block_tables must be contiguous in their last dim")
    if rank < 16:
        raise ValueError(f"kv_lora_rank {rank} < 16 is not supported by tl.dot")
    if not (q_latent.device == q_rope.device == kv_cache.device == block_tables.device == seq_lens.device):
        raise ValueError("all inputs must be on one device")


MLA_MAX_SPLITS = 64


def mla_num_splits(batch: int, head_tiles: int, max_seq_len: int, num_sms: int, block_n: int) -> int:
    """Splits per sequence from host values only (fixed per CUDA graph: max_seq_len = max_model_len there).

    At least one program per SM without splitting: the shared rule (`choose_num_splits`: ~4 waves,
    >= 128 keys a split, which keeps the fp32 partials small next to the latents read). Fewer programs
    (small batches): the kernel is latency-bound, so also allow up to one wave of programs with splits
    as short as one `block_n` tile; the larger of the two counts.
    """
    usual = choose_num_splits(batch, head_tiles, max_seq_len, num_sms, max_splits=MLA_MAX_SPLITS)
    programs = batch * head_tiles
    if programs >= num_sms:
        return usual
    latency_bound = min(num_sms // programs, max_seq_len // block_n, MLA_MAX_SPLITS)
    return max(usual, latency_bound)


def mla_decode_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                         num_splits: int | None = None, max_seq_len: int | None = None, block_h: int = 16,
                         block_n: int = 32, num_warps: int = 4, num_stages: int = 2,
                         kv_scales: torch.Tensor | None = None,
                         split_counters: torch.Tensor | None = None) -> torch.Tensor:
    """q_latent [B, H, R], q_rope [B, H, Dr] bf16/f16/f32 (any batch/head strides, unit last stride);
    kv_cache [N, bs, R + Dr] same dtype, or int8 / float8_e4m3fn with kv_scales [N, bs] f32 (contiguous);
    block_tables [B, W] int32; seq_lens [B] int32 -> o_latent [B, H, R] in q's dtype (fp32 accumulation).

    num_splits: None picks it (`mla_num_splits`) from B, the head tiles, the SM count and `max_seq_len` (a
    host int; None uses the block-table capacity W * bs, so no device sync). Fix it under CUDA-graph capture.
    block_h / block_n: powers of two >= 16 (tl.dot's minimum), heads per program / keys per step.
    split_counters: None, or [>= B, >= cdiv(H, block_h)] int32 ZEROS on q's device (contiguous), kept by the
    caller across calls: with num_splits > 1 the merge is fused into the split kernel (one launch), which leaves
    them zero again (as `paged_decode_attention`); None: a second launch merges.
    """
    _check(q_latent, q_rope, kv_cache, block_tables, seq_lens, kv_scales)
    if block_h < 16 or block_n < 16 or block_h & (block_h - 1) or block_n & (block_n - 1):
        raise ValueError(f"block_h {block_h} and block_n {block_n} must be powers of two >= 16")
    batch, heads, rank = q_latent.shape
    out = torch.empty_like(q_latent, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
    head_tiles = cdiv(heads, block_h)
    if split_counters is not None:
        check_split_counters(split_counters, batch, head_tiles, q_latent.device)
    if num_splits is None:
        longest = block_tables.shape[1] * kv_cache.shape[1] if max_seq_len is None else max_seq_len
        num_splits = mla_num_splits(batch, head_tiles, longest, num_sms(q_latent.device), block_n)
    mid_o, mid_lse = out, out  # unused when num_splits == 1
    if num_splits > 1:
        mid_o = torch.empty(batch, heads, num_splits, rank, dtype=torch.float32, device=q_latent.device)
        mid_lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q_latent.device)
    counters, merge = fused_merge_args(split_counters, num_splits, rank, min(block_h, heads), out)
    block_r = next_power_of_2(rank)
    scaled = kv_scales is not None
    _mla_split_kernel[(batch, head_tiles, num_splits)](
        q_latent, q_rope, kv_cache, kv_scales if scaled else kv_cache, block_tables, seq_lens, mid_o, mid_lse, out,
        counters, scale * LOG2E, q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_scales.stride(0) if scaled else 0, block_tables.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), counters.stride(0), num_splits,
        NUM_HEADS=heads, RANK=rank, ROPE_DIM=q_rope.shape[2], BLOCK_H=block_h, BLOCK_R=block_r,
        BLOCK_DR=max(16, next_power_of_2(q_rope.shape[2])), BLOCK_SIZE=kv_cache.shape[1],
        BLOCK_N=block_n, DIRECT=num_splits == 1,
        DOT_PRECISION="ieee" if q_latent.dtype == torch.float32 else "tf32", KV_SCALED=scaled,
        PTX=nvidia_ptx(q_latent.device), num_warps=num_warps, num_stages=num_stages,
        **merge, **pdl_launch(q_latent.device),
    )
    if num_splits > 1 and not merge["FUSED_MERGE"]:
        merge_splits(mid_o, mid_lse, out, min(block_h, heads))
    return out
