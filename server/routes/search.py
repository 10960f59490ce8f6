"""`GET /search?q=`: the caller's runs (by id, model, status, type) and files (by name), and the tools they
can see (by name or description). Each list holds at most `limit` (default 10) matches, newest first."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from server.auth import Principal
from server.errors import ApiError, ok
from server.openapi import Param, query_int, ref, string
from server.routes import api, int_param, services
from server.routes.files import file_object
from server.routes.runs import run_objects
from server.routes.tools import tool_object


async def search(request: Request, p: Principal) -> Response:
    svc = services(request)
    q = (request.query_params.get("q") or "").strip()
    if not q:
        raise ApiError(422, "Validation failed", details={"q": "is required"})
    limit = int_param(request, "limit", 10, lo=1, hi=100)
    runs = svc.store.runs.search(p.user_id, q, limit)  # type: ignore[arg-type]  (int_param has a default)
    files = svc.store.files.search(p.user_id, q, limit)  # type: ignore[arg-type]
    tools = svc.store.tools.search(p.user_id, q, limit)  # type: ignore[arg-type]
    return ok({"query": q, "runs": run_objects(svc, runs),
               "files": [file_object(f, request) for f in files], "tools": [tool_object(t) for t in tools]})


ROUTES = [api("/search", search, ["GET"], "read", summary="Your runs and files, and the tools you see, matching q",
              returns=ref("SearchResults"), query=[Param("q", string(minLength=1), "the text", required=True),
                                                   query_int("limit", 10, 1, 100, "per list")])]
