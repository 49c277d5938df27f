"""Service routes: /health, /ready, /version, /metrics, /v1/models, /tokenize, /detokenize.

/health is liveness (200 while the process can serve or is still loading; 503 once the engine
died). /ready is readiness (200 only when loaded and not draining). /metrics renders the
`ServerMetrics` given to `build_app` (404 when there is none, or when it lives on its own port).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from deepserve.server import protocol as P
from deepserve.server.errors import APIError, error_response
from deepserve.server.lifecycle import ServerState
from deepserve.server.routes_openai import OpenAIRoutes


class AdminRoutes:
    def __init__(self, state: ServerState, openai: OpenAIRoutes, metrics: Any = None):
        self.state = state
        self.openai = openai
        self.metrics = metrics
        self.created = int(time.time())

    async def health(self) -> Response:
        if not self.state.live:
            return error_response(APIError(503, "engine is not running", code="engine_dead"))
        return JSONResponse({"status": "ok"})

    async def ready(self) -> Response:
        if not self.state.ready:
            return JSONResponse({"status": self.state.phase.value, "ready": False}, status_code=503,
                                headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "ready": True})

    async def version(self) -> Response:
        from deepserve import __version__

        return JSONResponse({"version": __version__})

    async def openapi(self) -> Response:
        from deepserve import __version__
        from deepserve.server.openapi import openapi_document

        return JSONResponse(openapi_document(__version__))

    async def metrics_text(self) -> Response:
        if self.metrics is None:
            return error_response(APIError(404, "metrics are not served on this port", code="not_found"))
        engine = self.state.engine
        if engine is not None and hasattr(engine, "stats"):
            self.metrics.update_engine(engine.stats())
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    async def models(self) -> JSONResponse:
        card = {"id": self.openai.model_name, "object": "model", "created": self.created, "owned_by": "deepserve",
                "max_model_len": self.state.engine.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    async def tokenize(self, request: Request) -> JSONResponse:
        req = await self.openai.parse(request, P.TokenizeRequest)
        req.check()
        if req.messages is not None:
            options = {"add_generation_prompt": req.add_generation_prompt}
            ids = self.openai.chat_prompt([m.as_template_dict() for m in req.messages], options).token_ids
        else:
            ids = list(self.state.engine.tokenizer.encode(req.prompt or "", add_special_tokens=req.add_special_tokens))
        return JSONResponse({"count": len(ids), "max_model_len": self.state.engine.max_model_len, "tokens": ids})

    async def detokenize(self, request: Request) -> JSONResponse:
        req = await self.openai.parse(request, P.DetokenizeRequest)
        self.openai.check_token_ids(req.tokens, "tokens")
        return JSONResponse({"prompt": self.state.engine.tokenizer.decode(req.tokens)})
