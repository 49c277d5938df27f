"""Qwen2 (the R1-Distill-Qwen models): Llama with a bias on q/k/v (not on o_proj or the MLP)."""

from __future__ import annotations

from deepserve.config import ModelConfig
from deepserve.models.llama import LlamaBiases, LlamaForCausalLM


def _sliding_layers(config: ModelConfig) -> list[int]:
    """Indices of layers HF runs with sliding-window attention (none in the R1 distills)."""
    raw = config.hf_config
    if raw.get("layer_types"):
        return [i for i, t in enumerate(raw["layer_types"]) if t == "sliding_attention"]
    if not raw.get("use_sliding_window", False):
        return []
    first = raw.get("max_window_layers", 28)
    return list(range(first, config.num_hidden_layers))


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, attention_mode: str = "auto"):
        sliding = _sliding_layers(config)
        if sliding:
            raise ValueError(f"Qwen2 sliding-window attention (layers {sliding}) is not supported")
        super().__init__(config, attention_mode)

    @staticmethod
    def biases(config: ModelConfig) -> LlamaBiases:
        return LlamaBiases(qkv=True, o=False, mlp=False)
