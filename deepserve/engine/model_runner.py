"""Runs one scheduled batch: builds the flat inputs and the ForwardContext, runs the model,
samples the sequences whose chunk reached their end (at every draft position too, when drafts are
verified: deepserve/engine/spec_decode) and, with a proposer, drafts the next step's tokens.

A decode-only batch replays a captured CUDA graph when `capture_decode_graphs` was called
(CUDA platforms, not --enforce-eager, graph-safe attention); a batch of one sequence with 2 to
--max-prefill-graph-tokens new tokens (a prefill chunk) replays a padded prefill graph when
`capture_prefill_graphs` was called (engine/prefill_graph.py: the forward to hidden states in the graph,
the sampling rows' logits eagerly). Mixed batches, prefills of several sequences and batches larger
than the largest graph run eagerly, as does every batch with a proposer (speculative decoding)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from deepserve.engine.cuda_graph import Capturer, DecodeGraphs
from deepserve.engine.kv_cache import allocate_kv_caches, allocate_kv_scales, bind_kv_cache, bind_split_counters
from deepserve.engine.prefill_graph import PrefillGraphs
from deepserve.engine.scheduler import ScheduledBatch, ScheduledSeq
from deepserve.engine.sequence import PLACEHOLDER_TOKEN
from deepserve.engine.sequence import TokenLogprob
from deepserve.engine.spec_decode.verifier import Verifier, row_requests, sample_rows
from deepserve.forward_context import ForwardContext, build_forward_context, forward_context
from deepserve.layers.sampler import Sampler, SamplingBatch, make_generator
from deepserve.platforms import upload


WARM_UP_TOKEN_COUNTS = (1, 16, 64, 256, 1024, 4096)  # plus the step budget itself


def warm_up_counts(budget: int) -> list[int]:
    """The ladder's counts below the step budget and the budget itself, each also one token less:
    Triton specialises a kernel on whether each integer argument (the token count among them) is a
    multiple of 16, so the ladder alone (multiples of 16) left the other variant of every launch to
    compile inside the first real batches. Inferred from H200 runs, not isolated: the first qwen-7b int8
    W-offline run on a fresh machine measured 11,915 output tok/s (run s6h4), the same tree 15,145 in a
    later process on that machine with the kernels in Triton's cache (s6h5), and the first run on a fresh
    machine with this ladder (and the fused SiLU-and-mul + quantisation) 15,615 (s6final)."""
    ladder = {n for n in WARM_UP_TOKEN_COUNTS if n < budget} | {budget}
    return sorted({c for n in ladder for c in (n, n - 1) if c > 0})


def split_sequences(num_tokens: int, max_len: int) -> list[int]:
    """num_tokens as whole prefills of at most max_len tokens each: [max_len, ..., rest]."""
    return [max_len] * (num_tokens // max_len) + ([num_tokens % max_len] if num_tokens % max_len else [])


Pending = tuple[list[int], list[int], torch.Tensor]  # (rows of the flat ids, rows of the sampled ids, sampled ids [N])


@dataclass
class RunnerOutput:
    sampled: dict[str, list[int]] = field(default_factory=dict)  # request id -> accepted run (>= 1)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)  # where asked for
    drafts: dict[str, list[int]] = field(default_factory=dict)  # request id -> next step's drafts


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, device: torch.device | str,
                 proposer=None, kv_cache_dtype: torch.dtype | None = None, max_num_seqs: int = 0):
        """max_num_seqs: the largest decode batch whose attention layers merge split-K partials inside the
        decode kernel (kv_cache.bind_split_counters); 0 binds no counters (every merge a second launch)."""
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        self.vocab_size = model.config.vocab_size
        dtype = kv_cache_dtype or next(model.parameters()).dtype  # --kv-cache-dtype's storage, or the model's
        self.kv_caches = allocate_kv_caches(model, num_blocks, block_size, dtype, self.device)
        self.kv_scales = allocate_kv_scales(self.kv_caches)  # empty unless the cache is 8-bit
        bind_kv_cache(model, self.kv_caches, self.kv_scales)
        if max_num_seqs > 0:
            bind_split_counters(model, max_num_seqs, self.device)
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator | None] = {}
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.verifier = Verifier()
        self.proposer = proposer  # spec_decode.MTPProposer or None (it needs every hidden state)
        # The last launch's sampled ids [N] on the device and each request's row in them: where a
        # pending token (async scheduling) is read from when the next batch feeds it.
        self._last_sampled: tuple[torch.Tensor, dict[str, int]] | None = None

    @torch.inference_mode()
    def warm_up(self, max_num_batched_tokens: int, max_model_len: int) -> None:
        """Run the eager forward once per token count of a ladder up to the step budget, then once
        as a decode-heavy mixed batch, so every kernel variant real batches pick (Triton compiles
        per constexpr combination at first launch; launch configs are chosen by token count) is
        compiled before the first request. A count above max_model_len is split into several
        sequences of at most max_model_len tokens: positions stay inside the model's rotary table
        (a budget of 2048 tokens with --max-model-len 256 read past it). Every token writes into the
        null block 0, which no sequence owns. Counts: `warm_up_counts`. The padded shapes of the
        prefill graphs (T tokens in two sequences) are compiled by the capturer's warm-up calls, which run
        the captured function itself before recording it (cuda_graph.CudaGraphCapturer)."""
        counts = warm_up_counts(max_num_batched_tokens)
        for query_lens in [split_sequences(n, max_model_len) for n in counts] + [[1] * 7 + [2]]:
            tables = [[0] * -(-n // self.block_size) for n in query_lens]
            ctx = build_forward_context(query_lens, query_lens, tables, self.block_size, self.device)
            input_ids = torch.zeros(sum(query_lens), dtype=torch.int64, device=self.device)
            with forward_context(ctx):
                hidden = self.model(input_ids, ctx.positions)
            self.model.compute_logits(hidden[ctx.query_start_loc[1:].long() - 1])

    @torch.inference_mode()
    def capture_decode_graphs(self, graphs: DecodeGraphs, capturer: Capturer) -> None:
        """Capture the decode step (ids, positions -> logits in the model's dtype) for every size of `graphs`."""
        graphs.capture(self._decode_step, capturer)
        self.graphs = graphs

    @torch.inference_mode()
    def capture_prefill_graphs(self, graphs: PrefillGraphs, capturer: Capturer) -> None:
        """Capture the model forward (ids, positions -> hidden states) for every padded size of `graphs`.
        The capturer's warm-up calls run each padded size in the graphs' two-sequence layout first, which
        compiles its kernels (Triton compiles per shape-derived constexpr at first launch)."""
        graphs.capture(self.model, capturer)
        self.prefill_graphs = graphs

    def _decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B] int64, [B] int64 -> logits [B, V] in the head's dtype (every row samples in a decode batch). No
        float32 copy in the graph (the eager path's logits are float32): greedy rows take the argmax of these
        values (the same index: the widening is exact and monotonic), the sampler widens its own rows. At B = 256
        and qwen-7b's vocabulary the copy was a 114 us kernel of every decode step (run s11a's profile)."""
        return self.model.compute_logits(self.model(input_ids, positions), float32=False)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> RunnerOutput:
        sampling = batch.sampling
        hidden, logits = self._forward(batch)
        result = RunnerOutput()
        if sampling and _all_argmax(sampling):
            result.sampled = {e.seq.request_id: [token] for e, token in zip(sampling, logits.argmax(dim=-1).tolist())}
        elif sampling:
            out = self.sampler(logits.float(), self._sampling_batch(sampling))
            result = self._collect(sampling, out)
        if self.proposer is not None:
            result.drafts = self.proposer.propose(batch.scheduled, hidden, result.sampled)
        return result

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> torch.Tensor:
        """Queue a batch on the device without waiting for it (async scheduling); its sampled ids
        [N] int64 on the device, in sampling order (the next batch reads its pending inputs from
        them). Plain sampling only: no drafts, no logprobs, no penalties (the engine runs other
        batches with `execute`)."""
        sampling = batch.sampling
        _, logits = self._forward(batch)
        if not sampling:
            tokens = torch.zeros(0, dtype=torch.int64, device=self.device)
        elif _all_argmax(sampling):
            tokens = logits.argmax(dim=-1)  # [N] int64
        else:
            tokens = self.sampler(logits.float(), self._sampling_batch(sampling)).token_ids
        self._last_sampled = (tokens, {e.seq.request_id: row for row, e in enumerate(sampling)})
        return tokens

    def _forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(hidden states, or None through a decode graph; logits of the sampling rows, or None when
        nobody samples): a decode-only batch that fits replays its graph, a one-sequence prefill chunk
        that fits its prefill graph, any other batch runs eagerly."""
        query_lens = [e.num_new_tokens for e in batch.scheduled]
        if self.graphs is not None and self.graphs.can_run(query_lens):
            return None, self._replay(batch.scheduled)
        if self.prefill_graphs is not None and self.proposer is None and self.prefill_graphs.can_run(query_lens):
            return self._replay_prefill(batch.scheduled, bool(batch.sampling))
        return self._run_eager(batch.scheduled, bool(batch.sampling))

    def _run_eager(self, scheduled: list[ScheduledSeq], sample: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states [num_tokens, H] and the logits [num_rows, V] of the sampling rows (None
        when nobody samples)."""
        input_ids, ctx, pending = self._prepare(scheduled, self.device)
        if pending is not None:
            rows, sources, tokens = pending
            input_ids[upload(torch.tensor(rows), self.device)] = tokens[upload(torch.tensor(sources), self.device)]
        with forward_context(ctx):
            hidden = self.model(input_ids, ctx.positions)  # [num_tokens, hidden]
        return hidden, self._logits(hidden, scheduled, sample)

    def _replay_prefill(self, scheduled: list[ScheduledSeq], sample: bool
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A one-sequence prefill chunk through its padded graph: inputs built on the host, copied into the
        static buffers; hidden states [n, H] (a view of the graph's output, valid until the next replay) and
        the sampling rows' logits computed from them eagerly (None when the chunk does not sample)."""
        input_ids, ctx, pending = self._prepare(scheduled, "cpu")
        hidden = self.prefill_graphs.run(input_ids, ctx, pending)  # [n, hidden]
        return hidden, self._logits(hidden, scheduled, sample)

    def _logits(self, hidden: torch.Tensor, scheduled: list[ScheduledSeq], sample: bool) -> torch.Tensor | None:
        """Float32 logits [num_rows, V] of the sampling rows of hidden [num_tokens, H]; None when nobody samples."""
        if not sample:
            return None
        return self.model.compute_logits(hidden[self._last_token_rows(scheduled)])  # [N, V]

    def _replay(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """A decode-only batch through its graph: inputs built on the host, copied into the
        static buffers; logits [num_sampling, V] (row i of the batch is token i)."""
        input_ids, ctx, pending = self._prepare(scheduled, "cpu")
        logits = self.graphs.run(input_ids, ctx, pending)  # [B, V], a view of the graph's output
        if all(e.is_last_chunk for e in scheduled):
            return logits
        return logits[self._last_token_rows(scheduled)]

    def release(self, request_id: str) -> None:
        """Forget per-request state (the seeded generator) of a finished request."""
        self._generators.pop(request_id, None)

    def _prepare(self, scheduled: list[ScheduledSeq], device: torch.device | str
                 ) -> tuple[torch.Tensor, ForwardContext, Pending | None]:
        """Flat new-token ids [num_tokens] int64 and the batch's ForwardContext, on `device`, and
        the pending inputs: (rows of the ids holding PLACEHOLDER_TOKEN, the rows of their values
        among the last launch's sampled ids, those ids [N] on the device), or None when every id
        is known. Rows stay on the host: the graph path stages them in pinned memory, as a
        pageable copy would wait for the device and undo the overlap."""
        ids: list[int] = []
        holes: list[int] = []
        sources: list[int] = []
        for entry in scheduled:
            fed = entry.input_token_ids
            ids.extend(fed)
            if entry.seq.num_pending_tokens and fed[-1] == PLACEHOLDER_TOKEN:  # a decode of a pending token
                holes.append(len(ids) - 1)
                sources.append(self._pending_source(entry.seq.request_id))
        ctx = build_forward_context(
            query_lens=[e.num_new_tokens for e in scheduled],
            seq_lens=[e.start + e.num_new_tokens for e in scheduled],
            block_tables=[e.seq.block_table for e in scheduled],
            block_size=self.block_size, device=device)
        pending = (holes, sources, self._last_sampled[0]) if holes else None
        return upload(torch.tensor(ids, dtype=torch.int64), device), ctx, pending

    def _pending_source(self, request_id: str) -> int:
        """The row of `request_id`'s pending token among the last launch's sampled ids."""
        if self._last_sampled is None or request_id not in self._last_sampled[1]:
            raise RuntimeError(f"request {request_id!r} feeds a pending token the last launch did not sample")
        return self._last_sampled[1][request_id]

    def _last_token_rows(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """[num_rows] int64 flat-batch rows that sample: each sampling sequence's last new token,
        and before it one row per draft it verifies."""
        return upload(sample_rows(scheduled), self.device)

    def _sampling_batch(self, sampling: list[ScheduledSeq]) -> SamplingBatch:
        requests = [request for e in sampling
                    for request in row_requests(e, self._generator(e.seq.request_id, e.seq.params))]
        return SamplingBatch.build(requests, self.vocab_size, self.device)

    def _generator(self, request_id: str, params) -> torch.Generator | None:
        if request_id not in self._generators:
            self._generators[request_id] = make_generator(params, self.device)
        return self._generators[request_id]

    def _collect(self, sampling: list[ScheduledSeq], out) -> RunnerOutput:
        """Sampled rows -> each sequence's accepted run (one token when it verified no drafts)."""
        result = RunnerOutput()
        for entry, run, lps in self.verifier.runs(sampling, out.token_ids.tolist(), out.logprobs):
            result.sampled[entry.seq.request_id] = run
            if lps is not None:
                result.logprobs[entry.seq.request_id] = lps
        return result


def _all_argmax(sampling: list[ScheduledSeq]) -> bool:
    """Every sampling row is a plain argmax and verifies no drafts: the sampler's work reduces to
    one argmax, without building a SamplingBatch (host time that grows with the batch)."""
    return all(e.seq.params.is_argmax and not e.num_spec_tokens for e in sampling)
