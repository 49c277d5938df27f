"""Readiness, draining and admission: the server's runtime state (one object per server).

    LOADING --attach(engine)--> READY --begin_drain()--> DRAINING --> (uvicorn exits)
       any phase --mark_dead()--> DEAD  (the engine died: /health 503, the process exits non-zero)

`/health` is 200 unless DEAD; `/ready` is 200 only in READY. The gate middleware answers 503 to
API requests in any phase but READY, and counts the requests it lets through (`in_flight`), so a
drain can wait for them. `stop_generations()` ends the running generations now (drain timeout or
engine death): a draining server ends each unfinished choice with finish_reason "abort", a dead
one answers an error.

`Admission` bounds the queue: requests whose engine jobs have not produced a first output yet are
"waiting". The check reads only these counters, so a full queue is refused (429) before the body is
read or the prompt tokenised. `reserve()` counts an admitted request as waiting at once (before
any await), so a burst of requests arriving together sees itself; the generation takes the
reservation over when its jobs enter the queue.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any, Callable

from deepserve.server.errors import APIError, error_response


STOP = object()  # put on a generation's output queue: end it now


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


@dataclass
class Admission:
    """Counters of waiting engine jobs and their prompt tokens, against the configured limits."""

    max_requests: int | None = None
    max_tokens: int | None = None
    retry_after_s: int = 1
    waiting_requests: int = 0
    waiting_tokens: int = 0

    def check(self) -> None:
        """429 if the queue is full now; reads counters only (no prompt needed). Caller counts it."""
        if self.max_requests is not None and self.waiting_requests >= self.max_requests:
            raise self._full(f"{self.waiting_requests} requests are waiting (limit {self.max_requests})")
        if self.max_tokens is not None and self.waiting_tokens >= self.max_tokens:
            raise self._full(f"{self.waiting_tokens} prompt tokens are waiting (limit {self.max_tokens})")

    def _full(self, why: str) -> APIError:
        return APIError(429, f"server queue is full: {why}; retry later", code="rate_limit_exceeded",
                        headers={"Retry-After": str(self.retry_after_s)})

    def reserve(self) -> "WaitTicket":
        """check(), then hold one waiting slot (no prompt tokens yet) until the jobs enter."""
        self.check()
        return self.enter(0)

    def enter(self, num_tokens: int) -> "WaitTicket":
        self.waiting_requests += 1
        self.waiting_tokens += num_tokens
        return WaitTicket(self, num_tokens)


@dataclass
class WaitTicket:
    """One waiting job; `leave()` (first output, finish or abort) is idempotent."""

    admission: Admission
    num_tokens: int
    done: bool = False

    def leave(self) -> None:
        if not self.done:
            self.done = True
            self.admission.waiting_requests -= 1
            self.admission.waiting_tokens -= self.num_tokens


@dataclass
class ServerState:
    phase: Phase = Phase.LOADING
    engine: Any = None
    in_flight: int = 0
    exit_code: int = 0
    admission: Admission = field(default_factory=Admission)
    streams: set[asyncio.Queue] = field(default_factory=set)  # output queues of running generations
    on_rejection: Callable[[str], None] = lambda reason: None  # metrics hook: "rate_limit" | "draining"

    @classmethod
    def for_config(cls, config: Any, engine: Any = None) -> "ServerState":
        admission = Admission(config.max_waiting_requests, config.max_waiting_tokens, config.retry_after_s)
        state = cls(admission=admission)
        if engine is not None:
            state.attach(engine)
        return state

    def attach(self, engine: Any) -> None:
        """The engine is loaded and running: ready, unless already draining or dead."""
        self.engine = engine
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY and self.engine_healthy

    @property
    def live(self) -> bool:
        return self.phase is not Phase.DEAD and (self.engine is None or self.engine_healthy)

    @property
    def engine_healthy(self) -> bool:
        return self.engine is not None and bool(self.engine.healthy)

    def begin_drain(self) -> None:
        if self.phase is not Phase.DEAD:
            self.phase = Phase.DRAINING

    def mark_dead(self, exit_code: int = 1) -> None:
        self.phase = Phase.DEAD
        self.exit_code = exit_code
        self.stop_generations()

    def stop_generations(self) -> None:
        """End every running generation now (each gets STOP on its output queue)."""
        for queue in list(self.streams):
            queue.put_nowait(STOP)

    def gate_error(self) -> APIError | None:
        """Why an API request cannot be served now (None: it can)."""
        if self.phase is Phase.READY and self.engine_healthy:
            return None
        if self.phase is Phase.DRAINING:
            self.on_rejection("draining")
            return APIError(503, "server is shutting down", code="server_shutting_down")
        if self.phase is Phase.LOADING:
            return APIError(503, "model is loading; retry later", code="model_loading",
                            headers={"Retry-After": "1"})
        return APIError(503, "engine is not running", type="server_error", code="engine_dead")


UNGATED_PATHS = frozenset({"/health", "/ready", "/metrics", "/version"})


class GateMiddleware:
    """503 for API requests unless READY; counts the requests it lets through in `state.in_flight`."""

    def __init__(self, app: Any, state: ServerState, ungated: frozenset[str] = UNGATED_PATHS):
        self.app = app
        self.state = state
        self.ungated = ungated

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in self.ungated:
            await self.app(scope, receive, send)
            return
        err = self.state.gate_error()
        if err is not None:
            await error_response(err)(scope, receive, send)
            return
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1
