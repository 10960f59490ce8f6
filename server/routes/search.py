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
from server.routes.runs import RUN_COLUMNS, run_objects
from server.routes.tools import tool_object


async def search(request: Request, p: Principal) -> Response:
    svc = services(request)
    q = (request.query_params.get("q") or "").strip()
    if not q:
        raise ApiError(422, "Validation failed", details={"q": "is required"})
    limit = int_param(request, "limit", 10, lo=1, hi=100)
    like = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    runs = svc.store.all(f"SELECT {RUN_COLUMNS} FROM runs WHERE user_id = ? AND (CAST(id AS TEXT) = ? OR model LIKE ? ESCAPE '\\' "
                         "OR status LIKE ? ESCAPE '\\' OR type LIKE ? ESCAPE '\\') ORDER BY id DESC LIMIT ?",
                         (p.user_id, q, like, like, like, limit))
    files = svc.store.all("SELECT * FROM files WHERE user_id = ? AND deleted_at IS NULL AND (name LIKE ? ESCAPE '\\' "
                          "OR original_filename LIKE ? ESCAPE '\\') ORDER BY created_at DESC LIMIT ?",
                          (p.user_id, like, like, limit))
    tools = svc.store.all("SELECT * FROM tools WHERE (user_id = ? OR is_public = 1) AND (name LIKE ? ESCAPE '\\' "
                          "OR description LIKE ? ESCAPE '\\') ORDER BY created_at DESC LIMIT ?",
                          (p.user_id, like, like, limit))
    return ok({"query": q, "runs": run_objects(svc, runs),
               "files": [file_object(f, request) for f in files], "tools": [tool_object(t) for t in tools]})


ROUTES = [api("/search", search, ["GET"], "read", summary="Your runs and files, and the tools you see, matching q",
              returns=ref("SearchResults"), query=[Param("q", string(minLength=1), "the text", required=True),
                                                   query_int("limit", 10, 1, 100, "per list")])]
