"""Route helpers shared by the resource modules: scope guard, paging, typed body fields, numeric path ids.

Numbers from the URL are range-checked here: a path id is ASCII digits within SQLite's int64 (`parse_id`; anything
else is "not found"), and integer query parameters are bounded to int64 (`page` so that its OFFSET fits too).

Each resource module exposes `ROUTES`, a list of `api(...)` entries; `create_app` assembles them. Each entry
also declares what the OpenAPI document says of it (summary, query parameters, body, the `data` it returns,
extra error statuses; server/openapi.py builds the document from the mounted routes). `PAGING` and `sorting()`
declare the parameters `paging()` and `sort_clause()` read.
"""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable, Collection

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.auth import Principal
from server.errors import INT64_MAX, ApiError
from server.openapi import JSON, Body, Operation, Param, enum, query_int
from server.services import Services
from server.store import Sort

Handler = Callable[[Request, Principal], Awaitable[Response]]
MAX_PER_PAGE = 100


def api(path: str, handler: Handler, methods: list[str], scope: str, *, summary: str = "",
        query: list[Param] | tuple[Param, ...] = (), body: Body | None = None, returns: JSON | None = None,
        status: int = 200, errors: tuple[int, ...] = (), media: JSON | None = None, description: str = "") -> Route:
    """A route whose handler runs only for an authenticated key holding `scope` (`any`: any valid key).

    The keywords describe the route for the OpenAPI document (server/openapi.py `Operation`): `query` the query
    parameters the handler reads, `body` its request body, `returns` the schema of `data` in the success
    envelope (answered with `status`), `errors` the error statuses beyond those every route of its kind can
    answer, `media` a success response that is not the envelope (media type -> schema)."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        principal = request.scope.get("state", {}).get("principal")
        if principal is None:
            raise ApiError(401, "Missing API key: send `Authorization: Bearer rl_...`")
        if scope != "any" and not principal.allows(scope):
            raise ApiError(403, f"This API key lacks the `{scope}` scope", details={"required_scope": scope})
        return await handler(request, principal)

    endpoint.required_scope = scope  # type: ignore[attr-defined]  (read by the auth-matrix test)
    endpoint.operation = Operation(  # type: ignore[attr-defined]  (read by server/openapi.py)
        scope=scope, summary=summary, query=tuple(query), body=body, returns=returns, status=status,
        errors=tuple(errors), media=media, description=description)
    return Route(path, endpoint, methods=methods)


def services(request: Request) -> Services:
    """The app's services (server/services.py), typed."""
    services: Services = request.app.state.services
    return services


def parse_id(raw: str) -> int | None:
    """A numeric id from a URL: ASCII digits (not `²` or `٣`, which `str.isdigit` accepts) within SQLite's int64,
    else None, which the caller answers with a 404."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
        return None
    value = int(raw)
    return value if value <= INT64_MAX else None


def path_id(request: Request, name: str) -> int | None:
    return parse_id(request.path_params[name])


def int_param(request: Request, name: str, default: int | None, *, lo: int | None = None,
              hi: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, f"Invalid query parameter {name}", details={name: "must be an integer"}) from None
    hi = INT64_MAX if hi is None else hi
    if (lo is not None and value < lo) or value > hi:
        bounds = f"between {lo} and {hi}" if lo is not None else f"at most {hi}"
        raise ApiError(422, f"Invalid query parameter {name}", details={name: f"must be {bounds}"})
    return value


def bool_param(request: Request, name: str, default: bool = False) -> bool:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise ApiError(422, f"Invalid query parameter {name}", details={name: "must be true or false"})


def paging(request: Request) -> tuple[int, int]:
    page = int_param(request, "page", 1, lo=1, hi=INT64_MAX // MAX_PER_PAGE)  # its OFFSET fits in int64
    per_page = int_param(request, "per_page", 20, lo=1, hi=MAX_PER_PAGE)
    return page, per_page  # type: ignore[return-value]


PAGING = (query_int("page", 1, 1, INT64_MAX // MAX_PER_PAGE), query_int("per_page", 20, 1, MAX_PER_PAGE))


def sorting(allowed: Collection[str], default: str) -> tuple[Param, Param]:
    """The `sort`/`direction` parameters `sort_clause(request, allowed, default)` reads."""
    return (Param("sort", enum(sorted(allowed), default=default)),
            Param("direction", enum(["asc", "desc"], default="desc")))


def sort_clause(request: Request, allowed: Collection[str], default: str) -> Sort:
    """`sort`/`direction` query params -> a `Sort` whose key is one of `allowed` (a repository's sort keys, which
    it maps to columns: never raw user text)."""
    sort = request.query_params.get("sort") or default
    direction = (request.query_params.get("direction") or "desc").lower()
    if sort not in allowed:
        raise ApiError(422, "Invalid sort", details={"sort": f"one of {sorted(allowed)}"})
    if direction not in ("asc", "desc"):
        raise ApiError(422, "Invalid direction", details={"direction": "asc or desc"})
    return Sort(sort, direction == "desc")


def paged(items: list[Any], page: int, per_page: int, total: int) -> dict[str, Any]:
    last = max(1, -(-total // per_page))
    return {"items": items, "pagination": {"current_page": page, "per_page": per_page, "total": total,
                                           "last_page": last}}


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = False,
          default: Any = None) -> Any:
    """A typed body field; wrong type or missing required -> 422 naming the field."""
    if name not in body or body[name] is None:
        if required:
            raise ApiError(422, "Validation failed", details={name: "is required"})
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(422, "Validation failed", details={name: f"must be {_kind_name(kinds)}"})
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds):
        raise ApiError(422, "Validation failed", details={name: f"must be {_kind_name(kinds)}"})
    if isinstance(value, str) and required and not value.strip():
        raise ApiError(422, "Validation failed", details={name: "must not be empty"})
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
