"""HF `architectures[0]` -> model class, imported lazily so unused model files cost nothing."""

from __future__ import annotations

import importlib

from torch import nn

# architecture name -> (module path, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("deepserve.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("deepserve.models.qwen2", "Qwen2ForCausalLM"),
    "DeepseekV2ForCausalLM": ("deepserve.models.deepseek_v2", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("deepserve.models.deepseek_v2", "DeepseekV3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    """The class for `architecture`; ValueError listing the supported ones if it is unknown."""
    if architecture not in _MODELS:
        raise ValueError(f"unsupported model architecture {architecture!r}; supported: "
                         f"{', '.join(supported_architectures())}")
    module_path, class_name = _MODELS[architecture]
    return getattr(importlib.import_module(module_path), class_name)
