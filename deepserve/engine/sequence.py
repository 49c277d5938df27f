"""One `Sequence` carries a request through the engine.

The scheduler changes only its counters (`num_computed_tokens`, `num_cached_tokens`), its status
and its `block_table`; the engine appends sampled tokens with `append_token` and, with speculative
decoding, sets the drafts to verify next step in `spec_token_ids` (never part of `token_ids`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from deepserve.sampling_params import SamplingParams


PLACEHOLDER_TOKEN = -1  # a sampled token not yet read back from the device (async scheduling)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, stop token or stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # client went away, shutdown, or error


@dataclass
class TokenLogprob:
    """Logprob of the sampled token and the top alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float = 0.0, eos_token_ids: tuple[int, ...] = ()):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival_time = arrival_time
        self.eos_token_ids = eos_token_ids
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # of those, how many came from the prefix cache (first schedule)
        self.num_preemptions = 0
        self.logprobs: list[TokenLogprob] = []
        self.spec_token_ids: list[int] = []  # draft tokens to verify after the last token (spec decode)
        # Async scheduling: sampled tokens still on the device, held by PLACEHOLDER_TOKEN entries
        # at the end of token_ids until the scheduler resolves them (deepserve/engine/scheduler.py).
        self.num_pending_tokens = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: TokenLogprob | None = None) -> None:
        self.token_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, status={self.status.value})")
