"""How many KV-cache blocks the engine allocates.

CPU: the byte budget `--kv-cache-memory-gb` (CacheConfig.cpu_kv_cache_bytes).
GPU: after the weights are loaded,
    1. a profile forward at the largest step (max_num_batched_tokens tokens of prefill, over a
       small temporary cache) plus logits and sampling for max_num_seqs rows gives the peak
       activation memory;
    2. KV bytes = gpu_memory_utilization x card total - weights - peak activations
                  - memory outside torch (CUDA context, other processes) - a margin for the
                  CUDA-graph pool (`graph_margin`: the decode graphs' logits and activations, plus
                  the prefill graphs' activations of up to Tmax tokens, engine/prefill_graph.py);
    3. blocks = KV bytes / bytes per block, at most what max_num_seqs sequences of max_model_len
       can use; fewer blocks than one max_model_len sequence needs is InsufficientMemoryError.
An out-of-memory error during load, profile or capture becomes InsufficientMemoryError too (a
message that says what to change), never a raw CUDA OOM traceback.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from deepserve.config import EngineConfig
from deepserve.engine.block_manager import cdiv
from deepserve.platforms import Platform

logger = logging.getLogger(__name__)

GiB = 1 << 30
GRAPH_MARGIN_FLOOR = 256 << 20  # bytes kept for the CUDA-graph pool even for tiny models
WHAT_TO_CHANGE = ("lower --max-model-len or --max-num-batched-tokens, raise --gpu-memory-utilization, "
                  "use a quantised checkpoint (int8/fp8), or spread the model over more GPUs "
                  "(tensor parallelism)")


class InsufficientMemoryError(ValueError):
    """The model (or its KV cache) does not fit; the message says how much is needed and what
    to change. A ValueError so the CLI prints it as a one-line start-up error."""


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclass(frozen=True)
class MemoryProfile:
    """Bytes measured after loading and profiling (GPU)."""

    total: int  # the card
    weights: int  # allocated by torch before the profile (the weights)
    peak_activation: int  # peak allocated during the profile forward, above `weights`
    non_torch: int  # used outside torch's allocator: CUDA context, other processes
    graph_margin: int  # kept for the CUDA-graph pool (0 in eager mode)

    def kv_budget(self, utilization: float) -> int:
        """Bytes left for the KV cache under `utilization` (may be negative)."""
        used = self.weights + self.peak_activation + self.non_torch + self.graph_margin
        return int(self.total * utilization) - used

    def describe(self, utilization: float) -> str:
        return (f"{utilization:.2f} x {_gib(self.total)} = {_gib(int(self.total * utilization))} allowed; "
                f"weights {_gib(self.weights)}, peak activations {_gib(self.peak_activation)}, "
                f"outside torch {_gib(self.non_torch)}, CUDA-graph margin {_gib(self.graph_margin)}; "
                f"left for the KV cache {_gib(max(0, self.kv_budget(utilization)))}")


@dataclass(frozen=True)
class KVCachePlan:
    num_blocks: int  # including the null block
    block_size: int
    bytes_per_block: int  # every layer's K and V elements (+ their scales with an 8-bit cache)
    max_model_len: int
    dtype: torch.dtype | None = None  # the cache's storage dtype (None: not recorded)

    @property
    def num_tokens(self) -> int:
        """Token slots usable by requests (the null block excluded)."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def max_concurrency(self) -> float:
        """How many sequences of max_model_len fit at once."""
        return self.num_tokens / self.max_model_len

    def summary(self) -> str:
        return (f"KV cache: {self.num_blocks} blocks of {self.block_size} tokens "
                f"({_gib(self.num_blocks * self.bytes_per_block)}{_storage(self.dtype)}), {self.num_tokens} tokens, "
                f"max concurrency {self.max_concurrency:.2f}x at max_model_len {self.max_model_len}")


def _storage(dtype: torch.dtype | None) -> str:
    """", int8 + float32 scales per token and head" style label of a cache dtype for the start-up log."""
    from deepserve.layers.kv_quant import is_quantized

    if dtype is None:
        return ""
    name = str(dtype).removeprefix("torch.")
    return f", {name} + float32 scales per token and head" if is_quantized(dtype) else f", {name}"


def blocks_needed(config: EngineConfig) -> int:
    """Blocks that max_num_seqs full-length sequences can use, + 1 for the null block."""
    per_seq = cdiv(config.max_model_len, config.cache.block_size)
    return config.scheduler.max_num_seqs * per_seq + 1


def min_blocks(config: EngineConfig) -> int:
    """One max_model_len sequence + the null block: below this, no long request can run."""
    return cdiv(config.max_model_len, config.cache.block_size) + 1


def cpu_num_blocks(config: EngineConfig, bytes_per_block: int) -> int:
    """The byte budget (--kv-cache-memory-gb), capped at what the sequences can use."""
    affordable = config.cache.cpu_kv_cache_bytes // bytes_per_block
    if affordable < 2:
        raise ValueError(f"the KV cache budget of {config.cache.cpu_kv_cache_bytes} bytes holds no block; "
                         "raise --kv-cache-memory-gb")
    return int(min(blocks_needed(config), affordable))


def gpu_num_blocks(config: EngineConfig, profile: MemoryProfile, bytes_per_block: int) -> int:
    """Blocks the GPU budget affords (see the module docstring); InsufficientMemoryError if fewer
    than one max_model_len sequence needs."""
    utilization = config.cache.gpu_memory_utilization
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {utilization}")
    budget = profile.kv_budget(utilization)
    affordable = max(0, budget) // bytes_per_block
    need = min_blocks(config)
    if affordable < need:
        raise InsufficientMemoryError(
            f"not enough GPU memory for the KV cache: one sequence of max_model_len "
            f"{config.max_model_len} needs {_gib(need * bytes_per_block)}, but {profile.describe(utilization)}. "
            f"To fix: {WHAT_TO_CHANGE}")
    return int(min(blocks_needed(config), affordable))


def graph_margin(enabled: bool, max_graph_bs: int, vocab_size: int, peak_activation: int,
                 profile_tokens: int, prefill_tokens: int = 0) -> int:
    """Estimated CUDA-graph pool: the largest decode graph's logits (counted at 4 bytes, an upper bound) + that
    many tokens' share of the profiled activations (the decode step is a subset of the prefill step), + the
    largest prefill graph's `prefill_tokens` tokens' share of them (its output is hidden states, no logits;
    counted on top of the decode terms although the pool may reuse memory across captures), with a floor."""
    if not enabled or max_graph_bs <= 0:
        return 0

    def share(tokens: int) -> float:
        return peak_activation * min(1.0, tokens / max(1, profile_tokens))

    activations = share(max_graph_bs) + share(prefill_tokens)
    return int(max_graph_bs * vocab_size * 4 + activations) + GRAPH_MARGIN_FLOOR


# ------------------------------------------------------------------------------- profiling


def profile_lengths(config: EngineConfig) -> list[int]:
    """Prompt lengths of the profile batch: max_num_batched_tokens tokens (at most max_num_seqs
    sequences, each at most max_model_len)."""
    budget = min(config.scheduler.max_num_batched_tokens,
                 config.scheduler.max_num_seqs * config.max_model_len)
    full, rest = divmod(budget, config.max_model_len)
    return [config.max_model_len] * full + ([rest] if rest else [])


def _profile_forward(model: nn.Module, config: EngineConfig, device: torch.device, dtype: torch.dtype) -> None:
    """One prefill step of `profile_lengths` over a temporary cache of `dtype` (the KV storage
    dtype, so an 8-bit cache's quantisation is profiled too), then logits + sampling for
    max_num_seqs rows (top-k/top-p, the sampler's most memory-hungry path)."""
    from deepserve.engine.kv_cache import temporary_kv_cache
    from deepserve.forward_context import build_forward_context, forward_context
    from deepserve.layers.sampler import Sampler, SamplingBatch, SamplingRequest
    from deepserve.sampling_params import SamplingParams

    lens, bs = profile_lengths(config), config.cache.block_size
    tables, next_block = [], 1
    for n in lens:
        tables.append(list(range(next_block, next_block + cdiv(n, bs))))
        next_block += cdiv(n, bs)
    with temporary_kv_cache(model, next_block, bs, dtype, device):
        ctx = build_forward_context(lens, lens, tables, bs, device)
        ids = torch.zeros(sum(lens), dtype=torch.int64, device=device)
        with forward_context(ctx):
            hidden = model(ids, ctx.positions)  # [T, hidden]
        rows = torch.arange(config.scheduler.max_num_seqs, device=device) % hidden.shape[0]
        logits = model.compute_logits(hidden[rows]).float()  # [max_num_seqs, V]
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
        requests = [SamplingRequest(params, [0], []) for _ in range(logits.shape[0])]
        Sampler()(logits, SamplingBatch.build(requests, logits.shape[1], device))


@torch.inference_mode()
def profile_memory(model: nn.Module, config: EngineConfig, platform: Platform, graphs: bool) -> MemoryProfile:
    """Measure weights, peak activations and memory outside torch on the model's device."""
    from deepserve.engine.kv_cache import kv_cache_dtype_of
    from deepserve.engine.prefill_graph import prefill_graph_tokens

    device = next(model.parameters()).device
    dtype = kv_cache_dtype_of(config, model, platform)
    platform.synchronize()
    platform.empty_cache()
    weights = platform.memory_stats().allocated
    platform.reset_peak_memory_stats()
    _profile_forward(model, config, device, dtype)
    platform.synchronize()
    peak = platform.memory_stats().peak_allocated - weights
    platform.empty_cache()
    info, stats = platform.mem_get_info(), platform.memory_stats()
    non_torch = max(0, info.total - info.free - stats.reserved)
    prefill_tokens = prefill_graph_tokens(config, model) if graphs else 0
    margin = graph_margin(graphs, config.max_graph_batch_size, config.model_config.vocab_size, peak,
                          sum(profile_lengths(config)), prefill_tokens)
    return MemoryProfile(info.total, weights, max(0, peak), non_torch, margin)


@contextlib.contextmanager
def oom_guard(platform: Platform, what: str, hint: str = WHAT_TO_CHANGE) -> Iterator[None]:
    """Turn the platform's out-of-memory error during `what` into InsufficientMemoryError."""
    try:
        yield
    except platform.oom_errors() as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        try:
            info = platform.mem_get_info()
            where = f" (device has {_gib(info.total)}, {_gib(info.free)} free now)"
        except (NotImplementedError, RuntimeError):
            where = ""
        raise InsufficientMemoryError(f"out of memory while {what}{where}: {detail}. To fix: {hint}") from None
