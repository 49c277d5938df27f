"""Server logs: text or one JSON object per line, each with the request id of its request.

What is logged about a request is its id, method, path, status and duration (the access line
written by `RequestLogMiddleware`); never a header value, body, prompt, output or key. uvicorn's
own access log is turned off (it would log query strings).

    configure_logging("info", "json")   # once, at start-up (root logger -> stderr)
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from typing import Any

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("deepserve_request_id", default=None)
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
access_logger = logging.getLogger("deepserve.access")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
            "msg": record.getMessage(), "request_id": getattr(record, "request_id", None),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request_id={rid}]" if rid else line


def configure_logging(level: str, fmt: str = "text") -> None:
    """Root logger -> stderr in the chosen format; uvicorn's loggers propagate to it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def request_id_for(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-Id when it is short and plain, else a fresh one."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1")
            if _CLIENT_ID.match(text):
                return text
    return uuid.uuid4().hex


class RequestLogMiddleware:
    """Sets the request id (context + X-Request-Id response header) and writes one access line."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_for(scope.get("headers", []))
        token = REQUEST_ID.set(rid)
        start, status = time.monotonic(), [0]

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = message | {"headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _access_line(scope, status[0], time.monotonic() - start)
            REQUEST_ID.reset(token)


def _access_line(scope: dict, status: int, seconds: float) -> None:
    fields = {"method": scope.get("method"), "path": scope.get("path"), "status": status,
              "duration_ms": round(seconds * 1000, 1)}
    access_logger.info("%s %s %s %.1fms", fields["method"], fields["path"], status, fields["duration_ms"],
                       extra={"fields": fields})
