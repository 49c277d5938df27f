"""Allocation of the paged KV cache and binding of each layer's slice to its attention module."""

from __future__ import annotations

import torch
from torch import nn


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """Modules that own a paged cache (they declare `kv_cache`), in forward order."""
    return [m for m in model.modules() if hasattr(m, "kv_cache")]


def allocate_kv_caches(model: nn.Module, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: torch.device | str) -> list[torch.Tensor]:
    """One zeroed cache tensor per attention layer, shaped by `model.kv_cache_shape`."""
    shape = model.kv_cache_shape(num_blocks, block_size)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in attention_layers(model)]


def bind_kv_cache(model: nn.Module, caches: list[torch.Tensor]) -> None:
    layers = attention_layers(model)
    if len(layers) != len(caches):
        raise ValueError(f"{len(caches)} caches for {len(layers)} attention layers")
    for layer, cache in zip(layers, caches):
        layer.kv_cache = cache


def bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block costs across all layers."""
    one = torch.Size(model.kv_cache_shape(1, block_size)).numel()
    return one * len(attention_layers(model)) * torch.empty((), dtype=dtype).element_size()
