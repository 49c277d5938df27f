"""Paged MHA/GQA attention on Triton kernels (the CUDA backend), same interface as `Attention`.

Each call, with the layer's cache `[2, num_blocks, block_size, H_kv, D]` bound (an 8-bit cache with
its `kv_scales [2, num_blocks, block_size, H_kv]` f32, deepserve/layers/kv_quant.py):
  1. `kv_cache_write` stores the new tokens' K/V at `ForwardContext.slot_mapping` (slot < 0: skip),
     quantising each row and writing its scale for an 8-bit cache; with a rotary module (the dense
     models'), `rope_kv_write` does it in the same launch that rotates q and k (one launch per layer
     fewer than the rotary kernel then the write, bit for bit the same results);
  2. decode-only batches (every q_len == 1) run `paged_decode_attention` (split-K over the context);
     any other batch runs `paged_prefill_attention` over all its tokens (decode rows are q_len 1);
     both dequantise an 8-bit cache's tiles after loading them and compute in q's dtype.
Launch decisions use host values only (tensor shapes and the ForwardContext's host tuples), so no
call syncs with the device. The split count of decode is chosen from the batch size and the
longest context on the host (max_model_len while a CUDA graph is captured).
Without a bound cache (a profiling pass) it falls back to the PyTorch backend.
"""

from __future__ import annotations

import torch

from deepserve.forward_context import get_forward_context
from deepserve.kernels.kv_cache_write import kv_cache_write
from deepserve.kernels.paged_decode_attention import paged_decode_attention
from deepserve.kernels.paged_prefill_attention import paged_prefill_attention
from deepserve.kernels.rope_kv_write import rope_kv_write
from deepserve.layers.attention import Attention


class TritonAttention(Attention):
    """q [T, H, D], k/v [T, H_kv, D] (bf16 on GPU, any strides with a unit last stride) -> [T, H, D]."""

    # Launch decisions read only shapes and host tuples: during graph capture the runner sets
    # seq_lens_cpu to max_model_len, so the decode split count is fixed for every replay.
    supports_cuda_graph = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.kv_cache.numel() == 0:
            return super().forward(q, k, v, positions)
        ctx = get_forward_context()
        scales = self.kv_scales if self.kv_scales.numel() else None  # the kernels check them
        q = self._rotate_and_write(positions, q, k, v, ctx.slot_mapping, scales)
        if scales is None:
            q = q.to(self.kv_cache.dtype)
        if ctx.is_decode_only:
            return paged_decode_attention(q, self.kv_cache, ctx.block_tables, ctx.seq_lens, self.scale,
                                          max_seq_len=max(ctx.seq_lens_cpu), kv_scales=scales)
        return paged_prefill_attention(q, self.kv_cache, ctx.block_tables, ctx.query_start_loc,
                                       ctx.seq_lens, self.scale, kv_scales=scales)

    def _rotate_and_write(self, positions: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          slot_mapping: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """k (rotated, with a rotary module) and v [T, H_kv, D] into the cache at slot_mapping [T] int64 in one
        launch; returns q [T, H, D], rotated likewise (a new tensor) or as given."""
        self.check_positions(positions)
        if self.rotary is None:
            kv_cache_write(self.kv_cache, k, v, slot_mapping, scales)
            return q
        rope = self.rotary
        return rope_kv_write(positions, q, k, v, rope.cos, rope.sin, rope.interleaved, self.kv_cache, slot_mapping,
                             scales)
