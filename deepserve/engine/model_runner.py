"""Runs one scheduled batch: builds the flat inputs and the ForwardContext, runs the model,
samples the sequences whose chunk reached their end.

A decode-only batch replays a captured CUDA graph when `capture_decode_graphs` was called
(CUDA platforms, not --enforce-eager, graph-safe attention); prefill and mixed batches, and decode
batches larger than the largest graph, run eagerly."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from deepserve.engine.cuda_graph import Capturer, DecodeGraphs
from deepserve.engine.kv_cache import allocate_kv_caches, bind_kv_cache
from deepserve.engine.scheduler import ScheduledBatch, ScheduledSeq
from deepserve.engine.sequence import TokenLogprob
from deepserve.forward_context import ForwardContext, build_forward_context, forward_context
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
        self.graphs: DecodeGraphs | None = None

    @torch.inference_mode()
    def capture_decode_graphs(self, graphs: DecodeGraphs, capturer: Capturer) -> None:
        """Capture the decode step (ids, positions -> fp32 logits) for every size of `graphs`."""
        graphs.capture(self._decode_step, capturer)
        self.graphs = graphs

    def _decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B] int64, [B] int64 -> logits [B, V] float32 (every row samples in a decode batch)."""
        return self.model.compute_logits(self.model(input_ids, positions)).float()

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> RunnerOutput:
        sampling = batch.sampling
        if self.graphs is not None and self.graphs.can_run([e.num_new_tokens for e in batch.scheduled]):
            logits = self._replay(batch.scheduled)
        else:
            logits = self._run_eager(batch.scheduled, bool(sampling))
        if not sampling:
            return RunnerOutput()
        out = self.sampler(logits.float(), self._sampling_batch(sampling))
        return self._collect(sampling, out)

    def _run_eager(self, scheduled: list[ScheduledSeq], sample: bool) -> torch.Tensor | None:
        """Logits [num_sampling, V] of the sampling rows (None when nobody samples)."""
        input_ids, ctx = self._prepare(scheduled, self.device)
        with forward_context(ctx):
            hidden = self.model(input_ids, ctx.positions)  # [num_tokens, hidden]
        if not sample:
            return None
        return self.model.compute_logits(hidden[self._last_token_rows(scheduled)])  # [N, V]

    def _replay(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """A decode-only batch through its graph: inputs built on the host, copied into the
        static buffers; logits [num_sampling, V] (row i of the batch is token i)."""
        input_ids, ctx = self._prepare(scheduled, "cpu")
        logits = self.graphs.run(input_ids, ctx)  # [B, V], a view of the graph's output
        if all(e.is_last_chunk for e in scheduled):
            return logits
        return logits[self._last_token_rows(scheduled)]

    def release(self, request_id: str) -> None:
        """Forget per-request state (the seeded generator) of a finished request."""
        self._generators.pop(request_id, None)

    def _prepare(self, scheduled: list[ScheduledSeq], device: torch.device | str
                 ) -> tuple[torch.Tensor, ForwardContext]:
        """Flat new-token ids [num_tokens] int64 and the batch's ForwardContext, on `device`."""
        ids: list[int] = []
        for entry in scheduled:
            ids.extend(entry.seq.token_ids[entry.start:entry.start + entry.num_new_tokens])
        ctx = build_forward_context(
            query_lens=[e.num_new_tokens for e in scheduled],
            seq_lens=[e.start + e.num_new_tokens for e in scheduled],
            block_tables=[e.seq.block_table for e in scheduled],
            block_size=self.block_size, device=device)
        return torch.tensor(ids, dtype=torch.int64).to(device, non_blocking=True), ctx

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
