"""DeepSeek-V2 / V2-Lite / V3 / R1: MLA attention + MoE with shared experts (math only).

Both `DeepseekV2ForCausalLM` and `DeepseekV3ForCausalLM` checkpoints load into the same modules;
they differ only in routing defaults (V3: sigmoid scores, `noaux_tc` with a score-correction bias)
and in V3's optional non-interleaved rope (`rope_interleave: false`).

The MTP module of V3 checkpoints (layer index >= num_hidden_layers) is skipped by `load_weights`;
`models/deepseek_mtp.py` loads it for speculative decoding (--speculative mtp).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from deepserve.config import ModelConfig
from deepserve.layers.decoder import PreNormDecoderLayer
from deepserve.layers.embedding import LMHead, VocabEmbedding
from deepserve.layers.linear import LinearBase, ReplicatedLinear, checked_copy
from deepserve.layers.mla import MLAAttention
from deepserve.layers.moe import DeepseekMoE, GatedMLP, RouterConfig
from deepserve.layers.norm import RMSNorm
from deepserve.layers.rotary import RotaryEmbedding

# HF checkpoint name -> our parameter: (regex on the HF name, replacement, shard id).
# Names that match none of these are our own names unchanged.
#   model.layers.L.mlp.{gate,up}_proj.weight                -> mlp.gate_up_proj.weight shard 0/1
#   model.layers.L.mlp.shared_experts.{gate,up}_proj.weight -> shared_experts.gate_up_proj.weight 0/1
#   model.layers.L.mlp.experts.E.gate_proj.weight           -> mlp.experts.w13[E, :I]
#   model.layers.L.mlp.experts.E.up_proj.weight             -> mlp.experts.w13[E, I:]
#   model.layers.L.mlp.experts.E.down_proj.weight           -> mlp.experts.w2[E]
#   model.layers.L.mlp.experts.{gate_up_proj,down_proj}     -> w13 / w2 whole (transformers>=5 layout)
# Block-FP8 checkpoints: a gate/up `weight_scale_inv` goes to gate_up_proj.weight_scale_inv, same shard
# (only loaded when the layer keeps fp8 weights; see deepserve/quant/block_fp8_loading.py).
NAME_MAP: tuple[tuple[str, str, int | None], ...] = (
    (r"\.(mlp|shared_experts)\.gate_proj\.weight(_scale_inv)?$", r".\1.gate_up_proj.weight\2", 0),
    (r"\.(mlp|shared_experts)\.up_proj\.weight(_scale_inv)?$", r".\1.gate_up_proj.weight\2", 1),
    (r"\.experts\.(\d+)\.gate_proj\.weight$", r".experts.w13", 0),
    (r"\.experts\.(\d+)\.up_proj\.weight$", r".experts.w13", 1),
    (r"\.experts\.(\d+)\.down_proj\.weight$", r".experts.w2", None),
    (r"\.experts\.gate_up_proj$", r".experts.w13", None),
    (r"\.experts\.down_proj$", r".experts.w2", None),
)
_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a parameter, a shard of it, and for experts which one."""

    param: str
    shard: int | None = None
    expert: int | None = None


def map_name(hf_name: str) -> Target:
    for pattern, replacement, shard in NAME_MAP:
        if re.search(pattern, hf_name):
            expert = _EXPERT_INDEX.search(hf_name)
            index = int(expert.group(1)) if expert else None
            return Target(re.sub(pattern, replacement, hf_name), shard, index)
    return Target(hf_name)


def load_expert(param: nn.Parameter, loaded: torch.Tensor, expert: int, shard: int | None) -> None:
    """w13 [E, 2I, H]: shard 0 (gate) -> rows :I, shard 1 (up) -> rows I:; w2 [E, H, I]: whole."""
    if expert >= param.shape[0]:
        raise ValueError(f"expert {expert} out of range (n_routed_experts {param.shape[0]})")
    dst = param.data[expert]
    if shard is not None:
        half = dst.shape[0] // 2
        dst = dst.narrow(0, shard * half, half)
    checked_copy(dst, loaded)


def default_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    checked_copy(param.data, loaded)


class DeepseekDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding,
                 router: RouterConfig | None, attention_mode: str):
        super().__init__()
        self.self_attn = MLAAttention(config, rotary, attention_mode)
        if config.is_moe_layer(layer_idx):
            self.mlp = DeepseekMoE(config, router)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def attention_input_linear(self) -> ReplicatedLinear | None:
        """MLA's merged input projection, once built (`MLAAttention.process_weights_after_loading`): the one
        linear that reads the normalised input; a quantised one takes it pre-quantised. None while q and kv_a
        are separate (both read it)."""
        return self.self_attn.qkv_a_proj

    def mlp_input_linear(self) -> LinearBase | None:
        """A dense layer's (before `first_k_dense_replace`) merged gate_up_proj; None for MoE layers, whose
        router and experts both read the normalised input."""
        return self.mlp.gate_up_proj if isinstance(self.mlp, GatedMLP) else None


class DeepseekModel(nn.Module):
    def __init__(self, config: ModelConfig, router: RouterConfig | None, interleaved_rope: bool,
                 attention_mode: str):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(config.qk_rope_head_dim, config.max_position_embeddings, config.rope_theta,
                                 config.rope_scaling, interleaved=interleaved_rope)
        self.layers = nn.ModuleList(
            DeepseekDecoderLayer(config, i, rotary, router, attention_mode)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> [T, H]."""
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DeepseekV2ForCausalLM(nn.Module):
    v3_defaults = False  # V3 checkpoints may omit scoring_func / topk_method (sigmoid, noaux_tc)

    def __init__(self, config: ModelConfig, attention_mode: str = "auto"):
        super().__init__()
        if not config.is_mla:
            raise ValueError(f"{config.architecture} needs kv_lora_rank > 0 (MLA) in config.json")
        self.config = config
        router = RouterConfig.from_model_config(config, self.v3_defaults) if config.n_routed_experts else None
        interleaved = bool(config.hf_config.get("rope_interleave", True))
        self.model = DeepseekModel(config, router, interleaved, attention_mode)
        tie = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tie_to=tie)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> hidden [T, H]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """hidden: [N, H] -> logits [N, vocab] float32 (float32=False: the head's dtype, `LMHead`)."""
        return self.lm_head(hidden, float32)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int]:
        """One layer's latent cache: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]."""
        return (num_blocks, block_size, self.config.kv_lora_rank + self.config.qk_rope_head_dim)

    def _skipped(self, hf_name: str) -> bool:
        """MTP layers (index >= num_hidden_layers), rotary buffers, a tied head's copy."""
        layer = _LAYER_INDEX.match(hf_name)
        if layer and int(layer.group(1)) >= self.config.num_hidden_layers:
            return True
        if self.config.tie_word_embeddings and hf_name == "lm_head.weight":
            return True
        return hf_name.endswith(_SKIPPED_SUFFIXES)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into the parameters; returns the names of the parameters filled."""
        params = dict(self.named_parameters())
        filled: set[str] = set()
        for hf_name, tensor in weights:
            if self._skipped(hf_name):
                continue
            target = map_name(hf_name)
            param = params.get(target.param)
            if param is None:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no counterpart in {type(self).__name__}")
            try:
                if target.expert is not None:
                    load_expert(param, tensor, target.expert, target.shard)
                else:
                    getattr(param, "weight_loader", default_loader)(param, tensor, target.shard)
            except ValueError as exc:
                raise ValueError(f"checkpoint tensor {hf_name!r} -> {target.param}: {exc}") from None
            filled.add(target.param)
        return filled


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    v3_defaults = True


__all__ = ["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "NAME_MAP", "map_name"]
