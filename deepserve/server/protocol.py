"""OpenAI request models (pydantic, strict types); response bodies are in `responses.py`.

Field names are OpenAI's; `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`,
`skip_special_tokens` and `include_stop_str_in_output` are extras, as in vLLM. Per-field ranges are
pydantic constraints (a violation is a 400 with `param` = the field); rules that span fields or
need the server's limits live in `check()`, which raises `APIError`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it (None fields left out)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out: dict[str, Any] = {"role": self.role, "content": content or ""}
        extra = {"name": self.name, "tool_call_id": self.tool_call_id, "reasoning_content": self.reasoning_content,
                 "tool_calls": [c.model_dump() for c in self.tool_calls] if self.tool_calls else None}
        return out | {k: v for k, v in extra.items() if v is not None}


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
    skip_special_tokens: bool | None = None  # None: True, or what the output parser needs
    include_stop_str_in_output: bool = False
    user: str | None = None  # accepted (OpenAI's end-user id); never logged
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

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

    def sampling_params(self, max_tokens: int, index: int, skip_special_default: bool = True) -> SamplingParams:
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
            skip_special_tokens=skip_special_default if self.skip_special_tokens is None else self.skip_special_tokens,
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
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

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
        if self.suffix:
            raise APIError.invalid("suffix", "suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError.invalid("best_of", "best_of other than n is not supported")

    def logprobs_k(self) -> int | None:
        return self.logprobs


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None  # accepted; output is NOT constrained (no guided decoding)
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool | None = None  # None: True, unless continue_final_message
    continue_final_message: bool = False
    reasoning_effort: str | None = None

    def check(self, max_n: int, vocab_size: int | None) -> None:
        super().check(max_n, vocab_size)
        if not self.messages:
            raise APIError.invalid("prompt", "messages must not be empty (the prompt would be empty)")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError.invalid("top_logprobs", "top_logprobs requires logprobs=true")
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError.invalid("continue_final_message",
                                   "continue_final_message and add_generation_prompt cannot both be true")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise APIError.invalid("messages", "continue_final_message needs a final assistant message")

    def template_options(self) -> dict[str, Any]:
        """Keyword arguments for the chat template besides the messages."""
        tools = None if not self.tools or self.tool_choice == "none" else [t.model_dump(exclude_none=True)
                                                                           for t in self.tools]
        add_prompt = self.add_generation_prompt
        if add_prompt is None:
            add_prompt = not self.continue_final_message
        return (self.chat_template_kwargs or {}) | {
            "add_generation_prompt": add_prompt, "continue_final_message": self.continue_final_message,
            "tools": tools}

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.as_template_dict() for m in self.messages]


class TokenizeRequest(_Strict):
    """POST /tokenize: a prompt, or chat messages rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError.invalid("prompt", "give exactly one of prompt and messages")
        if self.messages is not None and not self.messages:
            raise APIError.invalid("messages", "messages must not be empty")


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]
