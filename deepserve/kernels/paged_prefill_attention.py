"""Varlen causal attention of new tokens over a paged KV cache (prefill, chunked prefill, prefix hits).

Shapes: q [T, H, D] (the new tokens of B sequences, sequence i owning rows
query_start_loc[i]:query_start_loc[i+1]); kv_cache [2, num_blocks, block_size, H_kv, D] already
holding the new tokens' K/V; block_tables [B, W] int32; query_start_loc [B + 1] int32;
seq_lens [B] int32 (context after this step) -> out [T, H, D] in q's dtype.
New token j of sequence i (q_len = its row count) sits at position seq_lens[i] - q_len + j and
attends to keys 0 .. that position.

One program per (query tile, KV head). A query tile packs BLOCK_Q consecutive tokens of one sequence
times the G = H / H_kv heads of the KV head into BLOCK_M = BLOCK_Q * G (padded) rows, so K/V are
read once per KV head and a decode token (q_len 1) still fills G rows. Tiles are numbered over the
batch as `query_start_loc[i] // BLOCK_Q + i + local_tile`, an upper bound that the host knows
without reading the device (grid = T // BLOCK_Q + B); a program finds its sequence by binary search
over query_start_loc and exits if its tile is past the sequence's end. Keys below the tile's first
position are visible to every row (no mask); the rest up to its last position use the causal mask.
Online softmax (flash attention) in fp32, exp2 domain.
An int8 / float8_e4m3fn cache comes with kv_scales [2, num_blocks, block_size, H_kv] f32 and is
dequantised right after each tile load as in the decode kernel: K converts exactly to q's dtype and
its per-key scales multiply the score columns; V is dequantised in float32, then rounded to q's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.int8_convert import nvidia_ptx
from deepserve.kernels.kv_cache_write import check_cache, dequantized_cache_ref, load_kv_tile, tile_scores
from deepserve.kernels.sizes import next_power_of_2
from deepserve.kernels.varlen_tiles import find_sequence

LOG2E = 1.4426950408889634


def paged_prefill_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                                query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Reference in fp32 (an 8-bit cache dequantised first); same arguments as `paged_prefill_attention`."""
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    kv_cache = dequantized_cache_ref(kv_cache, kv_scales)
    starts, out = query_start_loc.tolist(), torch.empty_like(q)
    for i, seq_len in enumerate(seq_lens.tolist()):
        lo, hi = starts[i], starts[i + 1]
        blocks = block_tables[i, : (seq_len + block_size - 1) // block_size].long()
        kv = kv_cache[:, blocks].flatten(1, 2)[:, :seq_len]  # [2, S, H_kv, D] f32
        rep = q.shape[1] // kv_heads
        k, v = kv[0].repeat_interleave(rep, 1), kv[1].repeat_interleave(rep, 1)  # [S, H, D]
        scores = torch.einsum("qhd,shd->hqs", q[lo:hi].float(), k) * scale  # [H, L, S]
        q_pos = torch.arange(seq_len - (hi - lo), seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [L, S]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[lo:hi] = torch.einsum("hqs,shd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


@triton.jit
def _attend_keys(q, m, l, acc, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, kv_head, row_pos,
                 key_lo, key_hi, scale_log2, stride_cb, stride_co, stride_ch, stride_sb, stride_so,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 KV_SCALED: tl.constexpr, PTX: tl.constexpr):
    """Online softmax of q [BLOCK_M, BLOCK_D] over keys key_lo .. key_hi - 1 (BLOCK_N at a time)."""
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    for n0 in range(key_lo, key_hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_mask = pos < key_hi
        k, v, k_scale = load_kv_tile(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, kv_head, pos, p_mask,
                                     d, d_mask, stride_cb, stride_co, stride_ch, stride_sb, stride_so, q.dtype,
                                     BLOCK_SIZE, KV_SCALED, PTX)  # [BLOCK_N, BLOCK_D] x 2, [BLOCK_N]
        s = tile_scores(q, k, k_scale, scale_log2, DOT_PRECISION, KV_SCALED)  # [BLOCK_M, BLOCK_N]
        if MASKED:
            s = tl.where(p_mask[None, :] & (pos[None, :] <= row_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m = m_new
    return m, l, acc


@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])  # batch size and table width change every step: one compile
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr,
    out_ptr, scale_log2, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_co, stride_ch, stride_sb, stride_so, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_SCALED: tl.constexpr, PTX: tl.constexpr = False,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = find_sequence(query_start_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    tok0 = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if tok0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    tok = tok0 + r // GROUP
    heads = kv_head * GROUP + r % GROUP
    row_mask = (r < BLOCK_Q * GROUP) & (tok < q_len)
    io_mask = row_mask[:, None] & (d[None, :] < HEAD_DIM)
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=io_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    row_pos = ctx + tok

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    full_end = (ctx + tok0 + 1) // BLOCK_N * BLOCK_N  # keys every row sees, in whole tiles
    key_end = tl.minimum(ctx + tok0 + BLOCK_Q, seq_len)  # one past the tile's last position
    m, l, acc = _attend_keys(q, m, l, acc, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, kv_head,
                             row_pos, 0, full_end, scale_log2, stride_cb, stride_co, stride_ch, stride_sb,
                             stride_so, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, KV_SCALED,
                             PTX)
    m, l, acc = _attend_keys(q, m, l, acc, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, kv_head,
                             row_pos, full_end, key_end, scale_log2, stride_cb, stride_co, stride_ch, stride_sb,
                             stride_so, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION, KV_SCALED,
                             PTX)
    l = tl.where(l > 0.0, l, 1.0)
    o = acc / l[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=io_mask)


def _check(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
           query_start_loc: torch.Tensor, seq_lens: torch.Tensor, kv_scales: torch.Tensor | None) -> None:
    if q.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"q must be [T, H, D] and kv_cache [2, N, bs, H_kv, D]; got {tuple(q.shape)}, "
                         f"{tuple(kv_cache.shape)}")
    heads, dim = q.shape[1], q.shape[2]
    if kv_cache.shape[4] != dim or heads % kv_cache.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} does not fit kv_cache {tuple(kv_cache.shape)} (GQA needs H % H_kv == 0)")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q must be bf16/f16/f32, got {q.dtype}")
    check_cache(kv_cache, kv_scales, q.dtype)
    batch = seq_lens.shape[0]
    if seq_lens.dim() != 1 or query_start_loc.shape != (batch + 1,) or block_tables.dim() != 2 \
            or block_tables.shape[0] != batch:
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)}, query_start_loc {tuple(query_start_loc.shape)} and "
                         f"block_tables {tuple(block_tables.shape)} disagree on the batch")
    for name, t in (("block_tables", block_tables), ("query_start_loc", query_start_loc), ("seq_lens", seq_lens)):
        if t.dtype != torch.int32 or t.stride(-1) != 1:
            raise ValueError(f"{name} must be int32 and contiguous in its last dim, got {t.dtype}")
    if q.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError("q and kv_cache must be contiguous in the head dim")
    if dim < 16:
        raise ValueError(f"head_dim {dim} < 16 is not supported by tl.dot")
    if not (q.device == kv_cache.device == block_tables.device == query_start_loc.device == seq_lens.device):
        raise ValueError("all inputs must be on one device")


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            block_m: int | None = None, block_n: int = 64, num_warps: int | None = None,
                            num_stages: int = 2, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] bf16/f16/f32; kv_cache [2, N, bs, H_kv, D] in q's dtype, or int8 / float8_e4m3fn
    with kv_scales [2, N, bs, H_kv] f32 (contiguous); block_tables [B, W] int32;
    query_start_loc [B + 1] int32; seq_lens [B] int32 -> out [T, H, D] in q's dtype.

    block_m: rows per tile (tokens x G heads), raised to the next power of two >= G; None picks 128
    (8 warps) when sequences average >= 32 new tokens, else 64 (4 warps): host shapes only, no sync.
    """
    _check(q, kv_cache, block_tables, query_start_loc, seq_lens, kv_scales)
    num_tokens, heads, dim = q.shape
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.empty_like(q)
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    group = heads // kv_heads
    if block_m is None:
        block_m = 128 if num_tokens >= 32 * batch else 64
    if num_warps is None:
        num_warps = 8 if block_m >= 128 else 4
    block_m = max(block_m, next_power_of_2(group), 16)
    block_q = block_m // group
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    k_scales, v_scales = (kv_scales[0], kv_scales[1]) if kv_scales is not None else (k_cache, v_cache)  # unused unless 8-bit
    grid = (num_tokens // block_q + batch, kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, k_scales, v_scales, block_tables, query_start_loc, seq_lens, out, scale * LOG2E, batch,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_scales.stride(0), k_scales.stride(1),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_D=next_power_of_2(dim),
        BLOCK_SIZE=block_size, BLOCK_N=block_n, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        KV_SCALED=kv_scales is not None, PTX=nvidia_ptx(q.device), num_warps=num_warps, num_stages=num_stages,
    )
    return out
