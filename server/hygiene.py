"""`HygieneMiddleware`: request-body caps before anything parses a body, and a last-resort 500 that keeps the
connection alive.

Body caps (issue 16, finding 5). Every HTTP request body is capped: at `settings.max_json_bytes`, except on the
routes that carry file content (`POST /files`, JSON or multipart, and `PUT /files/{id}`), which get
`settings.max_upload_bytes` plus `UPLOAD_FRAMING` bytes for the JSON or multipart framing around the file (the
route itself then refuses a file over `max_upload_bytes` with its 422). A `Content-Length` over the cap is answered
413 before a byte of the body is read (so an `Expect: 100-continue` client never sends it); a body without one
(chunked) is counted as uvicorn hands over its chunks, and the first read that passes the cap raises the 413, so
at most the cap plus one chunk is ever held, and a multipart upload stops before starlette spools more of it.
The answer is the envelope, 413 `payload_too_large` with `details.body` = "at most N bytes", and `Connection:
close`, so uvicorn closes the connection after it and reads nothing more (without it, uvicorn would read and
discard the rest of the body for as long as the client kept sending). httpx and the SDK still read the 413.

Last resort: an exception no handler took (starlette's ServerErrorMiddleware answers it and then re-raises, which
makes uvicorn close the connection) is logged and answered here with the plain 500 envelope, and the connection
stays usable. An exception after the response started is re-raised (the response is cut short).

Not covered here: JSON depth, lone surrogates and number ranges (server/errors.read_json, errors.check_text), path
ids (server/routes.parse_id), the per-file upload cap (server/routes/files.py).
"""

from __future__ import annotations

import logging
import re

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ApiError, error_response
from server.settings import Settings

log = logging.getLogger("runrl.server")

UPLOAD_FRAMING = 1024 * 1024
# (method, path under the root path) of the routes whose bodies carry file content
UPLOAD_ROUTES = (("POST", re.compile(r"/api/v1/files/?")), ("PUT", re.compile(r"/api/v1/files/[^/]+/?")))


class PayloadTooLarge(ApiError):
    def __init__(self, cap: int):
        super().__init__(413, f"Request body is too large: at most {cap} bytes on this route",
                         details={"body": f"at most {cap} bytes"}, headers={"Connection": "close"})


def body_cap(settings: Settings, method: str, path: str) -> int:
    """The most bytes a request body to `method path` may have."""
    if any(method == m and pattern.fullmatch(path) for m, pattern in UPLOAD_ROUTES):
        return settings.max_upload_bytes + UPLOAD_FRAMING
    return settings.max_json_bytes


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None  # h11 has already refused a malformed one
    return None


class HygieneMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        root = scope.get("root_path", "")
        path = scope["path"][len(root):] if root and scope["path"].startswith(root) else scope["path"]
        cap = body_cap(self.settings, scope["method"], path)
        length = _content_length(scope)
        if length is not None and length > cap:
            await _answer(PayloadTooLarge(cap), scope, receive, send)
            return

        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            if received > cap:  # a handler that caught the 413 and read again
                raise PayloadTooLarge(cap)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise PayloadTooLarge(cap)
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, tracking_send)
        except ClientDisconnect:
            return  # nobody to answer
        except Exception as exc:
            if started:
                raise
            if not isinstance(exc, ApiError):
                log.exception("unhandled error on %s %s", scope["method"], scope["path"])
                exc = ApiError(500, "Internal server error")
            await _answer(exc, scope, receive, send)


async def _answer(exc: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)(scope, receive, send)
