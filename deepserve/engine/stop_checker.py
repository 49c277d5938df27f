"""Token-level stop conditions, checked after each sampled token (stop strings are the output
processor's job: they need text)."""

from __future__ import annotations

from typing import NamedTuple

from deepserve.engine.sequence import FinishReason, Sequence


class StopDecision(NamedTuple):
    reason: FinishReason
    stop_reason: int | None = None  # the stop token id, when one ended the request


def check_stop(seq: Sequence, max_model_len: int, index: int | None = None) -> StopDecision | None:
    """Why `seq` must finish after its token at `index` (default: the last appended), or None.
    Order: EOS (unless ignore_eos), a stop token id, then length (max_tokens, max_model_len)."""
    index = len(seq.token_ids) - 1 if index is None else index
    token = seq.token_ids[index]
    if not seq.params.ignore_eos and token in seq.eos_token_ids:
        return StopDecision(FinishReason.STOP)
    if token in seq.params.stop_token_ids:
        return StopDecision(FinishReason.STOP, token)
    if index + 1 - seq.num_prompt_tokens >= seq.params.max_tokens or index + 1 >= max_model_len:
        return StopDecision(FinishReason.LENGTH)
    return None
