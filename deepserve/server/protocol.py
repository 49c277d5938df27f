"""OpenAI request models (pydantic, strict types) and the response / chunk bodies (plain dicts).

Field names are OpenAI's; `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`,
`skip_special_tokens` and `include_stop_str_in_output` are extras, as in vLLM. Per-field ranges are
pydantic constraints (a violation is a 400 with `param` = the field); rules that span fields or
need the server's limits live in `check()`, which raises `APIError`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.engine.sequence import TokenLogprob
from deepserve.sampling_params import SamplingParams
from deepserve.server.errors import APIError

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"] = "text"


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out = {"role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        return out


class SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(default=1, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(f"key {key!r} is not a token id")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias for token {key} must be in [-100, 100]")
        return value

    def check(self, max_n: int, vocab_size: int | None) -> None:
        """Rules that need the server's limits or span several fields; raises APIError."""
        if self.n > max_n:
            raise APIError.invalid("n", f"n must be at most {max_n}")
        if self.stream_options is not None and not self.stream:
            raise APIError.invalid("stream_options", "stream_options is only allowed with stream=true")
        for key in self.logit_bias or {}:
            if int(key) < 0 or (vocab_size is not None and int(key) >= vocab_size):
                raise APIError.invalid("logit_bias", f"logit_bias token id {key} is outside the vocabulary")
        for tid in self.stop_token_ids or []:
            if tid < 0 or (vocab_size is not None and tid >= vocab_size):
                raise APIError.invalid("stop_token_ids", f"stop token id {tid} is outside the vocabulary")

    def requested_max_tokens(self) -> int | None:
        return getattr(self, "max_tokens", None)

    def logprobs_k(self) -> int | None:
        return None

    def sampling_params(self, max_tokens: int, index: int) -> SamplingParams:
        """Parameters of the `index`-th of n samples (seeded samples differ by their index)."""
        kwargs: dict[str, Any] = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
        }
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return _build_params(
            max_tokens=max_tokens, seed=None if self.seed is None else self.seed + index,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            logprobs=self.logprobs_k(), stop=tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, **kwargs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _build_params(**kwargs: Any) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:  # "SamplingParams.<field> <why>"
        text = str(exc)
        param = text.split(" ", 1)[0].removeprefix("SamplingParams.") if text.startswith("SamplingParams.") else None
        raise APIError.invalid(param, text) from None


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (a batch), each text or token ids; never empty."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            batch = [p]
        else:
            batch = list(p)
        if not batch or any(len(x) == 0 for x in batch):
            raise APIError.invalid("prompt", "prompt must not be empty")
        return batch

    def check(self, max_n: int, vocab_size: int | None) -> None:
        super().check(max_n, vocab_size)
        if self.echo:
            raise APIError.invalid("echo", "echo is not supported")

    def logprobs_k(self) -> int | None:
        return self.logprobs


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check(self, max_n: int, vocab_size: int | None) -> None:
        super().check(max_n, vocab_size)
        if not self.messages:
            raise APIError.invalid("messages", "messages must not be empty")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError.invalid("top_logprobs", "top_logprobs requires logprobs=true")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        return [m.as_template_dict() for m in self.messages]


# ---- responses (plain dicts, OpenAI shapes) -------------------------------------------------


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


TokenText = Callable[[int], str]


class ResponseFormatter(Protocol):
    object: str
    chunk_object: str

    def choice(self, index: int, state: ChoiceState) -> dict: ...

    def first_chunk_choice(self, index: int) -> dict | None: ...

    def chunk_choice(self, index: int, delta: CompletionOutput, state: ChoiceState) -> dict: ...


class CompletionFormat:
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, token_text: TokenText):
        self.token_text = token_text

    def choice(self, index: int, state: ChoiceState) -> dict:
        return {"index": index, "text": state.text, "logprobs": self._logprobs(state.logprobs, 0),
                "finish_reason": state.finish_reason, "stop_reason": state.stop_reason}

    def first_chunk_choice(self, index: int) -> dict | None:
        return None

    def chunk_choice(self, index: int, delta: CompletionOutput, state: ChoiceState) -> dict:
        offset = len(state.text) - len(delta.text)
        return {"index": index, "text": delta.text, "logprobs": self._logprobs(delta.logprobs, offset),
                "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}

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

    def __init__(self, token_text: TokenText):
        self.token_text = token_text

    def choice(self, index: int, state: ChoiceState) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": state.text},
                "logprobs": self._logprobs(state.logprobs), "finish_reason": state.finish_reason,
                "stop_reason": state.stop_reason}

    def first_chunk_choice(self, index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def chunk_choice(self, index: int, delta: CompletionOutput, state: ChoiceState) -> dict:
        return {"index": index, "delta": {"content": delta.text} if delta.text else {},
                "logprobs": self._logprobs(delta.logprobs), "finish_reason": delta.finish_reason,
                "stop_reason": delta.stop_reason}

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> dict | None:
        if logprobs is None:
            return None
        content = [self._entry(lp.token_id, lp.logprob)
                   | {"top_logprobs": [self._entry(t, v) for t, v in lp.top]} for lp in logprobs]
        return {"content": content}
