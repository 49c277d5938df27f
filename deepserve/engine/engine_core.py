"""The engine core: scheduler + model runner, token ids in and out. No text, no tokenizer."""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from deepserve.config import EngineConfig
from deepserve.engine.block_manager import BlockManager, cdiv
from deepserve.engine.kv_cache import bytes_per_block
from deepserve.engine.model_runner import ModelRunner
from deepserve.engine.outputs import EngineOutput
from deepserve.engine.scheduler import Scheduler, SchedulerStats
from deepserve.engine.sequence import Sequence
from deepserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    kv_cache_usage: float  # 0..1, blocks held by live requests
    prefix_cache_hit_rate: float
    num_kv_blocks: int


def plan_num_blocks(config: EngineConfig, model: nn.Module, dtype) -> int:
    """KV blocks to allocate: the configured number, else what the byte budget allows, never more
    than max_num_seqs full-length sequences need (+1 for the reserved null block)."""
    cache, sched = config.cache, config.scheduler
    needed = sched.max_num_seqs * cdiv(config.max_model_len, cache.block_size) + 1
    if cache.num_blocks is not None:
        return cache.num_blocks
    affordable = cache.cpu_kv_cache_bytes // bytes_per_block(model, cache.block_size, dtype)
    if affordable < 2:
        raise ValueError(f"the KV cache budget of {cache.cpu_kv_cache_bytes} bytes holds no block; "
                         "raise --kv-cache-memory-gb")
    return int(min(needed, affordable))


class EngineCore:
    def __init__(self, config: EngineConfig, model: nn.Module, eos_token_ids: tuple[int, ...] = ()):
        self.config = config
        self.eos_token_ids = eos_token_ids or config.model_config.eos_token_id
        dtype = next(model.parameters()).dtype
        num_blocks = plan_num_blocks(config, model, dtype)
        self.block_manager = BlockManager(num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, config.max_model_len)
        self.runner = ModelRunner(model, num_blocks, config.cache.block_size, config.device)

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
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        result = self.runner.execute(batch)
        outputs = self.scheduler.update(batch, result.sampled, result.logprobs)
        for out in outputs:
            if out.finished:
                self.runner.release(out.request_id)
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        s: SchedulerStats = self.scheduler.stats()
        bm = self.block_manager
        return EngineStats(s.num_running, s.num_waiting, s.num_preemptions, bm.usage,
                           bm.stats().prefix_hit_rate, bm.num_blocks)
