"""Llama (2, 3, 3.1; the R1-Distill-Llama models): pre-norm decoder, GQA, SwiGLU, neox RoPE.

Math only: per-batch metadata reaches the attention backend through the forward context.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch
from torch import nn

from deepserve.config import ModelConfig
from deepserve.layers.activation import SiluAndMul, get_act_and_mul
from deepserve.layers.attention import make_attention
from deepserve.layers.decoder import PreNormDecoderLayer
from deepserve.layers.embedding import LMHead, VocabEmbedding
from deepserve.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                     RowParallelLinear, default_weight_loader, silu_and_mul_mlp)
from deepserve.layers.linear_method import PerTokenQuant
from deepserve.layers.norm import RMSNorm
from deepserve.layers.rotary import RotaryEmbedding

# Checkpoint name mapping: an HF name component -> (our component, shard id). Other names are 1:1.
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# Checkpoint tensors with no parameter behind them (precomputed rotary tables).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


class LlamaBiases(NamedTuple):
    qkv: bool
    o: bool
    mlp: bool


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, biases: LlamaBiases):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.resolved_head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads,
                                          self.num_kv_heads, bias=biases.qkv)
        self.o_proj = RowParallelLinear(self.num_heads * self.head_dim, config.hidden_size, bias=biases.o)
        # RoPE (shared by all layers) is the backend's to apply: with the cache write, in one launch on CUDA
        self.attn = make_attention(self.num_heads, self.head_dim, self.num_kv_heads, rotary=rotary_emb)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor | PerTokenQuant) -> torch.Tensor:
        """positions [T] int64, hidden [T, hidden] (or its PerTokenQuant, for qkv_proj only) -> [T, hidden]."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, H_kv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, positions).flatten(1))  # q, k rotated inside; [T, H * D] -> [T, hidden]


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, bias: bool):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias)
        self.act_fn = get_act_and_mul(config.hidden_act)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias)
        self.gate_up_proj.silu_gate_up = type(self.act_fn) is SiluAndMul  # its method may reorder the rows

    def forward(self, x: torch.Tensor | PerTokenQuant) -> torch.Tensor:
        """x [T, hidden] (or its PerTokenQuant, for gate_up_proj only) -> [T, hidden]."""
        if type(self.act_fn) is SiluAndMul:  # W8A8 methods fuse it with their GEMMs / input quantisation
            return silu_and_mul_mlp(self.gate_up_proj, self.down_proj, x)  # [T, hidden]
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # [T, 2I] -> [T, I] -> [T, hidden]


class LlamaDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, biases: LlamaBiases):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, rotary_emb, biases)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, biases.mlp)

    def attention_input_linear(self) -> QKVParallelLinear:
        return self.self_attn.qkv_proj

    def mlp_input_linear(self) -> MergedColumnParallelLinear:
        return self.mlp.gate_up_proj


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, biases: LlamaBiases):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(config.resolved_head_dim, config.max_position_embeddings,
                                 config.rope_theta, config.rope_scaling, interleaved=False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rotary, biases)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """`attention_mode` selects MLA paths in DeepSeek models; dense models have one path."""

    def __init__(self, config: ModelConfig, attention_mode: str = "auto"):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.biases(config))
        tie_to = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tie_to=tie_to)

    @staticmethod
    def biases(config: ModelConfig) -> LlamaBiases:
        return LlamaBiases(qkv=config.attention_bias, o=config.attention_bias,
                           mlp=bool(config.hf_config.get("mlp_bias", False)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] int64 -> final-normed hidden [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32 (float32=False: the head's dtype, `LMHead`)."""
        return self.lm_head(hidden, float32)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.config.num_key_value_heads, self.config.resolved_head_dim)

    def map_name(self, hf_name: str) -> tuple[str, str | int | None] | None:
        """Our parameter name and shard id for a checkpoint tensor; None if it is to be skipped."""
        if hf_name.endswith(IGNORED_SUFFIXES):
            return None
        if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None  # the head is the embedding
        parts = hf_name.split(".")
        for i, part in enumerate(parts):
            if part in STACKED_PARAMS:
                ours, shard = STACKED_PARAMS[part]
                return ".".join(parts[:i] + [ours] + parts[i + 1:]), shard
        return hf_name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors in; returns the names of the parameters filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            target = self.map_name(hf_name)
            if target is None:
                continue
            name, shard = target
            if name not in params:
                raise ValueError(f"unknown checkpoint tensor {hf_name!r}: {type(self).__name__} "
                                 f"has no parameter {name!r}")
            param = params[name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                loader(param, tensor, shard)
            except ValueError as exc:
                raise ValueError(f"checkpoint tensor {hf_name!r} (parameter {name!r}): {exc}") from None
            loaded.add(name)
        return loaded
