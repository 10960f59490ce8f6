"""`GET /health`: liveness plus queue counts (any valid key, any scope)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

import runrl_engine
from server.auth import Principal
from server.errors import ok
from server.routes import api, services


async def health(request: Request, p: Principal) -> Response:
    svc = services(request)
    counts = {r["status"]: r["n"] for r in svc.store.all("SELECT status, COUNT(*) AS n FROM runs "
                                                            "WHERE status IN ('PENDING','SETTING_UP','RUNNING') "
                                                            "GROUP BY status")}
    return ok({"status": "ok", "version": runrl_engine.__version__, "queue": counts,
               "slots": svc.settings.slots})


ROUTES = [api("/health", health, ["GET"], "any")]
