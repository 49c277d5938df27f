"""Errors the server returns, always in the OpenAI envelope.

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

Route code raises `APIError`; the handlers installed by `install_error_handlers` turn it (and
anything unexpected) into a JSON response with the HTTP status in the status line.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("deepserve.server")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered to the client; `status` goes in the HTTP status line."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")

    @classmethod
    def invalid(cls, param: str | None, message: str, code: str | None = None) -> "APIError":
        return cls(400, message, param=param, code=code)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def from_validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """The first pydantic error as a 400; `param` is the top-level field it concerns."""
    errors = exc.errors()
    if not errors:
        return APIError.invalid(None, "invalid request")
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    param = str(loc[0]) if loc else None
    path = ".".join(str(p) for p in loc) or "request"
    return APIError.invalid(param, f"{path}: {first.get('msg', 'invalid value')}")


async def _api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(from_validation_error(exc))


async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = str(exc.detail) if exc.detail else "HTTP error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    err = APIError(exc.status_code, message, code=code)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    # The type only: an exception's message may quote the request (a prompt) and must not reach the log.
    logger.error("internal error while serving %s: %s", request.url.path, type(exc).__name__)
    logger.debug("internal error traceback", exc_info=exc)
    return error_response(APIError(500, f"internal server error ({type(exc).__name__})", type="server_error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
