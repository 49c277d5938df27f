"""The OpenAI-compatible HTTP app: `build_app(engine, served_model_name, config)`.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions.
A request is read with a size limit, parsed as JSON (depth-limited), validated by the pydantic
models in `protocol.py`, tokenised here (chat: the tokenizer's chat template), checked against
max_model_len, and split into one engine request per (prompt, sample) ("<id>-<choice index>").
Outputs stream back as SSE (`data: {json}` ... `data: [DONE]`) or are collected into one body.
A client that goes away aborts its engine requests. The engine is anything with AsyncLLM's
surface: generate(), abort(), healthy, tokenizer, max_model_len, vocab_size.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from deepserve.engine.async_llm import EngineDeadError
from deepserve.engine.detokenizer import backend_tokenizer
from deepserve.engine.outputs import RequestOutput
from deepserve.sampling_params import SamplingParams
from deepserve.server import protocol as P
from deepserve.server.config import ServerConfig
from deepserve.server.errors import APIError, error_response, from_validation_error, install_error_handlers

DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class _Prompt:
    text: str | None
    token_ids: list[int]


@dataclass(frozen=True)
class _Job:
    """One engine request: sample `index` of the API request (prompt `prompt_index`)."""

    index: int
    prompt_index: int
    request_id: str
    prompt: _Prompt
    params: SamplingParams


class _ClientGone(Exception):
    pass


def build_app(engine: Any, served_model_name: str, config: ServerConfig = ServerConfig()) -> FastAPI:
    app = FastAPI(title="deepserve", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    routes = OpenAIRoutes(engine, served_model_name, config)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"])
    return app


class OpenAIRoutes:
    def __init__(self, engine: Any, served_model_name: str, config: ServerConfig):
        self.engine = engine
        self.model_name = served_model_name
        self.config = config
        self.created = int(time.time())
        self.token_text = token_texter(engine.tokenizer)

    # ---- routes --------------------------------------------------------------------------------

    async def health(self) -> Response:
        if not self.engine.healthy:
            return error_response(APIError(503, "engine is not running", code="engine_dead"))
        return JSONResponse({"status": "ok"})

    async def models(self) -> JSONResponse:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "deepserve",
                "max_model_len": self.engine.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request: Request) -> Response:
        req = await self._parse(request, P.CompletionRequest)
        prompts = [self._plain_prompt(p) for p in req.prompts()]
        if len(prompts) * req.n > self.config.max_n:
            raise APIError.invalid("n", f"n times the number of prompts must be at most {self.config.max_n}")
        return await self._serve(request, req, prompts, P.CompletionFormat(self.token_text), "prompt")

    async def chat_completions(self, request: Request) -> Response:
        req = await self._parse(request, P.ChatCompletionRequest)
        prompt = self._chat_prompt(req)
        return await self._serve(request, req, [prompt], P.ChatFormat(self.token_text), "messages")

    # ---- request -> prompts -> jobs -------------------------------------------------------------

    async def _parse(self, request: Request, model: type[P.SamplingRequest]) -> Any:
        obj = parse_json(await read_body(request, self.config.max_body_bytes), self.config.max_json_depth)
        try:
            req = model.model_validate(obj)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        if req.model != self.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves "
                                f"'{self.model_name}'", param="model", code="model_not_found")
        req.check(self.config.max_n, self.engine.vocab_size)
        return req

    def _plain_prompt(self, prompt: str | list[int]) -> _Prompt:
        if isinstance(prompt, str):
            return _Prompt(prompt, self._encode(prompt, add_special_tokens=True))
        vocab = self.engine.vocab_size
        bad = [t for t in prompt if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise APIError.invalid("prompt", f"token id {bad[0]} is outside the vocabulary")
        return _Prompt(None, list(prompt))

    def _chat_prompt(self, req: P.ChatCompletionRequest) -> _Prompt:
        try:
            rendered = self.engine.tokenizer.apply_chat_template(req.template_messages(),
                                                                 add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template that fails on this input is a client error
            raise APIError.invalid("messages", f"chat template could not render the messages: {exc}") from None
        if isinstance(rendered, str):
            return _Prompt(rendered, self._encode(rendered, add_special_tokens=False))
        return _Prompt(None, list(rendered))

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = list(self.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        if not ids:
            raise APIError.invalid("prompt", "prompt must not be empty")
        return ids

    def _jobs(self, base: str, req: P.SamplingRequest, prompts: list[_Prompt], param: str) -> list[_Job]:
        jobs = []
        for p_index, prompt in enumerate(prompts):
            max_tokens = self._max_tokens(req, len(prompt.token_ids), param)
            for sample in range(req.n):
                index = p_index * req.n + sample
                jobs.append(_Job(index, p_index, f"{base}-{index}", prompt, req.sampling_params(max_tokens, sample)))
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

    # ---- generation ------------------------------------------------------------------------------

    async def _serve(self, request: Request, req: P.SamplingRequest, prompts: list[_Prompt],
                     fmt: P.ResponseFormatter, param: str) -> Response:
        base = f"{'chatcmpl' if param == 'messages' else 'cmpl'}-{uuid.uuid4().hex}"
        jobs = self._jobs(base, req, prompts, param)
        head = P.envelope(fmt.chunk_object if req.stream else fmt.object, base, self.model_name)
        if req.stream:
            events = self._events(jobs, fmt, head, req.include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            choices = await until_disconnected(request, self._collect(jobs))
        except _ClientGone:
            return Response(status_code=499)
        body = head | {"choices": [fmt.choice(i, choices[i]) for i in sorted(choices)],
                       "usage": usage(jobs, choices)}
        return JSONResponse(body)

    async def _collect(self, jobs: list[_Job]) -> dict[int, P.ChoiceState]:
        choices = {job.index: P.ChoiceState() for job in jobs}
        try:
            async with aclosing(self._merge(jobs)) as merged:
                async for job, output in merged:
                    choices[job.index].add(output)
        except (ValueError, TypeError) as exc:
            raise APIError.invalid(None, str(exc)) from None
        except EngineDeadError as exc:
            raise APIError(500, str(exc), type="server_error", code="engine_error") from None
        return choices

    async def _events(self, jobs: list[_Job], fmt: P.ResponseFormatter, head: dict,
                      include_usage: bool) -> AsyncIterator[str]:
        choices = {job.index: P.ChoiceState() for job in jobs}
        try:
            for job in jobs:
                first = fmt.first_chunk_choice(job.index)
                if first is not None:
                    yield sse(head | {"choices": [first]})
            async with aclosing(self._merge(jobs)) as merged:
                async for job, output in merged:
                    delta = choices[job.index].add(output)
                    if delta.text or delta.logprobs or output.finished:
                        yield sse(head | {"choices": [fmt.chunk_choice(job.index, delta, choices[job.index])]})
            if include_usage:
                yield sse(head | {"choices": [], "usage": usage(jobs, choices)})
        except (APIError, ValueError, TypeError, EngineDeadError) as exc:
            yield sse(_stream_error(exc))
        yield DONE

    async def _merge(self, jobs: list[_Job]) -> AsyncIterator[tuple[_Job, RequestOutput]]:
        """Outputs of all jobs as they come; closing this aborts every job still running."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(job: _Job) -> None:
            try:
                async for output in self.engine.generate(job.request_id, job.prompt.token_ids, job.params):
                    queue.put_nowait((job, output))
                queue.put_nowait((job, None))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((job, exc))

        tasks = [asyncio.create_task(pump(job)) for job in jobs]
        try:
            running = len(tasks)
            while running:
                job, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    running -= 1
                else:
                    yield job, item
        finally:
            for task in tasks:
                task.cancel()


# ---- helpers ------------------------------------------------------------------------------------


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _stream_error(exc: Exception) -> dict:
    if isinstance(exc, APIError):
        return exc.body()
    if isinstance(exc, EngineDeadError):
        return APIError(500, str(exc), type="server_error", code="engine_error").body()
    return APIError.invalid(None, str(exc)).body()


def usage(jobs: list[_Job], choices: dict[int, P.ChoiceState]) -> dict:
    """Token counts of one API request: each prompt counts once, however many samples it has."""
    firsts = {job.prompt_index: job for job in reversed(jobs)}
    return P.usage_body(
        prompt_tokens=sum(len(job.prompt.token_ids) for job in firsts.values()),
        completion_tokens=sum(c.num_tokens for c in choices.values()),
        cached_tokens=sum(choices[job.index].num_cached_tokens for job in firsts.values()),
    )


def token_texter(tokenizer: Any) -> P.TokenText:
    """token id -> its text, for logprobs (special tokens included)."""
    try:
        backend = backend_tokenizer(tokenizer)
        return lambda token_id: backend.decode([token_id], skip_special_tokens=False)
    except TypeError:
        return lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body larger than {limit} bytes", code="content_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body larger than {limit} bytes", code="content_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes, max_depth: int) -> dict:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise APIError.invalid(None, f"request body is not valid JSON ({type(exc).__name__})",
                               code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError.invalid(None, "request body must be a JSON object", code="invalid_json")
    if json_depth(obj, max_depth) > max_depth:
        raise APIError.invalid(None, f"JSON nesting deeper than {max_depth}", code="invalid_json")
    return obj


def json_depth(value: Any, stop_after: int) -> int:
    """Nesting depth of containers (a flat object is 1); stops counting past `stop_after`."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= stop_after:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


async def until_disconnected(request: Request, work: Any) -> Any:
    """Await `work`; if the client disconnects first, cancel it (aborting its requests)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise _ClientGone()
    finally:
        task.cancel()
        watch.cancel()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
