"""Run the OpenAI-compatible server: start the engine loop, serve with uvicorn, stop the engine."""

from __future__ import annotations

from typing import Any

from deepserve.server.app import build_app
from deepserve.server.config import ServerConfig


def uvicorn_config(app: Any, config: ServerConfig) -> Any:
    import uvicorn

    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level.lower(),
                          timeout_graceful_shutdown=max(1, int(config.shutdown_timeout_s)), lifespan="off")


def run_server(engine: Any, served_model_name: str, config: ServerConfig = ServerConfig()) -> None:
    """Blocks until SIGINT/SIGTERM; the engine thread runs only while the server does."""
    import uvicorn

    server = uvicorn.Server(uvicorn_config(build_app(engine, served_model_name, config), config))
    engine.start()
    try:
        server.run()
    finally:
        engine.shutdown()
