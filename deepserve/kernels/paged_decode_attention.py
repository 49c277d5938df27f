"""Decode attention over a paged KV cache: one query token per sequence, GQA, split-K.

Shapes: q [B, H, D]; kv_cache [2, num_blocks, block_size, H_kv, D] (K = [0], V = [1]);
block_tables [B, W] int32; seq_lens [B] int32 (context length including the new token, whose K/V
are already in the cache) -> out [B, H, D] in q's dtype.
An int8 / float8_e4m3fn cache comes with kv_scales [2, num_blocks, block_size, H_kv] f32 (one per
row, deepserve/layers/kv_quant.py), dequantised right after each tile load: K's 8-bit values convert
exactly to q's dtype and its per-key scales multiply the score columns (q.k * s_k, no scaled K
rounded to bf16); V is dequantised in float32 (v * s_v) and rounded once to q's dtype, as a cache in
that dtype would hold it. Compute stays in q's dtype with float32 accumulation.

Flash-decoding in two kernels:
  1. `_decode_split_kernel`, grid (B, H_kv, num_splits): the G = H / H_kv query heads sharing one
     KV head are one [G, D] tile, so each K/V row is read once per KV head. Sequence b's context is
     cut into `num_splits` contiguous chunks (chunk length computed in the kernel from seq_lens[b],
     a multiple of BLOCK_N); each program runs an online softmax over its chunk, BLOCK_N keys at a
     time (keys are gathered through the block table, so any block_size works), and writes its
     normalised partial output [G, D] and log2-sum-exp [G] in fp32.
  2. `split_k.merge_splits`, grid (B, H): merges the splits' partials with their LSE weights.
With one split the first kernel writes `out` directly and the second is skipped.

Because chunking is derived in the kernel from seq_lens and num_splits, a launch depends on the
host only through (B, num_splits): fix num_splits and the launch can be captured in a CUDA graph.
Sequences with seq_len 0 (graph padding) produce zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.kv_cache_write import check_cache, dequantized_cache_ref, load_kv_tile, tile_scores
from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.sizes import next_power_of_2
from deepserve.kernels.split_k import choose_num_splits, merge_splits, num_sms

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


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])  # per-step values: one compile
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, seq_lens_ptr, mid_o_ptr,
    mid_lse_ptr, out_ptr, scale_log2,
    stride_qb, stride_qh, stride_cb, stride_co, stride_ch, stride_sb, stride_so, stride_bt,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_SCALED: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_mask = pos < end
        k, v, k_scale = load_kv_tile(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, kv_head, pos, p_mask,
                                     d, d_mask, stride_cb, stride_co, stride_ch, stride_sb, stride_so, q.dtype,
                                     BLOCK_SIZE, KV_SCALED)  # [BLOCK_N, BLOCK_D] x 2, [BLOCK_N]
        s = tile_scores(q, k, k_scale, scale_log2, DOT_PRECISION, KV_SCALED)  # [BLOCK_G, BLOCK_N]
        s = tl.where(p_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m = m_new

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


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, num_splits: int | None = None,
                           max_seq_len: int | None = None, block_n: int = 64, num_warps: int = 4,
                           num_stages: int = 2, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D] bf16/f16/f32; kv_cache [2, N, bs, H_kv, D] in q's dtype, or int8 / float8_e4m3fn
    with kv_scales [2, N, bs, H_kv] f32 (contiguous); block_tables [B, W] int32; seq_lens [B] int32
    -> out [B, H, D] in q's dtype.

    num_splits: None picks it from B, H_kv, the SM count and `max_seq_len` (a host int; None uses the
    block-table capacity W * bs, so no device sync). Pass a fixed value under CUDA-graph capture.
    """
    _check(q, kv_cache, block_tables, seq_lens, kv_scales)
    batch, heads, dim = q.shape
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.empty_like(q)
    if batch == 0:
        return out
    if num_splits is None:
        longest = block_tables.shape[1] * block_size if max_seq_len is None else max_seq_len
        num_splits = choose_num_splits(batch, kv_heads, longest, num_sms(q.device))
    mid_o = out  # unused when num_splits == 1
    mid_lse = out
    if num_splits > 1:
        mid_o = torch.empty(batch, heads, num_splits, dim, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q.device)
    group = heads // kv_heads
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    k_scales, v_scales = (kv_scales[0], kv_scales[1]) if kv_scales is not None else (k_cache, v_cache)  # unused unless 8-bit
    block_d = next_power_of_2(dim)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, k_scales, v_scales, block_tables, seq_lens, mid_o, mid_lse, out, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_scales.stride(0), k_scales.stride(1), block_tables.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), num_splits,
        GROUP=group, HEAD_DIM=dim, BLOCK_G=max(16, next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, DIRECT=num_splits == 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", KV_SCALED=kv_scales is not None,
        num_warps=num_warps, num_stages=num_stages,
        **pdl_launch(q.device),
    )
    if num_splits > 1:
        merge_splits(mid_o, mid_lse, out)
    return out
