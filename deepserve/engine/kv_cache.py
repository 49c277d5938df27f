"""Allocation of the paged KV cache and binding of each layer's slice to its attention module.

`--kv-cache-dtype` (CacheConfig.kv_cache_dtype) picks the cache's storage: "auto" the model's
dtype, "fp8" / "int8" 8 bits per element plus a float32 scale per stored row (token x KV head),
held in a second tensor per layer, `kv_scales` (deepserve/layers/kv_quant.py). Only attention
modules that declare `kv_scales` take an 8-bit cache: the dense MHA/GQA backends ([2, N, bs, H_kv, D]
rows, scales [2, N, bs, H_kv]) and MLA ([N, bs, R + Dr] rows, one scale per token: [N, bs]); the MTP
draft layer (an MLA layer, spec_decode/proposer.py) takes the main model's cache format.

Attention modules whose decode kernel can fuse its split-K merge (TritonAttention, MLA) declare
`split_counters`, an empty [0, W] int32 placeholder (W counters per sequence); `bind_split_counters`
replaces it with zeros [max_num_seqs, W] on the device, kept for the engine's life like the cache, so a
captured CUDA graph records no memset (kernels/split_k.py: every launch leaves them zero again).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from deepserve.config import ConfigError, EngineConfig, ModelConfig
from deepserve.layers.kv_quant import SCALE_DTYPE, is_quantized, kv_storage_dtype, scales_shape
from deepserve.platforms import Platform


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """Modules that own a paged cache (they declare `kv_cache`), in forward order."""
    return [m for m in model.modules() if hasattr(m, "kv_cache")]


def check_kv_cache_dtype(kv_cache_dtype: str, model_config: ModelConfig, platform: Platform) -> None:
    """ConfigError where `--kv-cache-dtype` cannot be served: fp8 on a platform without float8 support.
    (MLA models take an 8-bit latent cache too: one scale per row [latent | rope], layers/mla.py.)"""
    if kv_cache_dtype == "auto":
        return
    if kv_cache_dtype == "fp8" and not platform.supports_fp8_kv_cache():
        raise ConfigError(f"--kv-cache-dtype fp8 needs float8_e4m3fn support, which {platform.name} "
                          f"({platform.device_name()}) lacks (CUDA: compute capability 8.9+); "
                          f"use --kv-cache-dtype int8")


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_config: ModelConfig, platform: Platform,
                           model_dtype: torch.dtype) -> torch.dtype:
    """The cache's storage dtype for `--kv-cache-dtype` (auto: `model_dtype`), after the checks of
    `check_kv_cache_dtype`."""
    check_kv_cache_dtype(kv_cache_dtype, model_config, platform)
    return kv_storage_dtype(kv_cache_dtype, model_dtype)


def kv_cache_dtype_of(config: EngineConfig, model: nn.Module, platform: Platform) -> torch.dtype:
    """The storage dtype of `model`'s cache under `config.cache.kv_cache_dtype`."""
    return resolve_kv_cache_dtype(config.cache.kv_cache_dtype, config.model_config, platform,
                                  next(model.parameters()).dtype)


def allocate_kv_caches(model: nn.Module, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: torch.device | str) -> list[torch.Tensor]:
    """One zeroed cache tensor per attention layer, shaped by `model.kv_cache_shape`, in `dtype`
    (the model's, or int8 / float8_e4m3fn: then `allocate_kv_scales` gives its scales)."""
    shape = model.kv_cache_shape(num_blocks, block_size)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in attention_layers(model)]


def allocate_kv_scales(caches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per cache: zeroed float32 scales [cache.shape[:-1]] for an 8-bit cache, else an empty tensor."""
    return [torch.zeros(scales_shape(c.shape), dtype=SCALE_DTYPE, device=c.device) if is_quantized(c.dtype)
            else torch.empty(0, device=c.device) for c in caches]


def bind_kv_cache(model: nn.Module, caches: list[torch.Tensor], scales: list[torch.Tensor] | None = None) -> None:
    """Give each attention layer its cache (and its scales: required for an 8-bit cache)."""
    layers = attention_layers(model)
    if len(layers) != len(caches) or (scales is not None and len(scales) != len(caches)):
        raise ValueError(f"{len(caches)} caches ({'no' if scales is None else len(scales)} scales) "
                         f"for {len(layers)} attention layers")
    for i, (layer, cache) in enumerate(zip(layers, caches)):
        scale = torch.empty(0, device=cache.device) if scales is None else scales[i]
        if is_quantized(cache.dtype) and not hasattr(layer, "kv_scales"):
            raise ValueError(f"{type(layer).__name__} does not support an 8-bit ({cache.dtype}) KV cache")
        if is_quantized(cache.dtype) and tuple(scale.shape) != scales_shape(cache.shape):
            raise ValueError(f"an 8-bit KV cache {tuple(cache.shape)} needs scales {scales_shape(cache.shape)}, "
                             f"got {tuple(scale.shape)}")
        layer.kv_cache = cache
        if hasattr(layer, "kv_scales"):
            layer.kv_scales = scale


def bind_split_counters(model: nn.Module, max_num_seqs: int, device: torch.device | str) -> None:
    """Give each attention layer that declares `split_counters` ([0, W] int32) zeroed counters
    [max_num_seqs, W] int32 on `device`: decode batches of up to max_num_seqs sequences then merge their
    split-K partials inside the decode kernel (larger ones, and layers left unbound, take two launches)."""
    for layer in attention_layers(model):
        if hasattr(layer, "split_counters"):
            width = layer.split_counters.shape[1]
            layer.split_counters = torch.zeros(max_num_seqs, width, dtype=torch.int32, device=device)


def bound_kv_caches(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The caches and scales bound now (to put back with `bind_kv_cache` after a temporary cache)."""
    layers = attention_layers(model)
    return ([layer.kv_cache for layer in layers],
            [getattr(layer, "kv_scales", torch.empty(0)) for layer in layers])


@contextlib.contextmanager
def temporary_kv_cache(model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device | str) -> Iterator[list[torch.Tensor]]:
    """Bind zeroed caches of `dtype` (with scales when 8-bit) for the block; the caches bound before
    are put back afterwards. Yields the temporary caches."""
    previous = bound_kv_caches(model)
    caches = allocate_kv_caches(model, num_blocks, block_size, dtype, device)
    bind_kv_cache(model, caches, allocate_kv_scales(caches))
    try:
        yield caches
    finally:
        bind_kv_cache(model, *previous)


def bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block costs across all layers: the cache elements in `dtype`, plus for an 8-bit
    cache one float32 scale per row of head_dim elements."""
    shape = torch.Size(model.kv_cache_shape(1, block_size))
    per_layer = shape.numel() * torch.empty((), dtype=dtype).element_size()
    if is_quantized(dtype):
        per_layer += torch.Size(scales_shape(shape)).numel() * torch.empty((), dtype=SCALE_DTYPE).element_size()
    return per_layer * len(attention_layers(model))
