"""DeepSeek-V3 multi-token prediction (MTP) layer, one depth, used as a speculative drafter (math only).

DeepSeek-V3 paper sec. 2.2; the checkpoint stores it as `model.layers.{N}.*` with N =
num_hidden_layers. For position i, with h_i the main model's final (normed) hidden state and
t_{i+1} the token that follows position i:

    x_i  = eh_proj(concat(enorm(embed(t_{i+1})), hnorm(h_i)))      [T, 2H] -> [T, H]
    y_i  = shared_head.norm(DecoderLayer_N(x_i))                   [T, H], attends over MTP KV
    p_i  = shared_head.head(y_i)                                   predicts t_{i+2}

Chaining for k > 1 drafts feeds y_i back in place of h_i (with the draft as t_{i+2}).
The layer has its own MLA attention, hence its own paged latent cache (one more `kv_cache`), read
through the main model's block tables (same positions).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from deepserve.config import ModelConfig
from deepserve.layers.embedding import LMHead, VocabEmbedding
from deepserve.layers.linear import ReplicatedLinear
from deepserve.layers.moe import RouterConfig
from deepserve.layers.norm import RMSNorm
from deepserve.layers.rotary import RotaryEmbedding
from deepserve.models.deepseek_v2 import DeepseekDecoderLayer, default_loader, load_expert, map_name

# Decoder-layer parts of the checkpoint's MTP layer live under `layer.` here.
_DECODER_PARTS = ("self_attn.", "mlp.", "input_layernorm.", "post_attention_layernorm.")
SHARED_WEIGHTS = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the main model's


class SharedHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.head = LMHead(config.vocab_size, config.hidden_size)


class DeepseekMTP(nn.Module):
    """forward(input_ids [T], positions [T], previous_hidden [T, H]) -> [T, H] (normed for the head)."""

    def __init__(self, config: ModelConfig, attention_mode: str = "auto", v3_defaults: bool = True):
        super().__init__()
        if config.num_nextn_predict_layers < 1:
            raise ValueError(f"{config.architecture}: num_nextn_predict_layers is 0, no MTP layer")
        self.config = config
        self.layer_idx = config.num_hidden_layers
        router = RouterConfig.from_model_config(config, v3_defaults) if config.n_routed_experts else None
        rotary = RotaryEmbedding(config.qk_rope_head_dim, config.max_position_embeddings, config.rope_theta,
                                 config.rope_scaling,
                                 interleaved=bool(config.hf_config.get("rope_interleave", True)))
        h = config.hidden_size
        self.embed_tokens = VocabEmbedding(config.vocab_size, h)
        self.enorm = RMSNorm(h, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(h, eps=config.rms_norm_eps)
        self.eh_proj = ReplicatedLinear(2 * h, h, bias=False)
        self.layer = DeepseekDecoderLayer(config, self.layer_idx, rotary, router, attention_mode)
        self.shared_head = SharedHead(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                previous_hidden: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] int64 (t_{i+1} at position i); previous_hidden [T, H] -> [T, H]."""
        x = torch.cat([self.enorm(self.embed_tokens(input_ids)), self.hnorm(previous_hidden)], dim=-1)
        hidden, residual = self.layer(positions, self.eh_proj(x), None)  # x: [T, 2H]
        hidden, _ = self.shared_head.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """hidden: [N, H] -> logits [N, vocab] float32 (float32=False: the head's dtype, `LMHead`)."""
        return self.shared_head.head(hidden, float32)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int]:
        """The MTP layer's latent cache: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]."""
        return (num_blocks, block_size, self.config.kv_lora_rank + self.config.qk_rope_head_dim)

    def own_name(self, hf_name: str) -> str | None:
        """`model.layers.{N}.X` -> our parameter name for X (None: not this layer's tensor)."""
        prefix = f"model.layers.{self.layer_idx}."
        if not hf_name.startswith(prefix):
            return None
        name = hf_name[len(prefix):]
        return "layer." + name if name.startswith(_DECODER_PARTS) else name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy the MTP layer's checkpoint tensors (others are ignored); the parameter names filled."""
        params = dict(self.named_parameters())
        filled: set[str] = set()
        for hf_name, tensor in weights:
            name = self.own_name(hf_name)
            if name is None or name.endswith("rotary_emb.inv_freq"):
                continue
            target = map_name(name)
            param = params.get(target.param)
            if param is None:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no counterpart in DeepseekMTP")
            if target.expert is not None:
                load_expert(param, tensor, target.expert, target.shard)
            else:
                getattr(param, "weight_loader", default_loader)(param, tensor, target.shard)
            filled.add(target.param)
        return filled


__all__ = ["DeepseekMTP", "SHARED_WEIGHTS"]
