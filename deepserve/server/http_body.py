"""Reading a request body under a size limit and parsing it as a depth-limited JSON object.

The limit holds whether the client declares a Content-Length or streams a chunked body: the body
is read chunk by chunk and refused (413) as soon as it passes the limit, never buffered whole.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from deepserve.server.errors import APIError


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body larger than {limit} bytes", code="content_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body larger than {limit} bytes", code="content_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes, max_depth: int) -> dict:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise APIError.invalid(None, f"request body is not valid JSON ({type(exc).__name__})",
                               code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError.invalid(None, "request body must be a JSON object", code="invalid_json")
    if json_depth(obj, max_depth) > max_depth:
        raise APIError.invalid(None, f"JSON nesting deeper than {max_depth}", code="invalid_json")
    return obj


def json_depth(value: Any, stop_after: int) -> int:
    """Nesting depth of containers (a flat object is 1); stops counting past `stop_after`."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= stop_after:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest
