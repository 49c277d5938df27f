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
     With `split_counters` bound (`engine/kv_cache.bind_split_counters`: [max_num_seqs, H_kv] int32
     zeros, held by the layer like its cache) and a batch that fits them, the decode kernel merges its
     splits itself, one launch instead of two (kernels/split_k.py, "last program merges"; same values as
     the two launches); unbound (an empty [0, H_kv]) or a larger batch: the split kernel and the separate
     merge. The decode kernel is called with prefetch_kv=True: the write just before it is of each
     sequence's newest key only, so under PDL it reads the older keys of its first tile before its wait
     (kernels/paged_decode_attention.py, which gives the one measurement of both changes, run s10g).
Launch decisions use host values only (tensor shapes and the ForwardContext's host tuples), so no
call syncs with the device. The split count of decode is chosen from the batch size and the
longest context on the host (max_model_len while a CUDA graph is captured); prefill reads shapes
only (`supports_prefill_cuda_graph`: prefill chunks are captured too, engine/prefill_graph.py).
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
from deepserve.layers.rotary import RotaryEmbedding


class TritonAttention(Attention):
    """q [T, H, D], k/v [T, H_kv, D] (bf16 on GPU, any strides with a unit last stride) -> [T, H, D]."""

    # Launch decisions read only shapes and host tuples: during graph capture the runner sets
    # seq_lens_cpu to max_model_len, so the decode split count is fixed for every replay.
    supports_cuda_graph = True
    # Prefill launches read shapes only (`paged_prefill_attention`: grid from num_tokens and the batch,
    # programs find their sequence in query_start_loc on the device), never the host tuples: a padded
    # single-sequence prefill can be captured too (deepserve/engine/prefill_graph.py).
    supports_prefill_cuda_graph = True

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float | None = None,
                 rotary: RotaryEmbedding | None = None):
        super().__init__(num_heads, head_dim, num_kv_heads, scale, rotary)
        # [max_num_seqs, H_kv] int32 zeros for the decode kernel's fused merge, bound by the runner
        self.split_counters = torch.zeros(0, num_kv_heads, dtype=torch.int32)

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
                                          max_seq_len=max(ctx.seq_lens_cpu), kv_scales=scales,
                                          split_counters=self._split_counters(q.shape[0]),
                                          prefetch_kv=True)  # the write above is of the newest keys only
        return paged_prefill_attention(q, self.kv_cache, ctx.block_tables, ctx.query_start_loc,
                                       ctx.seq_lens, self.scale, kv_scales=scales)

    def _split_counters(self, batch: int) -> torch.Tensor | None:
        """The bound counters when they cover a decode batch of `batch` sequences (fused merge), else None."""
        return self.split_counters if self.split_counters.shape[0] >= batch else None

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
