"""Paged multi-head / grouped-query attention in PyTorch (the reference backend, used on CPU).

Per layer the cache is `[2, num_blocks, block_size, num_kv_heads, head_dim]` (K = [0], V = [1]),
bound by the model runner into `kv_cache`; an 8-bit cache (int8 / float8_e4m3fn) comes with
`kv_scales [2, num_blocks, block_size, num_kv_heads]` float32, one scale per token and head
(deepserve/layers/kv_quant.py): rows are quantised when written and dequantised when gathered.
Each call
  0. with a rotary module (the dense models hand theirs over), rotates q and k by `positions` first;
  1. writes the new tokens' K/V at `ForwardContext.slot_mapping`;
  2. for each sequence gathers its whole context (cached + new) through its block table and runs
     SDPA with the causal mask shifted so the new tokens sit at the end of the context.
Chunked prefill, prefix-cache hits (context longer than the new tokens) and decode all follow
from step 2 and may share one batch.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from deepserve.forward_context import get_forward_context
from deepserve.layers.kv_quant import dequantize_kv, is_quantized, quantize_kv, scales_shape
from deepserve.layers.rotary import RotaryEmbedding


def _scaled(kv_scales: torch.Tensor | None) -> bool:
    """Whether scales were given (an 8-bit cache); None or an empty tensor: none."""
    return kv_scales is not None and kv_scales.numel() > 0


def check_kv_scales(kv_cache: torch.Tensor, kv_scales: torch.Tensor) -> None:
    """ValueError unless an 8-bit cache has float32 scales [2, N, bs, H_kv] (and others none)."""
    if not is_quantized(kv_cache.dtype):
        if kv_scales.numel():
            raise ValueError(f"a {kv_cache.dtype} KV cache takes no scales")
        return
    if tuple(kv_scales.shape) != scales_shape(kv_cache.shape) or kv_scales.dtype != torch.float32:
        raise ValueError(f"an 8-bit KV cache {tuple(kv_cache.shape)} needs float32 scales "
                         f"{scales_shape(kv_cache.shape)}, got {tuple(kv_scales.shape)} {kv_scales.dtype}")


def read_kv(rows: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Gathered cache rows [..., D] in `dtype`; scales [...] f32 of an 8-bit cache, else None/empty."""
    return dequantize_kv(rows, scales, dtype) if _scaled(scales) else rows.to(dtype)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             kv_scales: torch.Tensor | None = None) -> None:
    """Store k, v [num_tokens, num_kv_heads, head_dim] at flat slots [num_tokens] int64; an 8-bit
    cache stores each row quantised and its scale in kv_scales [2, num_blocks, block_size, H_kv].

    A negative slot (padding row of a CUDA-graph batch) is skipped without a host sync: it is
    pointed at slot 0 (the never-allocated null block) and writes back what is there."""
    _, num_blocks, block_size, heads, dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, heads, dim)  # [2, slots, H_kv, D]
    keep = (slot_mapping >= 0)[:, None, None]  # [T, 1, 1]
    slots = slot_mapping.clamp(min=0)
    new = torch.stack([k, v])  # [2, T, H_kv, D]
    if _scaled(kv_scales):
        new, new_scales = quantize_kv(new, kv_cache.dtype)  # [2, T, H_kv, D], [2, T, H_kv]
        flat_scales = kv_scales.view(2, num_blocks * block_size, heads)  # [2, slots, H_kv]
        flat_scales[:, slots] = torch.where(keep[..., 0], new_scales, flat_scales[:, slots])
    flat[:, slots] = torch.where(keep, new.to(kv_cache.dtype), flat[:, slots])


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
              kv_scales: torch.Tensor | None = None, dtype: torch.dtype | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [seq_len, num_kv_heads, head_dim] of one sequence in `dtype` (None: the cache's; an
    8-bit cache is dequantised); block_table: [max_blocks] int64."""
    block_size = kv_cache.shape[2]
    blocks = block_table[: (seq_len + block_size - 1) // block_size]
    kv = kv_cache[:, blocks].flatten(1, 2)[:, :seq_len]  # [2, seq_len, H_kv, D]
    if _scaled(kv_scales):
        kv = read_kv(kv, kv_scales[:, blocks].flatten(1, 2)[:, :seq_len], dtype or torch.float32)
    elif dtype is not None:
        kv = kv.to(dtype)
    return kv[0], kv[1]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [L, H, D] (the last L of the S context tokens), k/v [S, H_kv, D] -> [L, H, D].

    Query i (position S - L + i) attends to keys 0 .. S - L + i.
    """
    q_len, ctx_len = q.shape[0], k.shape[0]
    mask = None
    if q_len > 1:
        offset = ctx_len - q_len
        mask = torch.arange(ctx_len, device=q.device)[None, :] <= torch.arange(q_len, device=q.device)[:, None] + offset
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0).to(q.dtype),
        v.transpose(0, 1).unsqueeze(0).to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=True,
    )  # [1, H, L, D]
    return out[0].transpose(0, 1)


def batched_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                             seq_lens: torch.Tensor, scale: float, kv_scales: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """One new token per sequence, all sequences in one SDPA call.

    q [B, H, D]; kv_cache [2, num_blocks, block_size, H_kv, D] (8-bit: with kv_scales
    [2, num_blocks, block_size, H_kv] f32); block_tables [B, W] int64; seq_lens [B] int32 -> [B, H, D].
    Keys past each sequence's length are masked out; their slots are redirected to the sequence's
    own position 0 (always written), so stale or poisoned cache contents never enter the softmax,
    not even as 0 * NaN.
    """
    _, num_blocks, block_size, heads, dim = kv_cache.shape
    pos = torch.arange(block_tables.shape[1] * block_size, device=q.device)  # [S]
    slots = block_tables[:, pos // block_size] * block_size + pos % block_size  # [B, S]
    valid = pos[None, :] < seq_lens[:, None].long()  # [B, S]
    slots = torch.where(valid, slots, slots[:, :1])
    kv = kv_cache.view(2, num_blocks * block_size, heads, dim)[:, slots]  # [2, B, S, H_kv, D]
    if _scaled(kv_scales):
        kv_scales = kv_scales.view(2, num_blocks * block_size, heads)[:, slots]  # [2, B, S, H_kv]
    kv = read_kv(kv, kv_scales, q.dtype)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), kv[0].transpose(1, 2), kv[1].transpose(1, 2),
        attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True)  # [B, H, 1, D]
    return out.squeeze(2)


class Attention(nn.Module):
    """q [T, num_heads, head_dim], k/v [T, num_kv_heads, head_dim] -> [T, num_heads, head_dim].

    Holds no weights; `kv_cache` (and `kv_scales`, for an 8-bit cache) start empty. Without a
    bound cache (e.g. a profiling pass) it attends over the new tokens only, which is correct only
    when no sequence has cached context.

    With a `rotary` module, q and k come un-rotated with their positions [T] int64: the backend
    rotates them before the cache write (this one with the module, then writes; the Triton backend
    in the launch that writes the cache). Without one, q and k come rotated (or need no rotation).
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float | None = None,
                 rotary: RotaryEmbedding | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.rotary = rotary  # may be shared by every layer of a model
        self.kv_cache = torch.empty(0)
        self.kv_scales = torch.empty(0)  # [2, num_blocks, block_size, H_kv] f32 with an 8-bit cache

    def check_positions(self, positions: torch.Tensor | None) -> None:
        """ValueError unless positions are given exactly when there is a rotary module to apply."""
        if (positions is None) != (self.rotary is None):
            raise ValueError("positions go with a rotary module: give both or neither "
                             f"(rotary {'set' if self.rotary is not None else 'None'}, "
                             f"positions {'None' if positions is None else 'given'})")

    def rotate(self, positions: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D], k [T, H_kv, D] rotated by the rotary module at positions [T] int64 (new tensors);
        as given without a rotary module."""
        self.check_positions(positions)
        return (q, k) if self.rotary is None else self.rotary(positions, q, k)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        q, k = self.rotate(positions, q, k)
        ctx = get_forward_context()
        cached = self.kv_cache.numel() > 0
        if cached:
            check_kv_scales(self.kv_cache, self.kv_scales)
            write_kv(self.kv_cache, k, v, ctx.slot_mapping, self.kv_scales)
        elif ctx.seq_lens_cpu != ctx.query_lens_cpu:
            raise RuntimeError("attention over cached context needs a bound kv_cache (bind_kv_cache)")
        if cached and ctx.is_decode_only:
            return batched_decode_attention(q, self.kv_cache, ctx.block_tables.long(), ctx.seq_lens, self.scale,
                                            self.kv_scales)
        out = torch.empty_like(q)
        starts = [0, *accumulate(ctx.query_lens_cpu)]
        tables = ctx.block_tables.long()
        for i, seq_len in enumerate(ctx.seq_lens_cpu):
            lo, hi = starts[i], starts[i + 1]
            if cached:
                ck, cv = gather_kv(self.kv_cache, tables[i], seq_len, self.kv_scales, q.dtype)
            else:
                ck, cv = k[lo:hi], v[lo:hi]
            out[lo:hi] = causal_attention(q[lo:hi], ck, cv, self.scale)
        return out


def attention_backend_cls(device_type: str) -> type[nn.Module]:
    """The MHA/GQA backend for a device type: Triton kernels on "cuda" (imported lazily, so CPU
    installs never import Triton), this PyTorch reference elsewhere."""
    if device_type == "cuda":
        from deepserve.layers.attention_triton import TritonAttention

        return TritonAttention
    return Attention


def make_attention(num_heads: int, head_dim: int, num_kv_heads: int, scale: float | None = None,
                   rotary: RotaryEmbedding | None = None) -> nn.Module:
    """The backend for the device the model is being built on (`with torch.device(...)`); with `rotary`,
    it applies RoPE to q and k itself (forward takes their positions)."""
    cls = attention_backend_cls(torch.get_default_device().type)
    return cls(num_heads, head_dim, num_kv_heads, scale, rotary)
