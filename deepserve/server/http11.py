"""uvicorn's h11 protocol, answering an oversized request head with 431 instead of 400.

h11 refuses a request head larger than `h11_max_incomplete_event_size` (ServerConfig
.max_header_bytes) without buffering more of it, so memory stays flat; it marks that error with
`error_status_hint = 431`, which uvicorn drops. This subclass keeps the hint and sends it, in the
OpenAI error envelope, then closes the connection as uvicorn does.
"""

from __future__ import annotations

import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from deepserve.server.errors import APIError, error_response

_TOO_LARGE = json.dumps({"error": {"message": "request header fields too large", "type": "invalid_request_error",
                                   "param": None, "code": "header_too_large"}}).encode()


class H11Protocol431(H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._error_hint = 400
        next_event = self.conn.next_event

        def next_event_keeping_hint() -> Any:
            try:
                return next_event()
            except h11.RemoteProtocolError as exc:
                self._error_hint = exc.error_status_hint
                raise

        self.conn.next_event = next_event_keeping_hint  # type: ignore[method-assign]

    def send_400_response(self, msg: str) -> None:
        if self._error_hint != 431:
            super().send_400_response(msg)
            return
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=431, headers=headers, reason=b"Request Header Fields Too Large"),
                      h11.Data(data=_TOO_LARGE), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class HeaderLimitMiddleware:
    """431 for a request head over the limit that still reached the app (h11 enforces its limit
    only while a head is incomplete, so one that arrives in a single read can pass it)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and _head_size(scope) > self.max_bytes:
            err = APIError(431, "request header fields too large", code="header_too_large")
            await error_response(err)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _head_size(scope: dict) -> int:
    return len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
        len(k) + len(v) + 4 for k, v in scope.get("headers", []))
