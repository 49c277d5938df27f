"""Run the OpenAI-compatible server with the engine core in its own process.

    asyncio.run(serve):
      uvicorn binds at once (LOADING: /health 200, /ready and the API 503)
      await engine.start()          the engine process loads the model -> state.attach(engine): READY
      SIGINT / SIGTERM              DRAINING: the socket stays open, /ready and new API requests get
                                    503 at once, in-flight ones may finish; after drain_timeout_s the
                                    rest end with finish_reason "abort"; then uvicorn exits (status 0)
      engine dies                   DEAD: in-flight requests fail at once, /health 503 for a moment,
                                    then uvicorn exits and run_server raises SystemExit(1)
      finally                       engine.shutdown(): Shutdown message, join, kill if needed
    A second signal exits at once.

Keep the listener open while draining (uvicorn's own handle_exit would close it, and clients would
see "connection refused" instead of 503): tests/e2e/test_contract_lifecycle.py checks this.
`run_server` lets a start-up error (LoadError, EngineStartError) propagate for the CLI to report.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import threading
import time
from typing import Any, Iterator

import uvicorn

from deepserve.server.app import build_app, build_metrics_app
from deepserve.server.config import ServerConfig
from deepserve.server.http11 import H11Protocol431
from deepserve.server.lifecycle import ServerState

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
ENGINE_DIED_EXIT_CODE = 1
STOPPED_GRACE_S = 2.0  # after stopping generations, how long their responses get to finish
DEATH_FLUSH_S = 1.0  # after the engine died, how long error responses (and /health 503) get before exit
POLL_S = 0.05

logger = logging.getLogger("deepserve.server")


class _Server(uvicorn.Server):
    """uvicorn with a drain: the first SIGINT/SIGTERM drains (the listener stays open, new API requests
    get 503) and exits once in-flight requests are done or the drain timed out; a second signal exits
    at once. `companions` (the metrics port) stop with it and never touch the signals."""

    def __init__(self, config: uvicorn.Config, state: ServerState | None = None, drain_timeout_s: float = 0.0):
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self.companions: list[uvicorn.Server] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Route SIGINT/SIGTERM to `handle_exit`; restore the old handlers, re-raise nothing."""
        if self.state is None or threading.current_thread() is not threading.main_thread():
            yield
            return
        self.loop = asyncio.get_running_loop()
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.loop is None or self.draining is not None:
            self.loop.call_soon_threadsafe(self.exit_now) if self.loop else self.exit_now()
            return
        self.loop.call_soon_threadsafe(self._begin_drain)

    def exit_now(self) -> None:
        for server in [self, *self.companions]:
            server.should_exit = True

    def _begin_drain(self) -> None:
        if self.draining is None:
            self.state.begin_drain()
            self.draining = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        """Wait for in-flight requests up to the drain timeout, end the rest ("abort"), then exit."""
        if not await self._wait_idle(self.drain_timeout_s):
            self.state.stop_generations()
            await self._wait_idle(STOPPED_GRACE_S)
        self.exit_now()

    async def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.state.in_flight > 0 and time.monotonic() < deadline and not self.should_exit:
            await asyncio.sleep(POLL_S)
        return self.state.in_flight <= 0


class _QuietServer(uvicorn.Server):
    """A companion server (metrics port): leaves the signals to the main server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_config(app: Any, config: ServerConfig, port: int | None = None) -> uvicorn.Config:
    """Our own logging (configure_logging) and access lines; h11 with a 431 for oversized heads."""
    return uvicorn.Config(app, host=config.host, port=config.port if port is None else port,
                          log_level=config.log_level.lower(), log_config=None, access_log=False,
                          http=H11Protocol431, h11_max_incomplete_event_size=config.max_header_bytes,
                          ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile,
                          timeout_graceful_shutdown=5, lifespan="off", loop="asyncio")


def make_metrics(model_name: str) -> Any:
    """ServerMetrics when server/metrics.py (prometheus_client) is importable, else None."""
    try:
        from deepserve.server.metrics import ServerMetrics
    except ImportError:
        return None
    return ServerMetrics(model_name)


def wire_metrics(engine: Any, state: ServerState, metrics: Any) -> None:
    if metrics is None:
        return
    state.on_rejection = metrics.count_rejection
    if hasattr(engine, "on_request_finished"):
        engine.on_request_finished = metrics.observe_finished


def run_server(engine: Any, served_model_name: str, config: ServerConfig = ServerConfig()) -> None:
    """Blocks until drained after SIGINT/SIGTERM; SystemExit(1) when the engine died.

    `engine` is an AsyncLLM that was not started yet (its tokenizer is loaded, its model is not).
    """
    state = ServerState.for_config(config)
    metrics = make_metrics(served_model_name)
    wire_metrics(engine, state, metrics)
    app = build_app(None, served_model_name, config, state=state, metrics=metrics)
    server = _Server(uvicorn_config(app, config), state, config.drain_timeout_s)
    if config.metrics_port is not None and metrics is not None:
        metrics_app = build_metrics_app(metrics, state)
        server.companions.append(_QuietServer(uvicorn_config(metrics_app, config, config.metrics_port)))
    exit_code = asyncio.run(serve(engine, server, state))
    if exit_code:
        logger.error("the engine died; exiting with status %d", exit_code)
        raise SystemExit(exit_code)


async def serve(engine: Any, server: _Server, state: ServerState) -> int:
    """Serve while the engine starts and runs; the exit status (non-zero: the engine died)."""
    serving = asyncio.gather(*(s.serve() for s in [server, *server.companions]))
    watcher: asyncio.Task | None = None
    try:
        if await start_engine(engine, serving):
            state.attach(engine)
            logger.info("engine ready")
            watcher = asyncio.create_task(_watch_engine(engine, state, server))
        await serving
    finally:
        if watcher is not None:
            watcher.cancel()
        server.exit_now()
        await asyncio.gather(serving, return_exceptions=True)
        engine.shutdown()
    return state.exit_code


async def start_engine(engine: Any, serving: asyncio.Future) -> bool:
    """Start the engine unless the servers stop first (signal, bind error); True once it runs."""
    starting = asyncio.ensure_future(_call(engine.start))
    await asyncio.wait({starting, serving}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return False
    starting.result()  # a load error propagates
    return not serving.done()


async def _call(fn: Any) -> Any:
    result = fn()
    return await result if inspect.isawaitable(result) else result


async def _watch_engine(engine: Any, state: ServerState, server: _Server) -> None:
    """Engine death -> in-flight requests fail, /health 503, exit non-zero after a short flush."""
    dead = getattr(engine, "dead", None)
    if isinstance(dead, asyncio.Event):
        await dead.wait()
    while engine.healthy:  # engines without a `dead` event are polled
        await asyncio.sleep(POLL_S * 5)
    logger.error("the engine stopped unexpectedly")
    state.mark_dead(ENGINE_DIED_EXIT_CODE)
    await asyncio.sleep(DEATH_FLUSH_S)
    server.exit_now()
