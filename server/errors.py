"""RunRL's response envelope, and the one place that maps exceptions to it.

Success: `{"success": true, "data": ..., "message"?}`. Failure: `{"success": false, "error": code, "message",
"details"?}` with the codes of spec §1.6. Handlers never put a traceback in a body: an unexpected exception is
logged here and answered with a plain 500 `internal_error`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runrl_engine.errors import UserError

log = logging.getLogger("runrl.server")

CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
         409: "conflict", 413: "payload_too_large", 422: "validation_error", 429: "rate_limit_exceeded",
         500: "internal_error", 503: "service_unavailable"}


class ApiError(Exception):
    """Raise anywhere in a route to answer with the error envelope."""

    def __init__(self, status: int, message: str, *, code: str | None = None, details: Any = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code or CODES.get(status, "error")
        self.message = message
        self.details = details
        self.headers = headers or {}


def not_found(what: str = "Resource") -> ApiError:
    return ApiError(404, f"{what} not found")


def invalid(details: dict[str, Any], message: str = "Validation failed") -> ApiError:
    """422 with field-level details: `{"field": "what is wrong"}`."""
    return ApiError(422, message, details=details)


class EnvelopeJSON(JSONResponse):
    """Compact JSON (no spaces), UTF-8, non-ASCII kept."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")


def ok(data: Any = None, *, message: str | None = None, status: int = 200) -> Response:
    body: dict[str, Any] = {"success": True, "data": data}
    if message:
        body["message"] = message
    return EnvelopeJSON(body, status_code=status)


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None, **top_level: Any) -> Response:
    """The failure envelope; `top_level` adds compatibility fields next to `error` (e.g. `retry_after`)."""
    body: dict[str, Any] = {"success": False, "error": code, "message": message}
    if details is not None:
        body["details"] = details
    body.update(top_level)
    return EnvelopeJSON(body, status_code=status, headers=headers)


async def read_json(request: Request, *, required: bool = True) -> dict[str, Any]:
    """The request's JSON object; malformed JSON is a 400, a non-object body a 422."""
    raw = await request.body()
    if not raw.strip():
        if required:
            raise ApiError(400, "Request body must be a JSON object")
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"Malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(422, "Request body must be a JSON object", details={"body": "expected an object"})
    return body


# ---- exception handlers (registered by create_app) ----------------------------------------------------------

async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"No route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, CODES.get(exc.status_code, "error"), message, headers=exc.headers)


async def user_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, UserError)
    details = {"where": exc.where, "fix": exc.fix}
    return error_response(422, "validation_error", exc.message, details)


async def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "Internal server error")


EXCEPTION_HANDLERS = {
    ApiError: api_error_handler,
    HTTPException: http_exception_handler,
    UserError: user_error_handler,
    Exception: internal_error_handler,
}
