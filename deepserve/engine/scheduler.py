"""Continuous batching by token budget (vLLM v1): no prefill or decode phases, only a number of new
tokens per sequence per step. A decode is a sequence that wants 1 token; a chunked prefill is one
that wants more than the budget leaves it.

The scheduler changes only a `Sequence`'s counters, status and (through the block manager) its
block table; the model runner reads the batch between `schedule()` and `update()`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Protocol

from deepserve.config import CacheConfig, SchedulerConfig
from deepserve.engine.block_manager import BlockManager, BlockManagerStats, cdiv
from deepserve.engine.outputs import EngineOutput
from deepserve.engine.sequence import PLACEHOLDER_TOKEN, FinishReason, Sequence, SequenceStatus, TokenLogprob
from deepserve.engine.stop_checker import StopDecision, check_stop


class ScheduledSeq(NamedTuple):
    """One sequence's share of a step. The counters are taken when it is scheduled (`of`), so they
    stay what the runner needs until `update()` moves the sequence on."""

    seq: Sequence
    num_new_tokens: int  # fed to the model this step, drafts included (they come last)
    start: int  # position of the first new token
    is_last_chunk: bool  # the chunk reaches the end of the sequence: the runner samples a token
    #                      for it (and one per draft when it verifies drafts)
    num_spec_tokens: int  # of the new tokens, the drafts to verify: those past the last token

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> "ScheduledSeq":
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens
        num_tokens = seq.num_tokens
        return cls(seq, num_new_tokens, start, end >= num_tokens, max(0, end - num_tokens))

    @property
    def input_token_ids(self) -> list[int]:
        """The ids fed this step: uncomputed tokens, then the drafts to verify."""
        uncomputed = self.seq.token_ids[self.start:self.start + self.num_new_tokens]
        if not self.num_spec_tokens:
            return uncomputed
        return uncomputed + self.seq.spec_token_ids[:self.num_spec_tokens]


class PendingToken(NamedTuple):
    """A sampled token on its way from the device: it goes to `seq.token_ids[index]`."""

    seq: Sequence
    index: int


@dataclass
class ScheduledBatch:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # lost their blocks this step
    num_batched_tokens: int = 0

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.scheduled.append(ScheduledSeq.of(seq, num_new_tokens))
        self.num_batched_tokens += num_new_tokens

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def sampling(self) -> list[ScheduledSeq]:
        """The entries that get a sampled token, in batch order."""
        return [entry for entry in self.scheduled if entry.is_last_chunk]


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preemptions: int  # cumulative
    cache: BlockManagerStats


class PreemptionPolicy(Protocol):
    def pick_victim(self, candidates: list[Sequence]) -> Sequence:
        """Choose among the running sequences not yet scheduled this step (the one that failed to
        get blocks comes first)."""
        ...


class PreemptLast:
    """First come, first served: the most recently admitted sequence gives its blocks back."""

    def pick_victim(self, candidates: list[Sequence]) -> Sequence:
        return candidates[-1]


class DraftBudget(Protocol):
    """The speculative-decoding budget term: how many drafts a sequence verifies this step, and how
    many KV slots past its scheduled tokens the draft model needs (deepserve/engine/spec_decode)."""

    num_lookahead_slots: int

    def num_draft_tokens(self, seq: Sequence, num_new: int, budget: int) -> int:
        """Drafts to feed after `num_new` uncomputed tokens within `budget` tokens left."""
        ...


class NoDrafts:
    """No speculative decoding: no drafts, no lookahead."""

    num_lookahead_slots = 0

    def num_draft_tokens(self, seq: Sequence, num_new: int, budget: int) -> int:
        return 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheConfig | BlockManager,
                 max_model_len: int | None = None, preemption: PreemptionPolicy | None = None,
                 drafts: DraftBudget | None = None):
        self.config = config
        self.block_manager = cache if isinstance(cache, BlockManager) else BlockManager.from_config(cache)
        self.max_model_len = _resolve_max_model_len(config, max_model_len)
        self.preemption = preemption or PreemptLast()
        self.drafts = drafts or NoDrafts()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._requests: dict[str, Sequence] = {}

    # ----- requests --------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self._check_admissible(seq)
        seq.status = SequenceStatus.WAITING
        self._requests[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> EngineOutput | None:
        """Finish a waiting or running request with ABORT and free its blocks (None: unknown)."""
        seq = self._requests.get(request_id)
        if seq is None:
            return None
        (self.waiting if seq.status == SequenceStatus.WAITING else self.running).remove(seq)
        self._finish(seq, FinishReason.ABORT)
        return _output(seq, [], [])

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.num_preemptions,
                              self.block_manager.stats())

    # ----- one step --------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        # Algorithm (vLLM v1), one token budget (max_num_batched_tokens) per step:
        # 1. Running sequences in order; each asks for all its uncomputed tokens (1 for a decode,
        #    the rest of its prompt for a chunked prefill), capped by the budget left. When the
        #    block manager cannot hold them, the preemption policy's victim (default: the last
        #    running sequence) frees its blocks and waits at the front of the queue for a full
        #    recompute; if the victim is the sequence itself, it does not run this step. A decode
        #    with drafts (speculative decoding) also feeds them, as far as the draft budget term
        #    allows, and reserves its lookahead slots.
        # 2. If nothing was preempted: waiting sequences, FIFO, while budget and max_num_seqs
        #    allow. Prefix-cache hits count as computed; the rest is cut to the budget (or, with
        #    chunked prefill off, waits until it fits whole). Stop at the first that does not fit.
        # update() appends each sampled run token by token, stopping at the first stop condition;
        # after a sampled chunk every token but the last is computed (rejected drafts are not).
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.config.max_num_batched_tokens)
        if not batch.preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def update(self, batch: ScheduledBatch, sampled: Mapping[str, int | list[int]] | Any,
               logprobs: Mapping[str, TokenLogprob | list[TokenLogprob]] | Any | None = None,
               drafts: Mapping[str, list[int]] | None = None) -> list[EngineOutput]:
        """Account for a step the runner executed. `sampled` (and `logprobs`) map request id to the
        new token (or the run of accepted tokens, bonus last, when drafts were verified), or are
        sequences aligned with `batch.scheduled` or with `batch.sampling`. `drafts`: request id ->
        draft tokens to verify next step."""
        tokens = _by_request(batch, sampled)
        lps = _by_request(batch, logprobs) if logprobs is not None else {}
        outputs = [out for entry in batch.scheduled if not entry.seq.is_finished
                   if (out := self._advance(entry, tokens, lps, drafts or {})) is not None]
        self.running = [seq for seq in self.running if not seq.is_finished]
        return outputs

    # ----- async scheduling: commit() a launched batch, resolve() its tokens later -------------
    def commit(self, batch: ScheduledBatch) -> list[PendingToken]:
        """Account for a batch launched before its sampled tokens are known (async scheduling).

        Each sequence that samples gets a PLACEHOLDER_TOKEN where its token will go and moves on as
        if it were known, so the next batch can be scheduled while this one runs (its input for
        that token is taken from the device). Returns the pending tokens, in the batch's sampling
        order, for `resolve()`. Prefix-cache hashing of blocks holding a placeholder waits for
        `resolve()`. Only plain batches (no drafts) are committed."""
        pending = []
        for entry in batch.scheduled:
            seq = entry.seq
            if entry.num_spec_tokens:
                raise ValueError("async scheduling does not verify drafts; use update()")
            if not entry.is_last_chunk:
                seq.num_computed_tokens += entry.num_new_tokens
                self.block_manager.cache_computed_blocks(seq)
                continue
            pending.append(PendingToken(seq, seq.num_tokens))
            seq.append_token(PLACEHOLDER_TOKEN)
            seq.num_pending_tokens += 1
            seq.num_computed_tokens = seq.num_tokens - 1
        return pending

    def resolve(self, pending: list[PendingToken], tokens: list[int],
                logprobs: list[TokenLogprob | None] | None = None) -> list[EngineOutput]:
        """The sampled tokens of a committed batch arrived: write them over their placeholders,
        apply the stop conditions (a stopped sequence loses any later placeholder and finishes,
        even if a later in-flight batch still runs it: its result there is ignored) and register
        the blocks they completed in the prefix cache. One output per still-live sequence."""
        if len(tokens) != len(pending):
            raise ValueError(f"{len(tokens)} tokens for {len(pending)} pending sequences")
        outputs = []
        for i, (p, token) in enumerate(zip(pending, tokens)):
            seq = p.seq
            if seq.is_finished:  # aborted, or stopped by an earlier token
                continue
            seq.token_ids[p.index] = int(token)
            seq.num_pending_tokens -= 1
            lp = logprobs[i] if logprobs is not None else None
            if lp is not None:
                seq.logprobs.append(lp)
            stop = check_stop(seq, self.max_model_len, p.index)
            if stop is not None:
                del seq.token_ids[p.index + 1:]
                seq.num_pending_tokens = 0
                if seq.status == SequenceStatus.RUNNING:
                    # The KV of tokens [0, p.index) is written (the batch that sampled p.index has run;
                    # a later in-flight step's tokens are dropped): register its full blocks before
                    # they are freed, so a request that ends on its first token (max_tokens=1, an
                    # early EOS) still leaves its prompt in the prefix cache, as the synchronous path does.
                    seq.num_computed_tokens = min(seq.num_computed_tokens, p.index)
                    self.block_manager.cache_computed_blocks(seq)
                (self.waiting if seq.status == SequenceStatus.WAITING else self.running).remove(seq)
                self._finish(seq, stop.reason, stop.stop_reason)
            elif seq.status == SequenceStatus.RUNNING:
                self.block_manager.cache_computed_blocks(seq)
            outputs.append(_output(seq, [int(token)], [lp] if lp is not None else []))
        return outputs

    def _pending_token_is_last(self, seq: Sequence) -> bool:
        """The pending token ends `seq` by length (max_tokens or max_model_len), whatever it is."""
        return seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len

    # ----- schedule() phases -----------------------------------------------------------------
    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending_tokens and self._pending_token_is_last(seq):
                i += 1  # finishes by length when its pending token resolves: nothing more to run
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            num_spec = self.drafts.num_draft_tokens(seq, num_new, budget - num_new)
            if self._allocate_or_preempt(seq, num_new + num_spec, i, batch):
                batch.add(seq, num_new + num_spec)
                budget -= num_new + num_spec
                i += 1
        return budget

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, first: int, batch: ScheduledBatch) -> bool:
        """Preempt victims among running[first:] until `seq` gets its slots (plus the draft
        lookahead); False if `seq` went."""
        while not self.block_manager.allocate_slots(seq, num_new + self.drafts.num_lookahead_slots):
            victim = self.preemption.pick_victim(self.running[first:])
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []  # the draft model's KV went with the blocks
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = self._admit(seq, budget)
            if num_new == 0:
                return
            batch.add(seq, num_new)
            budget -= num_new

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Move the head of the queue to running with its prefix hits; its new token count, or 0."""
        hits = self.block_manager.get_computed_blocks(seq)
        num_cached = len(hits) * self.block_manager.block_size
        num_new = self._fit(seq.num_tokens - num_cached, budget)
        slots = num_new + self.drafts.num_lookahead_slots
        if num_new == 0 or not self.block_manager.allocate_slots(seq, slots, hits):
            return 0
        self.waiting.popleft()
        seq.num_computed_tokens = num_cached
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = num_cached
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return num_new

    def _fit(self, num_tokens: int, budget: int) -> int:
        """Tokens of a prefill that run now: all, a chunk of the budget, or 0 (must wait)."""
        if num_tokens <= budget:
            return num_tokens
        return budget if self.config.enable_chunked_prefill else 0

    # ----- update() helpers ------------------------------------------------------------------
    def _advance(self, entry: ScheduledSeq, tokens: Mapping[str, Any], lps: Mapping[str, Any],
                 drafts: Mapping[str, list[int]]) -> EngineOutput | None:
        seq = entry.seq
        if not entry.is_last_chunk:  # a prefill chunk short of the end: nothing sampled
            seq.num_computed_tokens += entry.num_new_tokens
            self.block_manager.cache_computed_blocks(seq)
            return None
        if seq.request_id not in tokens:
            raise ValueError(f"no sampled token for {seq.request_id!r}, whose chunk reached its end")
        new_tokens, new_lps, stop = _append_until_stop(seq, _as_list(tokens[seq.request_id]),
                                                       _as_list(lps.get(seq.request_id)), self.max_model_len)
        seq.num_computed_tokens = seq.num_tokens - 1  # the fed tokens the sampled run confirmed
        seq.spec_token_ids = list(drafts.get(seq.request_id, ()))
        self.block_manager.cache_computed_blocks(seq)
        if stop is not None:
            self._finish(seq, stop.reason, stop.stop_reason)
        return _output(seq, new_tokens, new_lps)

    def _finish(self, seq: Sequence, reason: FinishReason, stop_reason: int | None = None) -> None:
        seq.finish(reason, stop_reason)
        self.block_manager.free(seq)
        del self._requests[seq.request_id]

    def _check_admissible(self, seq: Sequence) -> None:
        size, capacity = self.block_manager.block_size, self.block_manager.num_blocks
        checks = [
            (seq.request_id not in self._requests, "is already known"),
            (seq.num_tokens > 0, "has an empty prompt"),
            (seq.num_tokens <= self.max_model_len,
             f"has {seq.num_tokens} tokens, more than max_model_len {self.max_model_len}"),
            (cdiv(seq.num_tokens, size) <= capacity, f"needs more than the {capacity} KV blocks"),
        ]
        for ok, problem in checks:
            if not ok:
                raise ValueError(f"request {seq.request_id!r} {problem}")


def _resolve_max_model_len(config: SchedulerConfig, max_model_len: int | None) -> int:
    length = max_model_len or config.max_model_len
    if length is None:
        raise ValueError("max_model_len is unresolved: pass it or resolve the EngineConfig first")
    if not config.enable_chunked_prefill and config.max_num_batched_tokens < length:
        raise ValueError(f"without chunked prefill, max_num_batched_tokens "
                         f"({config.max_num_batched_tokens}) must be >= max_model_len ({length})")
    return length


def _by_request(batch: ScheduledBatch, values: Any) -> Mapping[str, Any]:
    """Per-request values from a mapping, or from a list/tensor aligned with the batch's entries
    (all of them, or only those that sample). Call before any counter moves."""
    if isinstance(values, Mapping):
        return values
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    entries = batch.scheduled if len(values) == len(batch.scheduled) else batch.sampling
    if len(values) != len(entries):
        raise ValueError(f"{len(values)} values for {len(batch.scheduled)} scheduled sequences "
                         f"({len(batch.sampling)} sampling)")
    return {entry.seq.request_id: value for entry, value in zip(entries, values)}


def _as_list(value: Any) -> list:
    """A sampled value as a run: a token (or logprob) -> [it]; None -> []; a list as is."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _append_until_stop(seq: Sequence, tokens: list[int], lps: list[TokenLogprob], max_model_len: int
                       ) -> tuple[list[int], list[TokenLogprob], StopDecision | None]:
    """Append `tokens` one by one, ending at the first that stops `seq` (EOS, stop token, length):
    the appended tokens, their logprobs, and the stop decision (None: still running)."""
    for i, token in enumerate(tokens):
        seq.append_token(int(token), lps[i] if i < len(lps) else None)
        stop = check_stop(seq, max_model_len)
        if stop is not None:
            return tokens[:i + 1], lps[:i + 1], stop
    return tokens, lps, None


def _output(seq: Sequence, new_tokens: list[int], new_logprobs: list[TokenLogprob]) -> EngineOutput:
    return EngineOutput(seq.request_id, new_tokens, new_logprobs, seq.finish_reason, seq.stop_reason,
                        seq.num_prompt_tokens, seq.num_cached_tokens)
