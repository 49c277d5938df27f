"""Response and chunk bodies (plain dicts in OpenAI's shapes), built from the engine's delta outputs.

A `ChoiceState` accumulates one choice; a formatter turns it (non-stream) or one delta (stream)
into the `choices[i]` entries. With an output parser (reasoning / tool calls), the chat formatter
splits the text into `reasoning_content`, `content` and `tool_calls`; a stream delta then carries
one kind only (one chunk per parser message).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.engine.sequence import TokenLogprob

TokenText = Callable[[int], str]


class OutputParser(Protocol):
    """What the chat formatter needs of `deepserve.server.parsers.ChatOutputParser`."""

    def feed(self, delta_text: str) -> list[Any]: ...

    def finish(self) -> list[Any]: ...

    def parse_full(self, text: str) -> tuple[str | None, str | None, list | None]: ...


ParserFactory = Callable[[], OutputParser]


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def envelope(kind: str, request_id: str, model: str, created: int | None = None) -> dict:
    """The fields every response and chunk starts with."""
    return {"id": request_id, "object": kind, "created": created or int(time.time()), "model": model}


@dataclass
class ChoiceState:
    """One choice so far, accumulated from the engine's delta outputs."""

    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    parser: OutputParser | None = None
    saw_tool_calls: bool = False

    def add(self, output: RequestOutput) -> CompletionOutput:
        """Fold in one output; returns its (delta) completion."""
        delta = output.outputs[0]
        self.text += delta.text
        self.num_tokens += len(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(delta.logprobs)
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.stop_reason = delta.stop_reason if delta.stop_reason is not None else self.stop_reason
        self.num_cached_tokens = max(self.num_cached_tokens, output.num_cached_tokens)
        return delta

    def abort(self) -> CompletionOutput:
        """End a choice the engine did not finish (drain timeout): finish_reason "abort"."""
        self.finish_reason = self.finish_reason or "abort"
        return CompletionOutput(0, "", [], None, self.finish_reason, None)


class ResponseFormatter(Protocol):
    object: str
    chunk_object: str

    def new_state(self) -> ChoiceState: ...

    def choice(self, index: int, state: ChoiceState) -> dict: ...

    def first_chunk_choice(self, index: int) -> dict | None: ...

    def chunk_choices(self, index: int, delta: CompletionOutput, state: ChoiceState) -> list[dict]: ...


class CompletionFormat:
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, token_text: TokenText):
        self.token_text = token_text

    def new_state(self) -> ChoiceState:
        return ChoiceState()

    def choice(self, index: int, state: ChoiceState) -> dict:
        return {"index": index, "text": state.text, "logprobs": self._logprobs(state.logprobs, 0),
                "finish_reason": state.finish_reason, "stop_reason": state.stop_reason}

    def first_chunk_choice(self, index: int) -> dict | None:
        return None

    def chunk_choices(self, index: int, delta: CompletionOutput, state: ChoiceState) -> list[dict]:
        if not (delta.text or delta.logprobs or delta.finish_reason):
            return []
        offset = len(state.text) - len(delta.text)
        return [{"index": index, "text": delta.text, "logprobs": self._logprobs(delta.logprobs, offset),
                 "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}]

    def _logprobs(self, logprobs: list[TokenLogprob] | None, offset: int) -> dict | None:
        if logprobs is None:
            return None
        tokens = [self.token_text(lp.token_id) for lp in logprobs]
        offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        tops = [{self.token_text(t): v for t, v in lp.top} for lp in logprobs]
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": tops, "text_offset": offsets}


class ChatFormat:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, token_text: TokenText, parser_factory: ParserFactory | None = None):
        self.token_text = token_text
        self.parser_factory = parser_factory

    def new_state(self) -> ChoiceState:
        return ChoiceState(parser=self.parser_factory() if self.parser_factory else None)

    def choice(self, index: int, state: ChoiceState) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": state.text}
        finish = state.finish_reason
        if self.parser_factory is not None:
            reasoning, content, tool_calls = tuple(self.parser_factory().parse_full(state.text))
            message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
            if tool_calls:
                message["tool_calls"] = [to_dict(call) for call in tool_calls]
                finish = "tool_calls" if finish == "stop" else finish
        return {"index": index, "message": message, "logprobs": self._logprobs(state.logprobs),
                "finish_reason": finish, "stop_reason": state.stop_reason}

    def first_chunk_choice(self, index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def chunk_choices(self, index: int, delta: CompletionOutput, state: ChoiceState) -> list[dict]:
        deltas = self._deltas(delta, state)
        tail = {"logprobs": self._logprobs(delta.logprobs), "finish_reason": delta.finish_reason,
                "stop_reason": delta.stop_reason}
        if not deltas and (delta.logprobs or delta.finish_reason):
            deltas = [{}]
        if tail["finish_reason"] == "stop" and state.saw_tool_calls:
            tail["finish_reason"] = "tool_calls"
        chunks = [{"index": index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
        if chunks:
            chunks[-1].update(tail)
        return chunks

    def _deltas(self, delta: CompletionOutput, state: ChoiceState) -> list[dict]:
        if state.parser is None:
            return [{"content": delta.text}] if delta.text else []
        messages = list(state.parser.feed(delta.text)) if delta.text else []
        if delta.finish_reason is not None:
            messages += list(state.parser.finish())
        out = [d for d in (to_dict(m) for m in messages) if d]
        state.saw_tool_calls = state.saw_tool_calls or any("tool_calls" in d for d in out)
        return out

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> dict | None:
        if logprobs is None:
            return None
        content = [self._entry(lp.token_id, lp.logprob)
                   | {"top_logprobs": [self._entry(t, v) for t, v in lp.top]} for lp in logprobs]
        return {"content": content}


def to_dict(value: Any) -> dict:
    """A parser message / tool call as its OpenAI dict (`to_openai()`, else dataclass / dict fields)."""
    if hasattr(value, "to_openai"):
        return value.to_openai()
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return {k: v for k, v in dict(value).items() if v is not None}
