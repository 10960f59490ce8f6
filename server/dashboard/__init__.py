"""The web dashboard: static HTML/CSS/JS served at `/` (and `/static/...`) by the API's own app.

What this module serves is only files committed next to it: `index.html` at `/`, and `static/` (`app.css`,
`js/*.js`, the vendored charting library in `static/vendor/`: uPlot 1.6.32 from npm, MIT, its licence in
`static/vendor/uPlot.LICENSE`) at `/static/`; nothing is built
at install time and nothing is fetched from a CDN at run time. The assets need no key: they hold no data. Every
piece of data the page shows comes from the REST API under `/api/v1`, called from the browser with the API key
the user signs in with (kept in the tab's sessionStorage), so scopes and ownership apply exactly as for any
client. `GET /runs/create?config=<uuid>` (the `shareable_url` of a shared configuration) redirects to the
dashboard's new-run form with that configuration.

Every dashboard response carries a Content-Security-Policy (`default-src 'self'`, no inline script or style,
`connect-src 'self'`, no framing) plus `nosniff` and `no-referrer`; the scripts build the page with
`textContent` and DOM nodes only, never `innerHTML` with data. Not covered here: the API itself (server/routes),
its headers, and anything the browser does with a deployment's answers beyond showing them as text.
"""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ASSETS = Path(__file__).resolve().parent
STATIC = ASSETS / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


class SecurityHeaders:
    """Adds SECURITY_HEADERS and `Cache-Control: no-cache` to every response of the wrapped app (the static files:
    a browser revalidates them by ETag, so an upgraded server never runs with a cached older script)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                headers.append((b"cache-control", b"no-cache"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


async def index(request: Request) -> Response:
    """index.html with the app's root path filled in (so it also works behind a path prefix)."""
    page = (ASSETS / "index.html").read_text(encoding="utf-8").replace("{{ROOT}}", html.escape(_root(request)))
    return Response(page, media_type="text/html; charset=utf-8",
                    headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})


async def create_from_config(request: Request) -> Response:
    """RunRL's shareable link `/runs/create?config=<uuid>` -> the dashboard's new-run form."""
    config = request.query_params.get("config", "")
    target = f"{_root(request)}/#/new" + (f"?config={quote(config, safe='')}" if config else "")
    return RedirectResponse(target, status_code=302, headers=SECURITY_HEADERS)


def routes() -> list[BaseRoute]:
    return [Route("/", index, methods=["GET", "HEAD"]),
            Route("/runs/create", create_from_config, methods=["GET", "HEAD"]),
            Mount("/static", app=SecurityHeaders(StaticFiles(directory=STATIC, follow_symlink=False)),
                  name="dashboard")]
