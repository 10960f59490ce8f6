"""`GET /health`: liveness plus queue counts (any valid key, any scope).

The counts are of the caller's own queued and running runs; an `admin` key sees everyone's. `slots` is the
server's number of concurrent runs (not per user)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

import runrl_engine
from server.auth import Principal
from server.errors import ok
from server.openapi import ref
from server.routes import api, services


async def health(request: Request, p: Principal) -> Response:
    svc = services(request)
    counts = svc.store.runs.active_counts(None if "admin" in p.scopes else p.user_id)
    return ok({"status": "ok", "version": runrl_engine.__version__, "queue": counts,
               "slots": svc.settings.slots})


ROUTES = [api("/health", health, ["GET"], "any", summary="Liveness and queue counts", returns=ref("Health"))]
