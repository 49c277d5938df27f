"""Run the OpenAI-compatible server: start the engine loop, serve with uvicorn, stop the engine.

SIGINT / SIGTERM make uvicorn stop accepting, finish open responses (up to
`shutdown_timeout_s`), and return; then the engine thread is stopped and joined and the process
exits 0. (Plain uvicorn re-raises the signal after its shutdown, which would skip that.)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

import uvicorn

from deepserve.server.app import build_app
from deepserve.server.config import ServerConfig

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Route SIGINT/SIGTERM to uvicorn's graceful exit; restore the old handlers, re-raise nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def uvicorn_config(app: Any, config: ServerConfig) -> uvicorn.Config:
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level.lower(),
                          timeout_graceful_shutdown=max(1, int(config.shutdown_timeout_s)), lifespan="off")


def run_server(engine: Any, served_model_name: str, config: ServerConfig = ServerConfig()) -> None:
    """Blocks until SIGINT/SIGTERM; the engine thread runs only while the server does."""
    server = _Server(uvicorn_config(build_app(engine, served_model_name, config), config))
    engine.start()
    try:
        server.run()
    finally:
        engine.shutdown()
