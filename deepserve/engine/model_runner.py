"""Runs one scheduled batch: builds the flat inputs and the ForwardContext, runs the model,
samples the sequences whose chunk reached their end."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from deepserve.engine.kv_cache import allocate_kv_caches, bind_kv_cache
from deepserve.engine.scheduler import ScheduledBatch, ScheduledSeq
from deepserve.engine.sequence import TokenLogprob
from deepserve.forward_context import build_forward_context, forward_context
from deepserve.layers.sampler import Sampler, SamplingBatch, SamplingRequest, make_generator


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request id -> new token
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)  # where asked for


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, device: torch.device | str):
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        self.vocab_size = model.config.vocab_size
        dtype = next(model.parameters()).dtype
        self.kv_caches = allocate_kv_caches(model, num_blocks, block_size, dtype, self.device)
        bind_kv_cache(model, self.kv_caches)
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator | None] = {}

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> RunnerOutput:
        input_ids, ctx = self._prepare(batch.scheduled)
        with forward_context(ctx):
            hidden = self.model(input_ids, ctx.positions)  # [num_tokens, hidden]
        sampling = batch.sampling
        if not sampling:
            return RunnerOutput()
        logits = self.model.compute_logits(hidden[self._last_token_rows(batch.scheduled)])  # [N, V]
        out = self.sampler(logits.float(), self._sampling_batch(sampling))
        return self._collect(sampling, out)

    def release(self, request_id: str) -> None:
        """Forget per-request state (the seeded generator) of a finished request."""
        self._generators.pop(request_id, None)

    def _prepare(self, scheduled: list[ScheduledSeq]):
        ids: list[int] = []
        for entry in scheduled:
            ids.extend(entry.seq.token_ids[entry.start:entry.start + entry.num_new_tokens])
        ctx = build_forward_context(
            query_lens=[e.num_new_tokens for e in scheduled],
            seq_lens=[e.start + e.num_new_tokens for e in scheduled],
            block_tables=[e.seq.block_table for e in scheduled],
            block_size=self.block_size, device=self.device)
        return torch.tensor(ids, dtype=torch.int64).to(self.device, non_blocking=True), ctx

    def _last_token_rows(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """[num_sampling] int64 row of each sampling sequence's last new token in the flat batch."""
        rows, end = [], 0
        for entry in scheduled:
            end += entry.num_new_tokens
            if entry.is_last_chunk:
                rows.append(end - 1)
        return torch.tensor(rows, dtype=torch.int64, device=self.device)

    def _sampling_batch(self, sampling: list[ScheduledSeq]) -> SamplingBatch:
        requests = [SamplingRequest(e.seq.params, e.seq.prompt_token_ids, e.seq.output_token_ids,
                                    self._generator(e.seq.request_id, e.seq.params)) for e in sampling]
        return SamplingBatch.build(requests, self.vocab_size, self.device)

    def _generator(self, request_id: str, params) -> torch.Generator | None:
        if request_id not in self._generators:
            self._generators[request_id] = make_generator(params, self.device)
        return self._generators[request_id]

    @staticmethod
    def _collect(sampling: list[ScheduledSeq], out) -> RunnerOutput:
        result = RunnerOutput()
        for i, (entry, token) in enumerate(zip(sampling, out.token_ids.tolist())):
            result.sampled[entry.seq.request_id] = token
            if out.logprobs is not None and out.logprobs[i] is not None:
                result.logprobs[entry.seq.request_id] = out.logprobs[i]
        return result
