"""Online serving benchmark: streaming requests against an OpenAI-compatible server.

    config = ServeBenchConfig(base_url="http://127.0.0.1:8000", num_requests=200, request_rate=4.0)
    run = asyncio.run(run_benchmark(config))        # -> BenchRun (per-request results + timing)
    summary = serve_report.summarize(run, config)   # -> flat dict (BENCHMARKS.md figure names)

Arrivals: Poisson at `request_rate` req/s (exponential gaps from `seed`), or all at once when the
rate is infinite; `concurrency` caps requests in flight (rate inf + concurrency N is a closed
loop of N clients). A request's clock starts when it is sent (after it got a concurrency slot).
Before the run, GET /v1/models is polled while it answers 503 (model loading), up to
`ready_timeout_s`; it also names the model when `model` is None. The run stops issuing at `num_requests` or `time_limit_s`; requests still open at the time limit
are cancelled and reported as incomplete.

Per request (times from the moment it was sent, one perf_counter clock):
    TTFT  first chunk carrying text          ITL  every gap between text-carrying chunks
    E2E   end of the stream                   TPOT (E2E - TTFT) / (output tokens - 1)
Output tokens come from the usage chunk (stream_options.include_usage), else the number of
text-carrying chunks.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx

# Short, common words: about one BPE token each (with their leading space).
WORDS = ("the", "of", "and", "to", "in", "is", "it", "that", "was", "for", "on", "are", "with",
         "as", "at", "be", "this", "have", "from", "or", "one", "had", "by", "word", "but", "not",
         "what", "all", "were", "we", "when", "your", "can", "said", "there", "use", "an", "each",
         "which", "she", "do", "how", "their", "if", "will", "up", "other", "about", "out", "many",
         "then", "them", "these", "so", "some", "her", "would", "make", "like", "him", "into",
         "time", "has", "look", "two", "more", "write", "go", "see", "number", "no", "way", "could",
         "people", "my", "than", "first", "water", "been", "call", "who", "oil", "its", "now",
         "find", "long", "down", "day", "did", "get", "come", "made", "may", "part")
PROMPT_KINDS = ("words", "token-ids")
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model of GET /v1/models
    endpoint: str = "completions"  # "completions" | "chat"
    num_requests: int = 100
    request_rate: float = math.inf  # req/s, Poisson; inf sends every request at once
    concurrency: int | None = None  # most requests in flight; None: unbounded
    input_len: int = 128  # prompt length in tokens (approximate for "words")
    output_len: int = 128  # max_tokens of every request (a prompt file line may override it)
    prompt_kind: str = "words"  # "words" | "token-ids" (completions only)
    prompt_file: str | None = None  # jsonl of {"prompt": str | [int], "max_tokens"?: int}
    vocab_size: int = 1000  # random token ids are drawn from [0, vocab_size)
    seed: int = 0
    ignore_eos: bool = True
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.05
    time_limit_s: float | None = None
    request_timeout_s: float = 600.0
    ready_timeout_s: float = 120.0  # how long GET /v1/models may answer 503 (model loading)
    api_key: str | None = None

    def __post_init__(self) -> None:
        problems = list(config_problems(self))
        if problems:
            raise ValueError("; ".join(problems))


def config_problems(c: ServeBenchConfig) -> Iterator[str]:
    if c.endpoint not in ENDPOINTS:
        yield f"endpoint must be one of {tuple(ENDPOINTS)}"
    if c.prompt_kind not in PROMPT_KINDS:
        yield f"prompt kind must be one of {PROMPT_KINDS}"
    if c.endpoint == "chat" and c.prompt_kind == "token-ids" and c.prompt_file is None:
        yield "chat requests take text prompts, not token ids"
    if c.num_requests < 1 or c.input_len < 1 or c.output_len < 1 or c.vocab_size < 1:
        yield "num_requests, input_len, output_len and vocab_size must be at least 1"
    if not c.request_rate > 0:
        yield "request rate must be > 0 (inf: all at once)"
    if c.concurrency is not None and c.concurrency < 1:
        yield "concurrency must be at least 1"
    if c.ready_timeout_s < 0:
        yield "ready timeout must be >= 0"
    if c.time_limit_s is not None and c.time_limit_s <= 0:
        yield "time limit must be > 0"


@dataclass(frozen=True)
class RequestSpec:
    prompt: str | list[int]
    max_tokens: int


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    send_time_s: float = 0.0  # when it was sent, from the start of the run
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from the usage chunk, else approximated from the prompt

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class BenchRun:
    results: list[RequestResult]  # in the order they were issued
    wall_s: float  # start of the run to the end of the last request
    max_in_flight: int
    num_incomplete: int  # issued or due, but cut off by the time limit
    model: str


# ---- prompts --------------------------------------------------------------------------------------


def build_specs(config: ServeBenchConfig, rng: random.Random) -> list[RequestSpec]:
    if config.prompt_file is not None:
        return file_specs(Path(config.prompt_file), config.num_requests, config.output_len)
    make = random_words if config.prompt_kind == "words" else random_token_ids
    return [RequestSpec(make(config, rng), config.output_len) for _ in range(config.num_requests)]


def random_words(config: ServeBenchConfig, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(config.input_len))


def random_token_ids(config: ServeBenchConfig, rng: random.Random) -> list[int]:
    return [rng.randrange(config.vocab_size) for _ in range(config.input_len)]


def approx_prompt_len(prompt: str | list[int]) -> int:
    """Token ids: their number; text: its word count (about one token per word)."""
    return len(prompt) if isinstance(prompt, list) else len(prompt.split())


def file_specs(path: Path, num_requests: int, output_len: int) -> list[RequestSpec]:
    """Lines of a jsonl file, in order, repeated until there are `num_requests`."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no prompts")
    specs = [RequestSpec(_file_prompt(obj, path), int(obj.get("max_tokens", output_len))) for obj in lines]
    return [specs[i % len(specs)] for i in range(num_requests)]


def _file_prompt(obj: Any, path: Path) -> str | list[int]:
    prompt = obj.get("prompt") if isinstance(obj, dict) else None
    if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
        return prompt
    raise ValueError(f"{path}: every line must be an object with a \"prompt\" string or token id list")


# ---- one request ----------------------------------------------------------------------------------


def request_body(config: ServeBenchConfig, model: str, spec: RequestSpec) -> dict:
    body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": 0.0}
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.endpoint == "chat":
        return body | {"messages": [{"role": "user", "content": spec.prompt}]}
    return body | {"prompt": spec.prompt}


class _StreamTrace:
    """Timestamps of one SSE stream, fed line by line."""

    def __init__(self, start: float):
        self.start = start
        self.token_times: list[float] = []
        self.usage: dict | None = None
        self.error: str | None = None

    def feed(self, line: str, now: float) -> None:
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if data == "[DONE]":
            return
        self.feed_chunk(json.loads(data), now)

    def feed_chunk(self, chunk: dict, now: float) -> None:
        if "error" in chunk:
            self.error = str(chunk["error"].get("message", chunk["error"]))
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if any(_choice_text(c) for c in chunk.get("choices") or ()):
            self.token_times.append(now)

    def result(self, end: float) -> RequestResult:
        if self.error is None and not self.token_times:
            self.error = "the stream carried no text"
        if self.error is not None:
            return RequestResult(False, self.error)
        times = self.token_times
        usage = self.usage or {}
        return RequestResult(True, None, 0.0, times[0] - self.start, [b - a for a, b in zip(times, times[1:])],
                             end - self.start, int(usage.get("completion_tokens") or len(times)),
                             usage.get("prompt_tokens"))


def _choice_text(choice: dict) -> str:
    delta = choice.get("delta")
    return (delta.get("content") or "") if isinstance(delta, dict) else (choice.get("text") or "")


async def send_request(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    trace = _StreamTrace(time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return RequestResult(False, f"HTTP {response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                trace.feed(line, time.perf_counter())
    except (httpx.HTTPError, ValueError) as exc:
        return RequestResult(False, f"{type(exc).__name__}: {exc}")
    return trace.result(time.perf_counter())


# ---- the run --------------------------------------------------------------------------------------


def arrival_offsets(num: int, rate: float, rng: random.Random) -> list[float]:
    """Send times from the start: cumulative exponential gaps (Poisson process), or all 0."""
    if math.isinf(rate):
        return [0.0] * num
    offsets, t = [], 0.0
    for _ in range(num):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


class _Runner:
    """One benchmark run: schedules the requests, limits concurrency, tracks requests in flight."""

    def __init__(self, config: ServeBenchConfig, client: httpx.AsyncClient, model: str):
        self.config, self.client, self.model = config, client, model
        self.url = config.base_url.rstrip("/") + ENDPOINTS[config.endpoint]
        self.slots = asyncio.Semaphore(config.concurrency) if config.concurrency else None
        self.in_flight = self.max_in_flight = 0
        self.start = 0.0

    async def one(self, spec: RequestSpec, offset: float) -> RequestResult:
        await asyncio.sleep(max(0.0, self.start + offset - time.perf_counter()))
        if self.slots is None:
            return await self._send(spec)
        async with self.slots:
            return await self._send(spec)

    async def _send(self, spec: RequestSpec) -> RequestResult:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        sent = time.perf_counter() - self.start
        try:
            result = await send_request(self.client, self.url, request_body(self.config, self.model, spec))
        finally:
            self.in_flight -= 1
        result.send_time_s = sent
        if result.prompt_tokens is None:
            result.prompt_tokens = approx_prompt_len(spec.prompt)
        return result

    async def run(self, specs: list[RequestSpec], offsets: list[float]) -> BenchRun:
        self.start = time.perf_counter()
        tasks = [asyncio.create_task(self.one(s, o)) for s, o in zip(specs, offsets)]
        done, pending = await asyncio.wait(tasks, timeout=self.config.time_limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - self.start
        results = [t.result() for t in tasks if t in done]
        return BenchRun(results, wall, self.max_in_flight, len(pending), self.model)


def make_client(config: ServeBenchConfig) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limit = config.concurrency or config.num_requests
    timeout = httpx.Timeout(config.request_timeout_s, connect=30.0)
    return httpx.AsyncClient(headers=headers, timeout=timeout, trust_env=False,
                             limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit))


async def discover_model(client: httpx.AsyncClient, base_url: str, ready_timeout_s: float) -> str:
    """The first model of GET /v1/models, waiting out 503 (model loading) up to `ready_timeout_s`."""
    deadline = time.monotonic() + ready_timeout_s
    while True:
        response = await client.get(base_url.rstrip("/") + "/v1/models")
        if response.status_code != 503 or time.monotonic() >= deadline:
            break
        await asyncio.sleep(retry_after_s(response))
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def retry_after_s(response: httpx.Response) -> float:
    """The Retry-After seconds, clamped to [0.05, 2]; 1 when absent or a date."""
    try:
        seconds = float(response.headers.get("retry-after", "1"))
    except ValueError:
        seconds = 1.0
    return min(2.0, max(0.05, seconds))


async def run_benchmark(config: ServeBenchConfig) -> BenchRun:
    rng = random.Random(config.seed)
    specs = build_specs(config, rng)
    offsets = arrival_offsets(len(specs), config.request_rate, rng)
    async with make_client(config) as client:
        served = await discover_model(client, config.base_url, config.ready_timeout_s)
        model = config.model or served
        return await _Runner(config, client, model).run(specs, offsets)
