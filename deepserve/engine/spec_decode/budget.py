"""The scheduler's budget term for speculative decoding (see `Scheduler.drafts`)."""

from __future__ import annotations

from deepserve.engine.sequence import Sequence


class DraftTokenBudget:
    """A decode whose chunk reaches the end of its sequence also feeds its drafts, as many as the
    token budget and max_model_len leave; every allocation reserves `num_lookahead_slots` more
    KV slots for the draft model's chained passes (positions past the verified tokens)."""

    def __init__(self, num_speculative_tokens: int, max_model_len: int):
        self.num_speculative_tokens = num_speculative_tokens
        self.max_model_len = max_model_len
        self.num_lookahead_slots = num_speculative_tokens - 1

    def num_draft_tokens(self, seq: Sequence, num_new: int, budget: int) -> int:
        if num_new < seq.num_uncomputed_tokens:  # a prefill chunk short of the end verifies nothing
            return 0
        room = self.max_model_len - seq.num_tokens  # draft positions stay below max_model_len
        return max(0, min(len(seq.spec_token_ids), self.num_speculative_tokens, budget, room))
