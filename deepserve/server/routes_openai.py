"""POST /v1/completions and /v1/chat/completions: request -> prompts -> engine jobs -> response.

Order of checks (cheapest first, and the queue check before anything that depends on the prompt):
queue full (429) -> body size (413) -> JSON (400 invalid_json) -> fields (400 param) -> model
(404) -> cross-field limits -> chat template (400) -> tokenisation -> context length (400
context_length_exceeded). The engine is `state.engine` (AsyncLLM's surface).
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from deepserve.engine.detokenizer import backend_tokenizer
from deepserve.server import protocol as P
from deepserve.server import responses as R
from deepserve.server.config import ServerConfig
from deepserve.server.errors import APIError, from_validation_error
from deepserve.server.generation import Generation, Job, Prompt
from deepserve.server.http_body import parse_json, read_body
from deepserve.server.lifecycle import ServerState, WaitTicket

_RESERVED_TEMPLATE_KWARGS = frozenset({"chat_template", "tokenize", "return_dict", "return_tensors",
                                       "tokenizer_kwargs", "conversation", "messages"})


class OpenAIRoutes:
    def __init__(self, state: ServerState, served_model_name: str, config: ServerConfig):
        self.state = state
        self.model_name = served_model_name
        self.config = config
        self.generation = Generation(state, served_model_name)
        self._token_text: R.TokenText | None = None

    @property
    def engine(self) -> Any:
        return self.state.engine

    @property
    def token_text(self) -> R.TokenText:
        if self._token_text is None:
            self._token_text = token_texter(self.engine.tokenizer)
        return self._token_text

    # ---- routes --------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._admitted(request, self._completions)

    async def chat_completions(self, request: Request) -> Response:
        return await self._admitted(request, self._chat_completions)

    async def _completions(self, request: Request, reservation: WaitTicket) -> Response:
        req = await self.parse(request, P.CompletionRequest)
        req.check(self.config.max_n, self.engine.vocab_size)
        prompts = [self._plain_prompt(p) for p in req.prompts()]
        if len(prompts) * req.n > self.config.max_n:
            raise APIError.invalid("n", f"n times the number of prompts must be at most {self.config.max_n}")
        return await self._serve(request, req, prompts, R.CompletionFormat(self.token_text), "prompt", reservation)

    async def _chat_completions(self, request: Request, reservation: WaitTicket) -> Response:
        req = await self.parse(request, P.ChatCompletionRequest)
        req.check(self.config.max_n, self.engine.vocab_size)
        prompt = self.chat_prompt(req.template_messages(), req.template_options())
        fmt = R.ChatFormat(self.token_text, self._parser_factory(req, prompt))
        return await self._serve(request, req, [prompt], fmt, "messages", reservation)

    # ---- request -> prompts -> jobs -------------------------------------------------------------

    async def _admitted(self, request: Request, handle: Any) -> Response:
        """Hold a waiting slot from before the body is read (429 when the queue is full); the
        generation takes it over; any earlier error gives it back."""
        reservation = self._admit()
        try:
            return await handle(request, reservation)
        except BaseException:
            reservation.leave()
            raise

    def _admit(self) -> WaitTicket:
        try:
            return self.state.admission.reserve()
        except APIError:
            self.state.on_rejection("rate_limit")
            raise

    async def parse(self, request: Request, model: type[Any]) -> Any:
        obj = parse_json(await read_body(request, self.config.max_request_bytes), self.config.max_json_depth)
        try:
            req = model.model_validate(obj)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        self.check_model(req.model)
        return req

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _plain_prompt(self, prompt: str | list[int]) -> Prompt:
        if isinstance(prompt, str):
            return Prompt(prompt, self.encode(prompt, add_special_tokens=True))
        self.check_token_ids(prompt, "prompt")
        return Prompt(None, list(prompt))

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.vocab_size
        bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise APIError.invalid(param, f"token id {bad[0]} is outside the vocabulary")

    def chat_prompt(self, messages: list[dict], options: dict[str, Any]) -> Prompt:
        """Render the chat template (sandboxed); a template that fails on this input is a 400."""
        options = {k: v for k, v in options.items() if k not in _RESERVED_TEMPLATE_KWARGS}
        messages = self._with_tool_prompt(messages, options)
        try:
            rendered = self.engine.tokenizer.apply_chat_template(
                messages, chat_template=self.config.chat_template, **options)
        except Exception as exc:  # noqa: BLE001 - any template failure on client input is a client error
            raise APIError.invalid("messages", f"chat template could not render the messages: {exc}") from None
        if isinstance(rendered, str):
            return Prompt(rendered, self.encode(rendered, add_special_tokens=False))
        return Prompt(None, list(rendered))

    def _with_tool_prompt(self, messages: list[dict], options: dict[str, Any]) -> list[dict]:
        """Tools go into the system message when the template itself ignores `tools`."""
        tools, parser = options.get("tools"), self.config.tool_call_parser
        template = self.config.chat_template or getattr(self.engine.tokenizer, "chat_template", None) or ""
        if not tools or parser is None or "tools" in template:
            return messages
        from deepserve.server.parsers.tool_prompt import with_tools

        return with_tools(messages, tools, parser)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = list(self.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        if not ids:
            raise APIError.invalid("prompt", "prompt must not be empty")
        return ids

    def _parser_factory(self, req: P.ChatCompletionRequest, prompt: Prompt) -> R.ParserFactory | None:
        reasoning, tools = self.config.reasoning_parser, self.config.tool_call_parser
        tools_requested = bool(req.tools) and req.tool_choice != "none" and tools is not None
        if reasoning is None and not tools_requested:
            return None
        from deepserve.server.parsers.chat_stream import ChatOutputParser
        from deepserve.server.parsers.reasoning import prompt_opens_thinking

        opens = reasoning is not None and prompt_opens_thinking(prompt.text or "")
        return lambda: ChatOutputParser(reasoning, tools, opens, tools_requested)

    def _jobs(self, base: str, req: P.SamplingRequest, prompts: list[Prompt], param: str,
              skip_special: bool) -> list[Job]:
        jobs = []
        for p_index, prompt in enumerate(prompts):
            max_tokens = self._max_tokens(req, len(prompt.token_ids), param)
            for sample in range(req.n):
                index = p_index * req.n + sample
                params = req.sampling_params(max_tokens, sample, skip_special)
                jobs.append(Job(index, p_index, f"{base}-{index}", prompt, params))
        return jobs

    def _max_tokens(self, req: P.SamplingRequest, num_prompt: int, param: str) -> int:
        """max_tokens for one prompt; 400 context_length_exceeded when it cannot fit."""
        limit = self.engine.max_model_len
        asked = req.requested_max_tokens()
        if limit is None:
            return asked or self.config.default_completion_max_tokens
        room = limit - num_prompt
        default = self.config.default_completion_max_tokens if param == "prompt" else room
        wanted = asked if asked is not None else min(default, room)
        if room < 1 or wanted > room:
            raise APIError.invalid(param, f"This model's maximum context length is {limit} tokens, but "
                                          f"{num_prompt} prompt tokens plus {max(wanted, 1)} completion "
                                          f"tokens were requested", code="context_length_exceeded")
        return wanted

    async def _serve(self, request: Request, req: P.SamplingRequest, prompts: list[Prompt],
                     fmt: R.ResponseFormatter, param: str, reservation: WaitTicket) -> Response:
        base = f"{'chatcmpl' if param == 'messages' else 'cmpl'}-{uuid.uuid4().hex}"
        # DeepSeek's <think> and tool-call markers are added tokens with special=false, so they
        # survive skip_special_tokens=True, which still hides BOS/EOS from the parsers.
        jobs = self._jobs(base, req, prompts, param, skip_special=True)
        return await self.generation.respond(request, jobs, fmt, base, req.stream, req.include_usage, reservation)


def token_texter(tokenizer: Any) -> R.TokenText:
    """token id -> its text, for logprobs (special tokens included)."""
    try:
        backend = backend_tokenizer(tokenizer)
        return lambda token_id: backend.decode([token_id], skip_special_tokens=False)
    except TypeError:
        return lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)
