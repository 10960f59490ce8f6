"""RunRL's response envelope, and the one place that maps exceptions to it.

Success: `{"success": true, "data": ..., "message"?}`. Failure: `{"success": false, "error": code, "message",
"details"?}` with the codes of spec §1.6; a 4xx `message` carries the first reason of `details` (`Validation
failed: completion_length: ...`), the full list staying in `details`. Handlers never put a traceback in a body:
an unexpected exception is logged here and answered with a plain 500 `internal_error`. The renderer never
raises on output: a lone surrogate already in the store is written as its JSON escape.

`read_json` (`parse_json`) is where every JSON body is checked before a route sees it: strict UTF-8 (else a 400),
at most `max_json_depth` levels of nesting (a 422, however deep the body; Python's parser stops at its
recursion limit and that is a 422 too), no string (key or value) that cannot be encoded as UTF-8 (lone
surrogates: a 422 naming the field), every integer within SQLite's int64 and every number finite (NaN/Infinity
are malformed JSON, 1e999 a 422). Quick byte-level tests decide which checks a body needs, so a typical body
(or a 50 MB file's content) costs little beyond the parse; a field is named by a walk bounded to
`_WALK_BUDGET` values, after which the 422 names `body`. `check_text` applies the string rule to multipart
fields. Not here: the size of a body (capped before this, by server/hygiene.py), path ids
(server/routes.parse_id), what a field means (each route).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from typing import Any, Iterator

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runrl_engine.errors import UserError

log = logging.getLogger("runrl.server")

CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
         409: "conflict", 413: "payload_too_large", 422: "validation_error", 429: "rate_limit_exceeded",
         500: "internal_error", 503: "service_unavailable"}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # SQLite's INTEGER range
DEFAULT_MAX_JSON_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


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


class EnvelopeJSON(JSONResponse):
    """Compact JSON (no spaces), UTF-8, non-ASCII kept."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, separators=(",", ":"), default=str)
        # a lone surrogate (only ever inside a JSON string) becomes its `\udXXX` escape, as ensure_ascii writes it
        return text.encode("utf-8", errors="backslashreplace")


def ok(data: Any = None, *, message: str | None = None, status: int = 200) -> Response:
    body: dict[str, Any] = {"success": True, "data": data}
    if message:
        body["message"] = message
    return EnvelopeJSON(body, status_code=status)


def with_first_reason(status: int, message: str, details: Any) -> str:
    """The `message` of a 4xx whose `details` map fields to reasons, with the first reason appended:
    `Validation failed: completion_length: must be a number between 1 and 32768 (and 2 more in details)` (the
    SDK's exception shows only `message`). Kept as is when it already says why: it holds that reason (or is
    its start), or it is already `summary: reason`; and when the first detail is not a text reason
    (`retry_after: 5`, a list of run ids)."""
    if not 400 <= status < 500 or not isinstance(details, dict) or not details:
        return message
    field, reason = next(iter(details.items()))
    if not isinstance(reason, str) or not reason or reason in message or reason.startswith(message) \
            or ": " in message:
        return message
    more = len(details) - 1
    return f"{message}: {field}: {reason}" + (f" (and {more} more in details)" if more else "")


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None, **top_level: Any) -> Response:
    """The failure envelope; `top_level` adds compatibility fields next to `error` (e.g. `retry_after`). Every
    failure goes through here, so every 4xx `message` carries its first reason (`with_first_reason`)."""
    body: dict[str, Any] = {"success": False, "error": code, "message": with_first_reason(status, message, details)}
    if details is not None:
        body["details"] = details
    body.update(top_level)
    return EnvelopeJSON(body, status_code=status, headers=headers)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _too_deep(limit: int) -> ApiError:
    return ApiError(422, f"JSON body is nested too deeply: at most {limit} levels",
                    details={"body": f"nested deeper than {limit} levels"})


def _shown(key: str) -> str:
    return key.encode("utf-8", errors="backslashreplace").decode("utf-8")


def check_text(value: str, where: str) -> str:
    """`value` unless it holds a lone surrogate (text that cannot be stored or sent as UTF-8): then a 422."""
    bad = None if value.isascii() else _SURROGATE.search(value)  # isascii() is O(1) in CPython
    if bad:
        raise ApiError(422, "Validation failed", details={
            where: f"contains a lone surrogate ({_shown(bad.group())}), which is not valid Unicode text"})
    return value


def check_json_value(value: Any, max_depth: int = DEFAULT_MAX_JSON_DEPTH, *, budget: int | None = None) -> None:
    """Walk a parsed JSON value (iteratively) and refuse what the store or the renderer cannot take: nesting
    deeper than `max_depth` containers, lone surrogates in keys or strings, integers outside int64, non-finite
    numbers. Errors name the field as a path: `configuration.model`, `tool_ids[1]`. After `budget` values the
    walk stops (returns): `read_json` calls it only once its quick checks found a problem, to name the field."""
    stack: list[tuple[int, str, Iterator[tuple[Any, Any]]]] = [(0, "", iter(((None, value),)))]
    while stack:  # depth first, one iterator per open container: (depth of its items, its path, (key, item)s)
        depth, parent, items = stack[-1]
        entry = next(items, None)
        if entry is None:
            stack.pop()
            continue
        if budget is not None:
            budget -= 1
            if budget < 0:
                return
        key, item = entry
        if key is None:
            where = parent
        elif type(key) is int:
            where = f"{parent or 'body'}[{key}]"
        else:
            where = f"{parent}.{_shown(key)}" if parent else _shown(key)
        if isinstance(item, dict):
            if depth >= max_depth:
                raise _too_deep(max_depth)
            if not all(map(str.isascii, item)):
                for name in item:
                    check_text(name, where or "body")
            stack.append((depth + 1, where, iter(item.items())))
        elif isinstance(item, list):
            if depth >= max_depth:
                raise _too_deep(max_depth)
            stack.append((depth + 1, where, enumerate(item)))
        elif isinstance(item, str):
            check_text(item, where or "body")
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                raise ApiError(422, "Validation failed", details={where or "body": "integer out of range (64-bit)"})
        elif isinstance(item, float) and not math.isfinite(item):
            raise ApiError(422, "Validation failed", details={where or "body": "must be a finite number"})


# What the raw bytes must contain for a rule to be at risk: a lone surrogate only arrives as a `\uDxxx` escape
# (the text is strict UTF-8); an integer outside int64 has 19+ digits; a float overflows to infinity only with
# 19+ digits or a 3-digit exponent; nesting deeper than N needs more than N brackets. Bodies without them (nearly
# all) skip those checks; the tests are substring searches on bytes (C speed, also for a 50 MB file's content).
_NUMERIC = bytes.maketrans(b"123456789E-", b"000000000e+")
_WALK_BUDGET = 50_000


def _maybe_huge(raw: bytes) -> bool:
    mapped = raw.translate(_NUMERIC)
    return b"0" * 19 in mapped or b"e000" in mapped or b"e+000" in mapped


def _broken_rule(body: Any, raw: bytes, max_depth: int) -> str | None:
    """Which rule `body` breaks, if any, with C-speed checks (no per-value Python work for typical bodies)."""
    huge = _maybe_huge(raw)
    if huge or raw.count(b"[") + raw.count(b"{") > max_depth:
        level, depth = [[body]], 0  # level by level: the containers `depth` deep (the body itself may be a scalar)
        while level:
            children: list[Any] = []
            for item in level:
                children.extend(item.values() if type(item) is dict else item)
            if huge:
                ints = [c for c in children if type(c) is int]
                if ints and (max(ints) > INT64_MAX or min(ints) < INT64_MIN):
                    return "an integer out of range (64-bit)"
            level = [c for c in children if type(c) is dict or type(c) is list]
            depth += 1
            if level and depth > max_depth:
                raise _too_deep(max_depth)
    if huge or b"\\ud" in raw or b"\\uD" in raw:
        try:
            out = json.dumps(body, ensure_ascii=False, allow_nan=False, check_circular=False)
        except ValueError:
            return "a number that is not finite"
        if not out.isascii() and _SURROGATE.search(out):
            return "a lone surrogate, which is not valid Unicode text"
    return None


def parse_json(raw: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Any:
    """Strict UTF-8 JSON text -> value, checked (see `check_json_value`); ApiError 400/422 otherwise."""
    try:
        text = raw.decode("utf-8-sig")  # strict: json.loads(bytes) would let encoded surrogates through
        body = json.loads(text, parse_constant=_no_constant)
    except RecursionError:  # deeper than the parser's recursion limit (~1000), far over max_depth
        raise _too_deep(max_depth) from None
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"Malformed JSON body: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers over 4300 digits
        raise ApiError(400, f"Malformed JSON body: {exc}") from None
    problem = _broken_rule(body, raw, max_depth)
    if problem:
        check_json_value(body, max_depth, budget=_WALK_BUDGET)  # raises naming the field
        raise ApiError(422, "Validation failed", details={"body": f"contains {problem}"})
    return body


async def read_json(request: Request, *, required: bool = True) -> dict[str, Any]:
    """The request's JSON object, checked by `parse_json`; malformed JSON is a 400, a non-object body or one
    that fails the checks a 422. Bodies over 1 MiB (only routes that carry file content allow them) are parsed
    in a worker thread, so the event loop keeps serving."""
    raw = await request.body()
    if not raw.strip():
        if required:
            raise ApiError(400, "Request body must be a JSON object")
        return {}
    services = getattr(request.app.state, "services", None)
    max_depth = getattr(getattr(services, "settings", None), "max_json_depth", DEFAULT_MAX_JSON_DEPTH)
    if len(raw) > 1024 * 1024:
        body = await asyncio.to_thread(parse_json, raw, max_depth)
    else:
        body = parse_json(raw, max_depth)
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
    return error_response(422, "validation_error", f"{exc.where}: {exc.message}" if exc.where else exc.message,
                          details)


async def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "Internal server error")


EXCEPTION_HANDLERS = {
    ApiError: api_error_handler,
    HTTPException: http_exception_handler,
    UserError: user_error_handler,
    Exception: internal_error_handler,
}
