"""The engine core: scheduler + model runner, token ids in and out. No text, no tokenizer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from torch import nn

from deepserve.config import EngineConfig
from deepserve.engine.block_manager import BlockManager, cdiv
from deepserve.engine.cuda_graph import DecodeGraphs, capture_sizes, supports_graphs
from deepserve.engine.kv_cache import bytes_per_block, kv_cache_dtype_of
from deepserve.engine.memory import (KVCachePlan, cpu_num_blocks, gpu_num_blocks, oom_guard,
                                     profile_lengths, profile_memory)
from deepserve.engine.model_runner import ModelRunner
from deepserve.engine.outputs import EngineOutput
from deepserve.engine.prefill_graph import PrefillGraphs, prefill_capture_sizes, prefill_graph_tokens
from deepserve.engine.scheduler import DraftBudget, PendingToken, ScheduledBatch, Scheduler, SchedulerStats
from deepserve.engine.spec_decode import DraftTokenBudget, MTPProposer
from deepserve.engine.sequence import Sequence
from deepserve.platforms import Platform, get_platform
from deepserve.platforms.interface import HostCopy
from deepserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
GRAPH_HINT = ("start with --enforce-eager, or lower --max-graph-batch-size, --max-num-seqs, "
              "--max-prefill-graph-tokens or --gpu-memory-utilization")


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    kv_cache_usage: float  # 0..1, blocks held by live requests
    prefix_cache_hit_rate: float
    num_kv_blocks: int
    spec_num_draft_tokens: int = 0  # cumulative: draft tokens verified (speculative decoding)
    spec_num_accepted_tokens: int = 0  # cumulative: of those, accepted

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_num_accepted_tokens / self.spec_num_draft_tokens if self.spec_num_draft_tokens else 0.0


def use_cuda_graphs(config: EngineConfig, platform: Platform, model: nn.Module) -> bool:
    """Graphs on: the platform captures, --enforce-eager is off, the attention is graph-safe."""
    if config.enforce_eager or not platform.supports_graph_capture or config.max_graph_batch_size < 1:
        return False
    if config.speculative is not None:
        logger.info("CUDA graphs off: speculative decoding runs every batch eagerly")
        return False
    if not supports_graphs(model):
        logger.info("CUDA graphs off: the attention backend does not declare supports_cuda_graph")
        return False
    return True


def use_async_scheduling(config: EngineConfig, platform: Platform) -> bool:
    """--async-scheduling: auto means on where the device runs asynchronously to the host; never
    with speculative decoding (its drafts need the verified tokens on the host)."""
    if config.speculative is not None or config.async_scheduling == "off":
        return False
    return config.async_scheduling == "on" or platform.device_type != "cpu"


def _overlappable(batch: ScheduledBatch) -> bool:
    """A batch may be launched before the previous tokens are read back: its sampling is plain
    (no logprobs, no penalties reading the token history) and it verifies no drafts."""
    return all(e.seq.params.logprobs is None and not e.seq.params.uses_token_history and not e.num_spec_tokens
               for e in batch.scheduled)


def plan_kv_cache(config: EngineConfig, model: nn.Module, platform: Platform, graphs: bool,
                  draft: nn.Module | None = None) -> KVCachePlan:
    """KV blocks to allocate: --num-kv-blocks, else the CPU byte budget, else the profiled GPU
    budget (deepserve/engine/memory.py); logged. A block holds every layer of `model` and `draft`
    in the --kv-cache-dtype storage (8-bit: with a float32 scale per token and head)."""
    cache = config.cache
    dtype = kv_cache_dtype_of(config, model, platform)
    per_block = sum(bytes_per_block(m, cache.block_size, dtype) for m in (model, draft) if m is not None)
    if cache.num_blocks is not None:
        num_blocks = cache.num_blocks
    elif platform.device_type == "cpu":
        num_blocks = cpu_num_blocks(config, per_block)
    else:
        with oom_guard(platform, "profiling peak activation memory"):
            profile = profile_memory(model, config, platform, graphs)
        logger.info("memory: %s", profile.describe(cache.gpu_memory_utilization))
        num_blocks = gpu_num_blocks(config, profile, per_block)
    plan = KVCachePlan(num_blocks, cache.block_size, per_block, config.max_model_len, dtype)
    logger.info(plan.summary())
    return plan


def load_draft_model(config: EngineConfig, model: nn.Module) -> nn.Module | None:
    """The speculative draft model (--speculative mtp: the checkpoint's MTP layer), or None."""
    if config.speculative is None:
        return None
    from deepserve.engine.spec_decode.loader import load_mtp  # lazy: only with --speculative

    return load_mtp(config, model)


def draft_budget(config: EngineConfig) -> DraftBudget | None:
    """The scheduler's speculative budget term (None: no drafts)."""
    if config.speculative is None:
        return None
    return DraftTokenBudget(config.speculative.num_speculative_tokens, config.max_model_len)


class EngineCore:
    def __init__(self, config: EngineConfig, model: nn.Module, eos_token_ids: tuple[int, ...] = ()):
        self.config = config
        self.eos_token_ids = eos_token_ids or config.model_config.eos_token_id
        self.platform = get_platform(config.device)
        graphs = use_cuda_graphs(config, self.platform, model)
        mtp = load_draft_model(config, model)
        self.kv_plan = plan_kv_cache(config, model, self.platform, graphs, mtp)
        num_blocks = self.kv_plan.num_blocks
        self.block_manager = BlockManager(num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, config.max_model_len,
                                   drafts=draft_budget(config))
        with oom_guard(self.platform, "allocating the KV cache"):
            max_seqs = config.scheduler.max_num_seqs  # the largest decode batch (split-K counters)
            proposer = None if mtp is None else MTPProposer(
                mtp, config.speculative.num_speculative_tokens, num_blocks, config.cache.block_size,
                config.max_model_len, config.device, kv_cache_dtype=self.kv_plan.dtype, max_num_seqs=max_seqs)
            self.runner = ModelRunner(model, num_blocks, config.cache.block_size, config.device, proposer,
                                      kv_cache_dtype=self.kv_plan.dtype, max_num_seqs=max_seqs)
        self.async_scheduling = use_async_scheduling(config, self.platform)
        self._in_flight: tuple[HostCopy, list[PendingToken]] | None = None  # launched, not yet resolved
        if self.platform.jit_kernels:
            self._warm_up()
        if graphs:
            self._capture_graphs()

    def _warm_up(self) -> None:
        start = time.perf_counter()
        with oom_guard(self.platform, "warming up the kernels"):
            # the profiled step (memory planning) is the largest the scheduler can form: warm up to it,
            # not past it (max_num_seqs x max_model_len may be below the token budget)
            self.runner.warm_up(sum(profile_lengths(self.config)), self.config.max_model_len)
        self.platform.synchronize()
        logger.info("warmed up the kernels in %.1f s", time.perf_counter() - start)

    def _capture_graphs(self) -> None:
        """One CUDA graph per decode batch size of the ladder, then one per padded prefill chunk size
        (engine/prefill_graph.py) where the model supports them, over the allocated KV cache; all in
        one capturer's memory pool."""
        config, block_size = self.config, self.config.cache.block_size
        capturer = self.platform.graph_capturer()
        sizes = capture_sizes(config.scheduler.max_num_seqs, config.max_graph_batch_size)
        graphs = DecodeGraphs(sizes, cdiv(config.max_model_len, block_size), block_size,
                              config.max_model_len, self.runner.device)
        self._capture(lambda: self.runner.capture_decode_graphs(graphs, capturer), sizes, "decode batches %s..%s")
        sizes = prefill_capture_sizes(prefill_graph_tokens(config, self.runner.model))
        if not sizes:
            if config.max_prefill_graph_tokens > 0:
                logger.info("prefill CUDA graphs off: the attention backend does not declare "
                            "supports_prefill_cuda_graph, or the model has MoE layers")
            return
        prefill = PrefillGraphs(sizes, cdiv(config.max_model_len, block_size), block_size,
                                config.max_model_len, self.runner.device)
        self._capture(lambda: self.runner.capture_prefill_graphs(prefill, capturer), sizes,
                      "prefill chunks of %s..%s tokens")

    def _capture(self, capture: Callable[[], None], sizes: tuple[int, ...], what: str) -> None:
        """Run `capture` under the OOM guard; log the count, the sizes, the time and the pool's growth."""
        start, before = time.perf_counter(), self.platform.memory_stats().reserved
        with oom_guard(self.platform, "capturing CUDA graphs", GRAPH_HINT):
            capture()
        used = self.platform.memory_stats().reserved - before
        logger.info("captured %d CUDA graphs for " + what + " in %.1f s (%.0f MiB)",
                    len(sizes), sizes[0], sizes[-1], time.perf_counter() - start, used / 2**20)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        vocab = self.config.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"request {request_id!r}: prompt token ids must be in [0, {vocab})")
        seq = Sequence(request_id, prompt_token_ids, params, time.monotonic(), self.eos_token_ids)
        self.scheduler.add(seq)

    def abort_requests(self, request_ids: list[str]) -> list[EngineOutput]:
        outputs = [out for rid in request_ids if (out := self.scheduler.abort(rid)) is not None]
        for rid in request_ids:
            self.runner.release(rid)
        return outputs

    def step(self) -> list[EngineOutput]:
        """Run one batch; the outputs of the tokens that became known. With async scheduling a
        plain batch is launched, then the previous one (still in flight until now) is resolved:
        the host schedules and prepares while the device computes, and outputs trail by a step."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return self._resolve_in_flight()
        if not (self.async_scheduling and _overlappable(batch)):
            outputs = self._resolve_in_flight()  # its pending tokens are inputs of this batch
            result = self.runner.execute(batch)
            return self._released(outputs + self.scheduler.update(batch, result.sampled, result.logprobs,
                                                                   result.drafts))
        tokens = self.platform.copy_to_host_async(self.runner.launch(batch))
        pending = self.scheduler.commit(batch)
        outputs = self._resolve_in_flight()
        self._in_flight = (tokens, pending)
        return outputs

    def _resolve_in_flight(self) -> list[EngineOutput]:
        if self._in_flight is None:
            return []
        tokens, pending = self._in_flight
        self._in_flight = None
        tokens.wait()
        return self._released(self.scheduler.resolve(pending, tokens.tensor.tolist()))

    def _released(self, outputs: list[EngineOutput]) -> list[EngineOutput]:
        for out in outputs:
            if out.finished:
                self.runner.release(out.request_id)
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def stats(self) -> EngineStats:
        s: SchedulerStats = self.scheduler.stats()
        bm = self.block_manager
        spec = self.runner.verifier.stats
        return EngineStats(s.num_running, s.num_waiting, s.num_preemptions, bm.usage,
                           bm.stats().prefix_hit_rate, bm.num_blocks,
                           spec.num_draft_tokens, spec.num_accepted_tokens)
