"""The OpenAI-compatible HTTP app: `build_app(engine, served_model_name, config)`.

    GET  /health /ready /version /metrics                      (routes_admin.py)
    GET  /v1/models       POST /tokenize /detokenize           (routes_admin.py)
    POST /v1/completions /v1/chat/completions                  (routes_openai.py)

Middleware, outermost first: request id + access log (logging.py), head size (431), CORS (only with
allowed_origins), API key (auth.py), readiness/drain gate (lifecycle.py). The engine is anything
with AsyncLLM's surface (generate, abort, healthy, tokenizer, max_model_len, vocab_size); pass
`engine=None` with a `ServerState` to serve /health and /ready while the model still loads, then
`state.attach(engine)`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from deepserve.server.auth import APIKeyMiddleware
from deepserve.server.config import ServerConfig
from deepserve.server.errors import install_error_handlers
from deepserve.server.http11 import HeaderLimitMiddleware
from deepserve.server.lifecycle import GateMiddleware, ServerState
from deepserve.server.logging import RequestLogMiddleware
from deepserve.server.routes_admin import AdminRoutes
from deepserve.server.routes_openai import OpenAIRoutes


def build_app(engine: Any, served_model_name: str, config: ServerConfig = ServerConfig(),
              state: ServerState | None = None, metrics: Any = None) -> FastAPI:
    state = state or ServerState.for_config(config, engine)
    if engine is not None and state.engine is None:
        state.attach(engine)
    app = FastAPI(title="deepserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server_state = state
    install_error_handlers(app)
    openai = OpenAIRoutes(state, served_model_name, config)
    admin = AdminRoutes(state, openai, metrics if config.metrics_port is None else None)
    _add_routes(app, openai, admin)
    _add_middleware(app, config, state)
    return app


def _add_routes(app: FastAPI, openai: OpenAIRoutes, admin: AdminRoutes) -> None:
    for path, handler in (("/health", admin.health), ("/ready", admin.ready), ("/version", admin.version),
                          ("/openapi.json", admin.openapi),
                          ("/metrics", admin.metrics_text), ("/v1/models", admin.models)):
        app.add_api_route(path, handler, methods=["GET"])
    for path, handler in (("/tokenize", admin.tokenize), ("/detokenize", admin.detokenize),
                          ("/v1/completions", openai.completions),
                          ("/v1/chat/completions", openai.chat_completions)):
        app.add_api_route(path, handler, methods=["POST"])


def _add_middleware(app: FastAPI, config: ServerConfig, state: ServerState) -> None:
    """Added innermost first (Starlette wraps each new one around the previous)."""
    app.add_middleware(GateMiddleware, state=state)
    app.add_middleware(APIKeyMiddleware, keys=config.api_keys)
    if config.allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(HeaderLimitMiddleware, max_bytes=config.max_header_bytes)
    app.add_middleware(RequestLogMiddleware)


def build_metrics_app(metrics: Any, state: ServerState) -> FastAPI:
    """A separate app with only /metrics (and /health), for --metrics-port."""
    app = FastAPI(title="deepserve-metrics", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    admin = AdminRoutes(state, None, metrics)  # type: ignore[arg-type]
    app.add_api_route("/metrics", admin.metrics_text, methods=["GET"])
    app.add_api_route("/health", admin.health, methods=["GET"])
    return app
