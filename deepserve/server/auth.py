"""API-key authentication as a plain ASGI middleware.

Deny by default: every path needs `Authorization: Bearer <key>` unless the raw request path is
exactly one of the open paths (`/health`, `/ready`, `/metrics`). Matching the exact raw path, not
a normalised one, means no spelling (`//health`, `/v1/../metrics`, `/v1/%2e%2e/metrics`,
`/metrics/`) opens anything: such a path needs the key, and then routes (or 404s) as usual.
Keys are compared with `hmac.compare_digest` against every configured key (no early exit).
"""

from __future__ import annotations

import hmac
from typing import Any, Iterable

from deepserve.server.errors import APIError, error_response

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
_BEARER = b"bearer "


def key_matches(presented: bytes, keys: Iterable[bytes]) -> bool:
    """Constant-time comparison against every key (the loop never stops early)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The bearer token of the (first) Authorization header, or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            if value[: len(_BEARER)].lower() != _BEARER:
                return None
            return value[len(_BEARER):].strip()
    return None


def raw_path(scope: dict) -> bytes:
    raw = scope.get("raw_path")
    if raw is None:
        raw = scope.get("path", "").encode("utf-8", "surrogateescape")
    return raw.split(b"?", 1)[0]


class APIKeyMiddleware:
    def __init__(self, app: Any, keys: Iterable[str], open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self.keys = tuple(k.encode("utf-8") for k in keys)
        self.open_paths = frozenset(p.encode() for p in open_paths)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.keys or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        err = APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error_response(err)(scope, receive, send)

    def _allowed(self, scope: dict) -> bool:
        if raw_path(scope) in self.open_paths:
            return True
        key = presented_key(scope.get("headers", []))
        return key is not None and key_matches(key, self.keys)
