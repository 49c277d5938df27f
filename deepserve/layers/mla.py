"""Multi-head latent attention (DeepSeek-V2/V3) over the paged latent cache.

Per token, MLA compresses the keys and values of all heads into one latent of `kv_lora_rank`
plus one shared rope key of `qk_rope_head_dim`. The cache stores only those (the latent after
kv_a_layernorm, the rope key after rotation): layer cache [num_blocks, block_size, R + Dr].

Two equivalent ways to attend (DeepSeek-V3 `inference/model.py`):
  * naive: gather the context latents, expand them with kv_b_proj into per-head k_nope and v,
    then ordinary attention with k = [k_nope | k_pe];
  * absorb: fold kv_b_proj's key half into the query (q_nope @ W_UK lands in latent space) and its
    value half into the output, and attend directly over [latent | k_pe] as one shared "head".
"auto" takes absorb for decode-only batches (little query, long context) and naive otherwise.
Routes (`forward`):
  * decode-only batch, "auto"/"absorb": absorbed, all sequences at once, sized by shapes and masked by
    the device seq_lens (CUDA-graph safe): the Triton kernel `kernels/mla_decode_attention` on CUDA,
    `absorbed_decode` elsewhere;
  * any other batch on CUDA, "auto"/"naive": `layers/mla_batch.py` plans it on the host; the context
    latents of all its prefill sequences are gathered once, expanded by ONE kv_b_proj GEMM and attended
    by the varlen kernel `kernels/mla_prefill_attention`; in "auto" its decode rows (q_len 1) take the
    absorbed decode kernel instead (expanding their long contexts would cost memory and a GEMM for one
    row);
  * everything else (CPU prefill, forced "absorb" prefill): the PyTorch loop over sequences here.
On CUDA, kv_a_layernorm, the rotation of q_pe and k_pe and the cache write are ONE kernel,
`kernels/mla_norm_rope_write`. Triton modules are imported lazily, so CPU installs never import Triton.

A decode step on CUDA launches, per layer: ONE GEMM for q_proj (or q_a_proj) and kv_a_proj together
(`process_weights_after_loading` merges them for float layers and under int8, then quantised as one layer
whose input the decoder's norm quantises; the other quantised models keep two GEMMs; q_a_layernorm and
q_b_proj follow for q LoRA), ONE kernel for
kv_a_layernorm + the rotation of q_pe and k_pe + the cache write (three launches before), q_nope @ W_UK, the decode
kernel (q_latent and q_pe as two strided tensors) and its merge (when split: inside the decode kernel when the
runner bound `split_counters` [max_num_seqs, head tiles] and the batch fits them, kernels/split_k.py; else a
second launch), o_lat @ W_UV written into token-major rows, o_proj: no concatenation and no layout copy on the
way. The two W_UK / W_UV products are ONE `kernels/head_gemv` launch each for up to HEAD_GEMV_MAX_T rows (float
weights), cuBLAS's batched GEMM above.

8-bit cache (`--kv-cache-dtype int8|fp8`): the cache is int8 / float8_e4m3fn and `kv_scales [num_blocks,
block_size]` float32 holds one scale per row [latent | rope] (layers/kv_quant.py; bound by the runner, empty
otherwise). The writers quantise (Triton: kernels/mla_norm_rope_write; PyTorch: `quantize_kv`), the decode kernel
dequantises after each tile load, and every PyTorch gather (`_gather`: absorbed decode, the prefill kernel's
context rows, the per-sequence loop) dequantises the rows it gathered into the queries' dtype.

Shapes: T new tokens, S context tokens of one sequence, h heads, R kv_lora_rank,
Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim.
"""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import nn

from deepserve.config import ModelConfig
from deepserve.forward_context import ForwardContext, get_forward_context
from deepserve.kernels.sizes import cdiv  # plain ints, no Triton
from deepserve.layers.kv_quant import dequantize_kv, is_quantized, quantize_kv
from deepserve.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from deepserve.layers.linear_method import PerTokenQuant
from deepserve.layers.mla_batch import PrefillSeqs, plan_mla_batch
from deepserve.layers.norm import RMSNorm
from deepserve.layers.rotary import RotaryEmbedding, yarn_softmax_scale

ATTENTION_MODES = ("auto", "naive", "absorb")
# Serving quantizations under which the input projections still merge (MLAAttention.process_weights_after_loading):
# per-output-channel weight scales, so merging keeps every row's quantisation. int8-weight-only and fp8 would
# qualify by that rule but were not measured merged.
MERGES_UNDER_QUANTIZATION = frozenset({"int8"})
DECODE_BLOCK_H = 16  # heads per program of the decode kernel: one split counter per sequence and head tile
LORA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the default eps in DeepSeek's code and HF's


def context_slots(ctx: ForwardContext, seq: int) -> torch.Tensor:
    """[S] int64 cache slots of positions 0..seq_len-1 of sequence `seq`."""
    pos = torch.arange(ctx.seq_lens_cpu[seq], device=ctx.block_tables.device)
    blocks = ctx.block_tables[seq, pos // ctx.block_size].long()
    return blocks * ctx.block_size + pos % ctx.block_size


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The last T of S positions attend causally.

    q: [T, h, D]; k: [S, h or 1, D]; v: [S, h or 1, Dv] -> [T, h, Dv] (float32 softmax).
    """
    num_q, num_k = q.shape[0], k.shape[0]
    scores = torch.matmul(q.transpose(0, 1), k.permute(1, 2, 0)).float() * scale  # [h, T, S]
    q_pos = torch.arange(num_k - num_q, num_k, device=q.device)[:, None]  # [T, 1]
    future = torch.arange(num_k, device=q.device)[None, :] > q_pos  # [T, S]
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v.transpose(0, 1)).transpose(0, 1)  # [T, h, Dv]


def absorbed_decode(q_lat: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    block_size: int, rank: int, scale: float, scales: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per sequence, all sequences at once, in the absorbed form (PyTorch).

    q_lat [B, h, R + Dr]; cache [slots, R + Dr] (8-bit: with scales [slots] f32, dequantised on gather into
    q_lat's dtype); block_tables [B, W] int32; seq_lens [B] int32 -> o_lat [B, h, R]. Sized by the block-table width, masked by the device seq_lens: no host
    lengths, so a CUDA-graph-style replay over static buffers stays exact. Keys past a sequence's
    length read its position-0 slot instead (always written), so stale or padding slots never reach
    the softmax, not even as 0 * NaN.
    """
    pos = torch.arange(block_tables.shape[1] * block_size, device=q_lat.device)  # [P]
    slots = block_tables.long()[:, pos // block_size] * block_size + pos % block_size  # [B, P]
    valid = pos[None, :] < seq_lens[:, None].long()  # [B, P]
    read = torch.where(valid, slots, slots[:, :1])  # [B, P]
    kv = cache[read] if scales is None else dequantize_kv(cache[read], scales[read], q_lat.dtype)  # [B, P, R + Dr]
    scores = torch.einsum("bhd,bpd->bhp", q_lat, kv).float() * scale  # [B, h, P]
    probs = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1).to(kv.dtype)
    return torch.einsum("bhp,bpr->bhr", probs, kv[..., :rank])  # [B, h, R]


class MLAAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, attention_mode: str = "auto"):
        super().__init__()
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode {attention_mode!r} not in {ATTENTION_MODES}")
        self.attention_mode = attention_mode
        self.num_heads = config.num_attention_heads
        self.kv_lora_rank, self.rope_dim = config.kv_lora_rank, config.qk_rope_head_dim
        self.nope_dim, self.v_dim = config.qk_nope_head_dim, config.v_head_dim
        self.scale = config.qk_head_dim ** -0.5 * yarn_softmax_scale(config.rope_scaling)
        self.rotary = rotary
        self._build_projections(config)
        self.kv_cache = torch.empty(0)  # [num_blocks, block_size, R + Dr], bound by the runner
        self.kv_scales = torch.empty(0)  # [num_blocks, block_size] f32 for an 8-bit cache, else empty
        # [max_num_seqs, head tiles] int32 zeros for the decode kernel's fused merge, bound by the runner
        self.split_counters = torch.zeros(0, cdiv(self.num_heads, DECODE_BLOCK_H), dtype=torch.int32)

    def _build_projections(self, config: ModelConfig) -> None:
        hidden, q_out = config.hidden_size, self.num_heads * config.qk_head_dim
        bias = config.attention_bias
        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, q_out)
        else:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=LORA_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, q_out)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=LORA_NORM_EPS)
        kv_b_out = self.num_heads * (self.nope_dim + self.v_dim)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, kv_b_out)
        self.kv_b_proj.keep_dense_weight = True  # the absorb path folds its matrix into q and o
        self.o_proj = RowParallelLinear(self.num_heads * self.v_dim, hidden, bias=bias)
        self.merge_input_projections = True  # see process_weights_after_loading
        self.qkv_a_proj: ReplicatedLinear | None = None
        self._input_split = (0, 0)

    # process_weights_after_loading receives the serving quantization (see linear_method.py): the
    # merged input projection is built from float weights, unquantised or under MERGES_UNDER_QUANTIZATION
    # (then quantised by its own method); other quantised layers keep their own GEMMs.
    quantizable = True

    def process_weights_after_loading(self, quantization: str | None = None) -> None:
        """Merge the two projections of the layer input, q_proj (or q_a_proj) and kv_a_proj_with_mqa,
        into one GEMM `qkv_a_proj` over the concatenated weight [q_out + R + Dr, H] (one launch instead
        of two; at batch 1 on an H200 each bf16 GEMV cost ~5.8 us whatever its size), where both are
        plain float layers of one dtype and device without bias (`merge_input_projections`, read here:
        False keeps them apart). The originals are emptied, so the weights are held once.

        Under a quantization of MERGES_UNDER_QUANTIZATION (int8 W8A8: weights per output channel, so the
        merged layer's int8 rows and scales are the two layers' own) the float weights merge too and the
        merged layer is quantised by its method. The decoder's input norm then feeds it pre-quantised rows
        (`DeepseekDecoderLayer.attention_input_linear`: norm and quantisation in one launch). In a V2-Lite
        prefill step that is three launches fewer per layer (two activation quantisations and a GEMM)."""
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        second = self.kv_a_proj_with_mqa
        if quantization is not None and quantization not in MERGES_UNDER_QUANTIZATION:
            return
        if not self.merge_input_projections or not _mergeable(first, second):
            return
        merged = ReplicatedLinear(first.in_features, first.weight.shape[0] + second.weight.shape[0], bias=False)
        merged.weight = nn.Parameter(torch.cat([first.weight.detach(), second.weight.detach()]), requires_grad=False)
        merged.process_weights_after_loading(quantization)  # its own method (packed float32 GEMMs on CPU; int8)
        self._input_split = (first.weight.shape[0], second.weight.shape[0])
        for linear in (first, second):
            linear.weight = nn.Parameter(linear.weight.new_empty(0, linear.weight.shape[1]), requires_grad=False)
        self.qkv_a_proj = merged

    def _project_input(self, x: torch.Tensor | PerTokenQuant) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (q_proj(x) [T, h * (Dn + Dr)] or q_a_proj(x) [T, q_lora_rank], kv_a_proj(x)
        [T, R + Dr]); with the merged projection, two column views of one GEMM's output (x may then be
        pre-quantised: the merged layer alone reads it)."""
        if self.qkv_a_proj is not None:
            q, kv = self.qkv_a_proj(x).split(self._input_split, dim=-1)
            return q, kv
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        return first(x), self.kv_a_proj_with_mqa(x)

    def _query(self, q_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_proj(x) [T, h * (Dn + Dr)] or q_a_proj(x) [T, q_lora_rank] -> q_nope [T, h, Dn], q_pe [T, h, Dr]
        (not rotated yet), views of one projection."""
        q = q_in if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(q_in))
        q = q.view(q.shape[0], self.num_heads, self.nope_dim + self.rope_dim)  # [T, h, Dn + Dr]
        return q.split([self.nope_dim, self.rope_dim], dim=-1)

    def _latent(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_a_proj(x) [T, R + Dr] -> the two halves of the cache entries: normalised latent [T, R],
        shared rope key [T, Dr] (not rotated yet)."""
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(latent), k_pe

    def _rotate(self, positions: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q_pe [T, h, Dr], k_pe [T, Dr] -> both rotated (one rotary launch on CUDA), new tensors."""
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe.unsqueeze(1))  # [T, h, Dr], [T, 1, Dr]
        return q_pe, k_pe.squeeze(1)

    def _kv_b_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_UK [h, Dn, R], W_UV [h, Dv, R]."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]

    def _naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ctx_kv: torch.Tensor) -> torch.Tensor:
        """q_nope [T, h, Dn], q_pe [T, h, Dr], ctx_kv [S, R + Dr] -> [T, h, Dv]."""
        latent, k_pe = ctx_kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(-1, self.num_heads, self.nope_dim + self.v_dim)  # [S, h, Dn + Dv]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.num_heads, -1)], dim=-1)  # [S, h, Dn + Dr]
        return causal_attention(torch.cat([q_nope, q_pe], dim=-1), k, v, self.scale)

    def _absorbed(self, q_latent: torch.Tensor, ctx_kv: torch.Tensor) -> torch.Tensor:
        """q_latent [T, h, R + Dr] (absorbed q_nope | q_pe), ctx_kv [S, R + Dr] -> [T, h, R]."""
        kv = ctx_kv.unsqueeze(1)  # [S, 1, R + Dr], one head shared by all query heads
        return causal_attention(q_latent, kv, kv[..., :self.kv_lora_rank], self.scale)

    def _absorb_latent(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [T, h, Dn] -> q_nope @ W_UK [T, h, R]: contiguous from the head GEMV (Triton route, few rows),
        else a head-major bmm result seen token-major (strided)."""
        w_uk, _ = self._kv_b_weights()
        q_lat = self._head_gemv(q_nope, w_uk)
        return torch.einsum("thd,hdr->thr", q_nope, w_uk) if q_lat is None else q_lat

    def _absorb_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """q_nope [T, h, Dn], q_pe [T, h, Dr] -> q_latent [T, h, R + Dr] (q_nope @ W_UK | q_pe), for the
        PyTorch paths (the decode kernel takes the two parts as they are)."""
        return torch.cat([self._absorb_latent(q_nope), q_pe], dim=-1)

    def _absorb_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """o_latent [T, h, R] -> [T, h, Dv] (times W_UV). On the Triton route the head GEMV (few rows) or the bmm
        writes straight into token-major rows, so o_proj's [T, h * Dv] view of it needs no copy."""
        _, w_uv = self._kv_b_weights()
        if not self._on_triton(o_lat):
            return torch.einsum("thr,hvr->thv", o_lat, w_uv)
        out = o_lat.new_empty(o_lat.shape[0], self.num_heads, self.v_dim)  # [T, h, Dv] contiguous
        if self._head_gemv(o_lat, w_uv.transpose(1, 2), out) is None:  # [h, R, Dv]: unit stride in R
            torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))  # [h, T, R] @ [h, R, Dv]
        return out

    def _head_gemv(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """x [T, h, K] @ w [h, K, N] per head by `kernels/head_gemv` (into `out` [T, h, N], else a new contiguous
        tensor) on the Triton route for decode-sized T (<= its HEAD_GEMV_MAX_T) and float weights of x's dtype:
        one launch streaming the weights once, where cuBLAS's batched GEMM is latency-bound. None elsewhere."""
        if not self._on_triton(x):
            return None
        from deepserve.kernels.head_gemv import head_gemv, head_gemv_applies  # lazy: Triton on CUDA only

        return head_gemv(x, w, out) if head_gemv_applies(x, w) else None

    def _rotate_and_store(self, positions: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> torch.Tensor:
        """q_pe [T, h, Dr], kv_a_proj(x) [T, R + Dr] -> q_pe rotated [T, h, Dr] (new tensor); writes the cache
        entries [kv_a_layernorm(latent) | rotated k_pe] at slot_mapping [T] int64 (< 0: skipped). Triton: ONE
        launch of kernels/mla_norm_rope_write; elsewhere the norm, the rotary module and `_store_latents`."""
        if not self._on_triton(kv):
            latent, k_pe = self._latent(kv)
            q_pe, k_pe = self._rotate(positions, q_pe, k_pe)
            self._store_latents(cache, latent, k_pe, slot_mapping)
            return q_pe
        from deepserve.kernels.mla_norm_rope_write import mla_norm_rope_write  # lazy: Triton on CUDA only

        norm, rope = self.kv_a_layernorm, self.rotary
        return mla_norm_rope_write(kv, norm.weight, norm.eps, q_pe, positions, rope.cos, rope.sin, rope.interleaved,
                                   self.kv_cache, slot_mapping, self._scales())

    def _store_latents(self, cache: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
        """PyTorch: latent [T, R], rotated k_pe [T, Dr] into cache [slots, R + Dr] at slot_mapping [T] int64
        (< 0: skipped), quantised for an 8-bit cache."""
        entries = torch.cat([latent, k_pe], dim=-1)  # [T, R + Dr]
        if self._scales() is None:
            self._write_cache(cache, entries, slot_mapping)
            return
        rows, row_scales = quantize_kv(entries, cache.dtype)  # [T, R + Dr] 8-bit, [T] f32
        self._write_cache(cache.view(torch.int8), rows.view(torch.int8), slot_mapping)  # bytes: where() on fp8
        self._write_cache(self.kv_scales.view(-1, 1), row_scales[:, None], slot_mapping)

    def _scales(self) -> torch.Tensor | None:
        """kv_scales [num_blocks, block_size] f32 when the bound cache is 8-bit, else None."""
        return self.kv_scales if is_quantized(self.kv_cache.dtype) else None

    def _gather(self, cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """cache [slots, R + Dr] rows at slots [S] int64 -> [S, R + Dr]: as stored, or dequantised into `dtype`
        from an 8-bit cache (x_q * s in float32)."""
        scales = self._scales()
        if scales is None:
            return cache[slots]
        return dequantize_kv(cache[slots], scales.view(-1)[slots], dtype)

    def _write_cache(self, cache: torch.Tensor, entries: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """PyTorch: entries [T, R + Dr] into cache [slots, R + Dr] at slot_mapping [T] int64. A slot < 0
        (CUDA-graph padding) is skipped, where plain indexing would wrap to the last slot: it points at
        slot 0 (the null block) and writes back what is there."""
        keep = (slot_mapping >= 0)[:, None]  # [T, 1]
        slots = slot_mapping.clamp(min=0)
        cache[slots] = torch.where(keep, entries.to(cache.dtype), cache[slots])

    def _on_triton(self, t: torch.Tensor) -> bool:
        """Triton kernels serve CUDA tensors (tests force them on CPU, under the interpreter)."""
        return t.is_cuda

    @property
    def supports_cuda_graph(self) -> bool:
        """Decode-only batches (the captured ones) take the absorbed path in "auto" and "absorb" modes,
        whose launches read shapes and host tuples only (the decode kernel's split count comes from
        max(seq_lens_cpu), max_model_len under capture), and the device seq_lens on CPU; "naive"
        sizes its gathers from the host lengths of the batch."""
        return self.attention_mode != "naive"

    def _decode_kernel(self, q_nope: torch.Tensor, q_pe: torch.Tensor, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        """q_nope [B, h, Dn], rotated q_pe [B, h, Dr] (one new token per sequence), block_tables [B, W]
        int32, seq_lens [B] int32 -> o_lat [B, h, R] in the cache dtype. The kernel takes q_nope @ W_UK and
        q_pe as two strided tensors (no concatenation). No device sync."""
        from deepserve.kernels.mla_decode_attention import mla_decode_attention  # lazy: Triton on CUDA only

        scales = self._scales()
        # a no-op cast when the model runs in the cache dtype; an 8-bit cache takes q as it is
        dtype = self.kv_cache.dtype if scales is None else q_nope.dtype
        scaled = {} if scales is None else {"kv_scales": scales}  # the float call stays as it was
        return mla_decode_attention(self._absorb_latent(q_nope).to(dtype), q_pe.to(dtype), self.kv_cache,
                                    block_tables, seq_lens, self.scale, max_seq_len=max_seq_len,
                                    **scaled, **self._fused_merge(q_nope.shape[0]))

    def _fused_merge(self, batch: int) -> dict[str, object]:
        """The decode kernel's fused-merge keywords when the bound split counters cover `batch` sequences (with
        the head tile they were sized for); none otherwise: the split kernel and a second merge launch."""
        if self.split_counters.shape[0] < batch:
            return {}
        return {"split_counters": self.split_counters, "block_h": DECODE_BLOCK_H}

    def _decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """A decode-only batch in the absorbed form: [B, h, Dn], [B, h, Dr] -> [B, h, Dv]. Reads the
        device seq_lens (no per-sequence host loop), so it is safe to capture in a CUDA graph."""
        if self._on_triton(q_nope):
            o_lat = self._decode_kernel(q_nope, q_pe, ctx.block_tables, ctx.seq_lens,
                                        max(ctx.seq_lens_cpu, default=1))
        else:
            scales = self._scales()
            o_lat = absorbed_decode(self._absorb_query(q_nope, q_pe), cache, ctx.block_tables, ctx.seq_lens,
                                    ctx.block_size, self.kv_lora_rank, self.scale,
                                    None if scales is None else scales.view(-1))
        return self._absorb_output(o_lat)

    def _mixed_kernels(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                       ctx: ForwardContext) -> torch.Tensor:
        """Any batch on the GPU kernels (mla_batch.py): decode rows absorbed ("auto"), every other
        sequence expanded and attended by the varlen prefill kernel. [T, h, Dn], [T, h, Dr] -> [T, h, Dv]."""
        split = self.attention_mode == "auto"
        plan = ctx.derived(("mla_batch_plan", split), lambda c: plan_mla_batch(c, split))  # once per step
        if plan.decode is None:
            return self._prefill_kernel(q_nope, q_pe, cache, plan.prefill)  # every row, in batch order
        out = q_nope.new_empty(q_nope.shape[0], self.num_heads, self.v_dim)  # [T, h, Dv]
        rows = plan.decode
        o_lat = self._decode_kernel(q_nope[rows.tokens], q_pe[rows.tokens], ctx.block_tables[rows.seqs],
                                    ctx.seq_lens[rows.seqs], rows.max_seq_len)  # [Bd, h, R]
        out[rows.tokens] = self._absorb_output(o_lat.to(out.dtype))
        if plan.prefill is not None:
            tokens = plan.prefill.tokens
            out[tokens] = self._prefill_kernel(q_nope[tokens], q_pe[tokens], cache, plan.prefill)
        return out

    def _prefill_kernel(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                        seqs: PrefillSeqs) -> torch.Tensor:
        """The new tokens of `seqs`, q_nope [Tp, h, Dn], q_pe [Tp, h, Dr] -> [Tp, h, Dv] in q's dtype: their
        context latents gathered once, ONE kv_b_proj GEMM, one varlen prefill launch."""
        from deepserve.kernels.mla_prefill_attention import mla_prefill_attention  # lazy: Triton on CUDA only

        latent, k_pe = self._gather(cache, seqs.slots, q_nope.dtype).split([self.kv_lora_rank, self.rope_dim], dim=-1)  # [Sp, R], [Sp, Dr]
        kv = self.kv_b_proj(latent).view(-1, self.num_heads, self.nope_dim + self.v_dim)  # [Sp, h, Dn + Dv]
        out = mla_prefill_attention(q_nope.to(kv.dtype), q_pe.to(kv.dtype), kv[..., :self.nope_dim],
                                    k_pe.to(kv.dtype), kv[..., self.nope_dim:], seqs.cu_q, seqs.cu_k, self.scale)
        return out.to(q_nope.dtype)

    def _per_sequence(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                      ctx: ForwardContext) -> torch.Tensor:
        """The PyTorch paths, one sequence at a time: [T, h, Dn], [T, h, Dr] -> [T, h, Dv]."""
        starts = [0, *accumulate(ctx.query_lens_cpu)]  # == query_start_loc, from the host copy (no sync)
        if self.attention_mode == "absorb":
            q_lat = self._absorb_query(q_nope, q_pe)  # [T, h, R + Dr]
            o_lat = torch.cat([self._absorbed(q_lat[starts[i]:starts[i + 1]],
                                              self._gather(cache, context_slots(ctx, i), q_lat.dtype))
                               for i in range(ctx.num_seqs)])  # [T, h, R]
            return self._absorb_output(o_lat)
        return torch.cat([self._naive(q_nope[starts[i]:starts[i + 1]], q_pe[starts[i]:starts[i + 1]],
                                      self._gather(cache, context_slots(ctx, i), q_nope.dtype))
                          for i in range(ctx.num_seqs)])

    def forward(self, positions: torch.Tensor, x: torch.Tensor | PerTokenQuant) -> torch.Tensor:
        """positions: [T] int64, x: [T, H] (or its PerTokenQuant, for a merged quantised `qkv_a_proj`) -> [T, H];
        writes the new tokens' latents to the cache."""
        ctx = get_forward_context()
        q_in, kv = self._project_input(x)
        q_nope, q_pe = self._query(q_in)
        cache = self.kv_cache.view(-1, self.kv_lora_rank + self.rope_dim)  # [slots, R + Dr]
        q_pe = self._rotate_and_store(positions, q_pe, kv, cache, ctx.slot_mapping)
        if ctx.is_decode_only and self.attention_mode != "naive":
            out = self._decode(q_nope, q_pe, cache, ctx)
        elif self._on_triton(q_nope) and self.attention_mode != "absorb":
            out = self._mixed_kernels(q_nope, q_pe, cache, ctx)
        else:
            out = self._per_sequence(q_nope, q_pe, cache, ctx)
        return self.o_proj(out.reshape(q_nope.shape[0], self.num_heads * self.v_dim))  # a view on the decode route


def _mergeable(first: nn.Module, second: nn.Module) -> bool:
    """Two float linears that one GEMM over their concatenated weights can replace: dense method, no
    bias, no block-fp8 scales, same dtype, device and input width."""
    from deepserve.layers.linear_method import CpuPackedLinearMethod, DenseLinearMethod

    def plain(linear: nn.Module) -> bool:  # float weights as loaded: no scales (an 8-bit checkpoint), no bias
        return (linear.bias is None and linear.weight.is_floating_point() and linear.weight.numel() > 0
                and not any(hasattr(linear, n) for n in ("weight_scale_inv", "weight_scale", "weight_zero_point"))
                and isinstance(linear.method, (DenseLinearMethod, CpuPackedLinearMethod)))

    a, b = first.weight, second.weight
    return plain(first) and plain(second) and a.dtype == b.dtype and a.device == b.device and a.shape[1] == b.shape[1]
