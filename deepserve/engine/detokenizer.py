"""Incremental detokenisation and stop-string search, per request.

Tokenizer protocol: `IncrementalDetokenizer` needs the raw HF ``tokenizers.Tokenizer`` (it drives
``tokenizers.decoders.DecodeStream``, which lives in Rust and never yields half a UTF-8
character). `backend_tokenizer` accepts that object itself, or anything exposing it as the
attribute ``backend_tokenizer`` (transformers' ``PreTrainedTokenizerFast`` does; so must the
project's tokenizer wrapper). Only ``Tokenizer.decode(ids, skip_special_tokens=...)`` and
``DecodeStream.step`` are used.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import tokenizers
from tokenizers.decoders import DecodeStream

# Prompt tokens fed to the stream as context, so the first output token decodes as it would
# after the prompt (e.g. a leading space that sentencepiece-style decoders strip at the start).
PROMPT_CONTEXT_TOKENS = 4


def backend_tokenizer(tokenizer: object) -> tokenizers.Tokenizer:
    """The raw ``tokenizers.Tokenizer`` behind `tokenizer` (itself, or its ``backend_tokenizer``)."""
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        return backend
    raise TypeError(f"{type(tokenizer).__name__} is neither a tokenizers.Tokenizer nor exposes one "
                    "as `.backend_tokenizer`")


class IncrementalDetokenizer:
    """Token ids in, complete characters out; bytes of an unfinished character are held back."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._pending: list[int] = []  # ids fed since the stream last produced text

    def push(self, token_id: int) -> str:
        """Feed one token; return the newly completed text ("" while a character is incomplete)."""
        chunk = self._stream.step(self._tokenizer, token_id)
        if chunk is None:
            self._pending.append(token_id)
            return ""
        self._pending.clear()
        return chunk

    def flush(self) -> str:
        """At the end: text of the held-back ids, decoded as `decode` would (U+FFFD for bad bytes)."""
        if not self._pending:
            return ""
        text = self._tokenizer.decode(self._pending, skip_special_tokens=self._skip_special_tokens)
        self._pending.clear()
        return text


class StopMatch(NamedTuple):
    index: int  # where the stop string starts in the text
    stop: str


def find_stop_string(text: str, stops: Sequence[str], start: int = 0) -> StopMatch | None:
    """The stop string in `text[start:]` that a char-by-char stream would meet first.

    That is the one ending earliest; among those ending at the same place, the longest.
    """
    best: StopMatch | None = None
    for stop in stops:
        index = text.find(stop, start)
        if index >= 0 and (best is None or _match_key(index, stop) < _match_key(*best)):
            best = StopMatch(index, stop)
    return best


def _match_key(index: int, stop: str) -> tuple[int, int]:
    return index + len(stop), index


def search_start(previous_len: int, stops: Sequence[str]) -> int:
    """Where a stop string completed by text appended after `previous_len` chars can start."""
    longest = max((len(s) for s in stops), default=0)
    return max(0, previous_len - longest + 1)


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string.

    That tail must not be streamed yet: the next tokens may complete the stop string.
    """
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
