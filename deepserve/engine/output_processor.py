"""OutputProcessor: engine token outputs -> user-facing `RequestOutput`s with text.

Runs in the process that owns the tokenizer. Per request it detokenises incrementally (never half
a UTF-8 character, see `detokenizer.py`), looks for stop strings across token boundaries, and
holds back the tail of the text that could still become a stop string, so streamed text never
has to be taken back. A request that hits a stop string finishes with reason STOP and
``stop_reason`` = the string; since the engine core does not know about it, its id is returned
in ``requests_to_abort`` and the caller must abort it in the core. Later outputs for a request
the processor no longer tracks are ignored.

Tokenizer protocol: a ``tokenizers.Tokenizer``, or an object exposing one as
``.backend_tokenizer`` (see `detokenizer.backend_tokenizer`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from deepserve.engine.detokenizer import (IncrementalDetokenizer, backend_tokenizer, find_stop_string,
                                          partial_stop_len, search_start)
from deepserve.engine.outputs import CompletionOutput, EngineOutput, RequestOutput
from deepserve.engine.sequence import FinishReason, TokenLogprob
from deepserve.sampling_params import SamplingParams


class OutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # each output carries all text, token ids and logprobs so far
    DELTA = "delta"  # each output carries only what is new since the previous one (streaming)
    FINAL_ONLY = "final_only"  # one cumulative output, when the request finishes


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    requests_to_abort: list[str]  # finished here by a stop string: abort them in the engine core


@dataclass
class RequestState:
    """Text state of one request; `text[:sent_chars]` and `token_ids[:sent_tokens]` were released."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    kind: OutputKind
    detokenizer: IncrementalDetokenizer
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sent_chars: int = 0
    sent_tokens: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: FinishReason, stop_reason: int | str | None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason

    def append_text(self, chunk: str) -> bool:
        """Append decoded text; on a stop string cut the text, finish, and return True."""
        stops = self.params.stop
        if not chunk or self.finished:
            return False
        start = search_start(len(self.text), stops)
        self.text += chunk
        match = find_stop_string(self.text, stops, start) if stops else None
        if match is None:
            return False
        keep = len(match.stop) if self.params.include_stop_str_in_output else 0
        self.text = self.text[: match.index + keep]
        self.finish(FinishReason.STOP, match.stop)
        return True

    def releasable_chars(self) -> int:
        """How much text may be released: all of it once finished, else all but a partial stop."""
        if self.finished:
            return len(self.text)
        return len(self.text) - partial_stop_len(self.text, self.params.stop)


class OutputProcessor:
    def __init__(self, tokenizer: object):
        self._tokenizer = backend_tokenizer(tokenizer)
        self._requests: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, output_kind: OutputKind = OutputKind.DELTA) -> None:
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already being processed")
        detokenizer = IncrementalDetokenizer(self._tokenizer, prompt_token_ids, params.skip_special_tokens)
        self._requests[request_id] = RequestState(request_id, prompt, list(prompt_token_ids), params,
                                                  output_kind, detokenizer)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Forget requests (client went away); emits nothing for them."""
        for request_id in request_ids:
            self._requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    def process(self, outputs: list[EngineOutput]) -> ProcessedOutputs:
        result = ProcessedOutputs(request_outputs=[], requests_to_abort=[])
        for output in outputs:
            state = self._requests.get(output.request_id)
            if state is None:
                continue  # already finished here (stop string) or aborted
            stopped_here = self._update(state, output)
            if stopped_here and not output.finished:
                result.requests_to_abort.append(state.request_id)
            if state.finished:
                del self._requests[state.request_id]
            request_output = make_request_output(state)
            if request_output is not None:
                result.request_outputs.append(request_output)
        return result

    @staticmethod
    def _update(state: RequestState, output: EngineOutput) -> bool:
        """Consume one engine output; True when a stop string finished the request."""
        state.num_cached_tokens = output.num_cached_tokens
        stopped = consume_tokens(state, output)
        if output.finished and not stopped:
            stopped = state.append_text(state.detokenizer.flush())
            if not state.finished:
                state.finish(output.finish_reason, output.stop_reason)
        return stopped


def consume_tokens(state: RequestState, output: EngineOutput) -> bool:
    """Add the step's tokens (and logprobs) one by one; stop after the one completing a stop string.

    A stop token that ended the request (EOS or stop_token_ids) is kept in token_ids but not
    detokenised, unless include_stop_str_in_output.
    """
    ids = output.new_token_ids
    hide_last = output.finish_reason == FinishReason.STOP and not state.params.include_stop_str_in_output
    for i, token_id in enumerate(ids):
        state.token_ids.append(token_id)
        if i < len(output.new_logprobs):
            state.logprobs.append(output.new_logprobs[i])
        if hide_last and i == len(ids) - 1:
            break
        if state.append_text(state.detokenizer.push(token_id)):
            return True
    return False


def make_request_output(state: RequestState) -> RequestOutput | None:
    """The output to emit now for `state` (None for FINAL_ONLY before the end); marks it released."""
    if state.kind is OutputKind.FINAL_ONLY and not state.finished:
        return None
    end = state.releasable_chars()
    first_char, first_token = (state.sent_chars, state.sent_tokens) if state.kind is OutputKind.DELTA else (0, 0)
    completion = CompletionOutput(
        index=0,
        text=state.text[first_char:end],
        token_ids=state.token_ids[first_token:],
        logprobs=None if state.params.logprobs is None else state.logprobs[first_token:],
        finish_reason=None if state.finish_reason is None else state.finish_reason.value,
        stop_reason=state.stop_reason,
    )
    state.sent_chars, state.sent_tokens = end, len(state.token_ids)
    return RequestOutput(request_id=state.request_id, prompt=state.prompt,
                         prompt_token_ids=state.prompt_token_ids, outputs=[completion],
                         finished=state.finished, num_cached_tokens=state.num_cached_tokens)
