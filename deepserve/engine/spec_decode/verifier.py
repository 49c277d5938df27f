"""Verification of draft tokens by the main model's step (greedy), and its statistics.

A sequence with s drafts feeds [t, d_1 .. d_s] and samples at each of the s + 1 positions: row i
sees the output so far plus d_1 .. d_i (penalties and logprobs as if d_1 .. d_i were accepted),
giving the target g_i the main model picks after them. The accepted run is g_0 .. g_n, n the
number of leading drafts with d_{i+1} == g_i: the accepted drafts, then the bonus token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence as Seq

import torch

from deepserve.engine.scheduler import ScheduledSeq
from deepserve.engine.sequence import TokenLogprob
from deepserve.layers.sampler import SamplingRequest


@dataclass
class SpecDecodeStats:
    """Cumulative draft / acceptance counters (plain data; server/metrics.py may export them)."""

    num_verifications: int = 0  # sequence-steps that verified at least one draft
    num_draft_tokens: int = 0  # drafts verified
    num_accepted_tokens: int = 0  # of those, accepted
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: accepted at draft i + 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        """Tokens a verifying sequence gains per step: accepted drafts + the bonus token."""
        if not self.num_verifications:
            return 0.0
        return 1.0 + self.num_accepted_tokens / self.num_verifications

    def record(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts == 0:
            return
        self.num_verifications += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        while len(self.accepted_per_position) < num_drafts:
            self.accepted_per_position.append(0)
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1


def accept_greedy(drafts: Seq[int], targets: Seq[int]) -> list[int]:
    """drafts [s], targets [s + 1] (the main model's choice after t, d_1 .. d_s) -> the accepted run:
    the leading drafts equal to their targets, then the bonus target."""
    if len(targets) != len(drafts) + 1:
        raise ValueError(f"{len(targets)} targets for {len(drafts)} drafts (need one more)")
    n = 0
    while n < len(drafts) and drafts[n] == targets[n]:
        n += 1
    return list(targets[:n + 1])


def sample_rows(scheduled: Seq[ScheduledSeq]) -> torch.Tensor:
    """[num_rows] int64 flat-batch rows that sample: the last 1 + num_spec_tokens new tokens of
    each entry whose chunk reaches its end, in batch order."""
    rows, end = [], 0
    for entry in scheduled:
        end += entry.num_new_tokens
        if entry.is_last_chunk:
            rows.extend(range(end - 1 - entry.num_spec_tokens, end))
    return torch.tensor(rows, dtype=torch.int64)


def row_requests(entry: ScheduledSeq, generator: torch.Generator | None) -> list[SamplingRequest]:
    """One SamplingRequest per sampled row of `entry`: row i sees the drafts d_1 .. d_i as output.
    The token histories are copied only for requests whose penalties read them."""
    seq, drafts = entry.seq, entry.seq.spec_token_ids[:entry.num_spec_tokens]
    if not seq.params.uses_token_history:
        return [SamplingRequest(seq.params, (), (), generator)] * (len(drafts) + 1)
    output = seq.output_token_ids
    return [SamplingRequest(seq.params, seq.prompt_token_ids, output + drafts[:i], generator)
            for i in range(len(drafts) + 1)]


class Verifier:
    """Splits the sampled rows back per sequence and keeps the accepted run of each."""

    def __init__(self) -> None:
        self.stats = SpecDecodeStats()

    def runs(self, sampling: Seq[ScheduledSeq], token_ids: list[int],
             logprobs: list[TokenLogprob | None] | None
             ) -> Iterator[tuple[ScheduledSeq, list[int], list[TokenLogprob] | None]]:
        """Per sampling entry: its accepted run and the run's logprobs (None when not asked)."""
        row = 0
        for entry in sampling:
            width = entry.num_spec_tokens + 1
            drafts = entry.seq.spec_token_ids[:entry.num_spec_tokens]
            run = accept_greedy(drafts, token_ids[row:row + width])
            self.stats.record(len(drafts), len(run) - 1)
            lps = None if logprobs is None or logprobs[row] is None else logprobs[row:row + len(run)]
            yield entry, run, lps
            row += width
