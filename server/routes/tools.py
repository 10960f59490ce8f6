"""`/tools`: MCP tool registrations (CRUD; name unique per owner; listings show public tools plus the
caller's own) and `POST /tools/test-mcp`, a real MCP handshake (initialize + tools/list through the official
`mcp` client, streamable HTTP or SSE by URL path) done by `runrl_engine.tools.mcp_client.handshake_async`.

Outbound destinations (`runrl_engine.netpolicy`, from the settings `allow_private_destinations` and
`allowed_destinations`): `mcp_url` is checked when a tool is registered or changed and before test-mcp
connects; a URL whose host resolves to a loopback, private, link-local or other non-public address the policy
does not allow is a 422 naming `mcp_url` and the setting that would allow it. A name that does not resolve
(yet) is accepted at registration: DNS is not the check that matters, the one at connect time is (test-mcp and
every run's trainer check the resolved address of each connection, so a name that later resolves to 127.0.0.1
is refused then). test-mcp never follows redirects and reports every other failure with one message, so it
does not tell a closed port from an open one.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from runrl_engine.netpolicy import DestinationDenied, DestinationPolicy, url_host_port
from server.auth import Principal
from server.errors import ApiError, not_found, ok, read_json
from server.openapi import Body, boolean, nullable, obj, page_of, query_bool, query_str, ref, string
from server.routes import PAGING, api, bool_param, field, paged, paging, path_id, services, sort_clause, sorting
from server.store import TOOL_SORTS, DuplicateName, now_iso



def tool_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "description": row["description"], "mcp_url": row["mcp_url"],
            "owner_user_id": row["user_id"], "is_public": bool(row["is_public"]), "verified": bool(row["verified"]),
            "usage_count": row["usage_count"], "created_at": row["created_at"], "updated_at": row["updated_at"]}


def check_url(value: Any) -> str:
    try:  # an http(s) scheme, a host, and a port (if any) in range
        ok_url = isinstance(value, str) and bool(url_host_port(value)[0])
    except ValueError:
        ok_url = False
    if not ok_url:
        raise ApiError(422, "Validation failed", details={"mcp_url": "must be an http(s) URL, e.g. https://host/mcp"})
    return value


SERVER_HINT = ("the server operator can allow it with the setting allowed_destinations (an entry host:port, host, "
               "IP or CIDR, e.g. `runrl serve --allow-destination 127.0.0.1:8765`) or allow_private_destinations")


@lru_cache(maxsize=8)
def _policy_for(allow_private: bool, allowed: tuple[str, ...]) -> DestinationPolicy:
    return DestinationPolicy(allow_private=allow_private, allowed=allowed, hint=SERVER_HINT)


def destination_policy(request: Request) -> DestinationPolicy:
    """The operator's outbound policy (settings allow_private_destinations, allowed_destinations)."""
    settings = services(request).settings
    return _policy_for(settings.allow_private_destinations, tuple(settings.allowed_destinations))


async def check_destination(request: Request, url: str) -> str:
    """422 naming `mcp_url` when the URL's host resolves to an address the policy refuses; else `url`."""
    try:
        await destination_policy(request).check_url(url)
    except DestinationDenied as exc:
        raise ApiError(422, "Destination not allowed", details={"mcp_url": str(exc)}) from None
    return url


def visible_tool(request: Request, p: Principal) -> dict[str, Any]:
    tool_id = path_id(request, "tool_id")
    row = None if tool_id is None else services(request).store.tools.visible(tool_id, p.user_id)
    if row is None:
        raise not_found("Tool")
    return row


def _owned(request: Request, p: Principal, *, admin_ok: bool = False) -> dict[str, Any]:
    row = visible_tool(request, p)
    if row["user_id"] != p.user_id and not (admin_ok and "admin" in p.scopes):
        raise ApiError(403, "Only the tool's owner can change it")
    return row


def _name(body: dict[str, Any]) -> str:
    name = field(body, "name", str, required=True).strip()
    if len(name) > 255:
        raise ApiError(422, "Validation failed", details={"name": "at most 255 characters"})
    return name


def _duplicate(name: str) -> ApiError:
    return ApiError(422, f"You already have a tool named {name!r}", details={"name": "must be unique per owner"})


async def list_tools(request: Request, p: Principal) -> Response:
    svc = services(request)
    page, per_page = paging(request)
    owned_only, public_only = bool_param(request, "owned_only"), bool_param(request, "public_only")
    verified = bool_param(request, "verified") if request.query_params.get("verified") else None
    rows, total = svc.store.tools.list(p.user_id, owned_only=owned_only, public_only=public_only, verified=verified,
                                       search=request.query_params.get("search"),
                                       sort=sort_clause(request, TOOL_SORTS, "created_at"), page=page,
                                       per_page=per_page)
    return ok(paged([tool_object(r) for r in rows], page, per_page, total))


async def create(request: Request, p: Principal) -> Response:
    svc = services(request)
    body = await read_json(request)
    name = _name(body)
    now = now_iso()
    values = {"user_id": p.user_id, "name": name, "description": field(body, "description", str),
              "mcp_url": await check_destination(request, check_url(body.get("mcp_url"))), "is_public": int(field(body, "is_public", bool, default=False)),
              "created_at": now, "updated_at": now}
    try:
        tool_id = svc.store.tools.create(values)
    except DuplicateName:
        raise _duplicate(name) from None
    return ok(tool_object(svc.store.tools.get(tool_id)), message="Tool created", status=201)  # type: ignore[arg-type]


async def retrieve(request: Request, p: Principal) -> Response:
    return ok(tool_object(visible_tool(request, p)))


async def update(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = _owned(request, p)
    body = await read_json(request)
    values: dict[str, Any] = {}
    if "name" in body:
        values["name"] = _name(body)
    if "description" in body:
        values["description"] = field(body, "description", str)
    if "is_public" in body:
        values["is_public"] = int(field(body, "is_public", bool, required=True))
    if "mcp_url" in body:
        values["mcp_url"] = await check_destination(request, check_url(body["mcp_url"]))
    if values:
        values["updated_at"] = now_iso()
        try:
            svc.store.tools.update(row["id"], values)
        except DuplicateName:
            raise _duplicate(values["name"]) from None
    return ok(tool_object(svc.store.tools.get(row["id"])), message="Tool updated")  # type: ignore[arg-type]


async def delete(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = _owned(request, p, admin_ok=True)
    svc.store.tools.delete(row["id"])
    return ok({"id": row["id"], "deleted": True}, message="Tool deleted")


async def test_mcp(request: Request, p: Principal) -> Response:
    from runrl_engine.tools.mcp_client import handshake_async

    body = await read_json(request)
    url = await check_destination(request, check_url(body.get("mcp_url")))
    return ok(await handshake_async(url, policy=destination_policy(request)))


URL = string(description="An http(s) MCP endpoint, e.g. https://host/mcp (SSE when the path ends in /sse)")
TOOL_FIELDS = {"name": string(minLength=1, maxLength=255), "mcp_url": URL, "description": nullable(string()),
               "is_public": boolean()}
ROUTES = [
    api("/tools", list_tools, ["GET"], "read", summary="Public tools and your own", returns=page_of(ref("Tool")),
        query=[*PAGING, *sorting(TOOL_SORTS, "created_at"), query_bool("owned_only"), query_bool("public_only"),
               query_bool("verified"), query_str("search", "in the name or description")]),
    api("/tools", create, ["POST"], "write", summary="Register an MCP tool", body=Body(obj(TOOL_FIELDS,
        ["name", "mcp_url"])), returns=ref("Tool"), status=201),
    api("/tools/test-mcp", test_mcp, ["POST"], "write", summary="An MCP handshake with a URL (initialize + "
        "tools/list)", body=Body(obj({"mcp_url": URL}, ["mcp_url"])), returns=ref("McpHandshake")),
    api("/tools/{tool_id}", retrieve, ["GET"], "read", summary="A tool", returns=ref("Tool")),
    api("/tools/{tool_id}", update, ["PUT"], "write", summary="Change your tool", body=Body(obj(TOOL_FIELDS)),
        returns=ref("Tool")),
    api("/tools/{tool_id}", delete, ["DELETE"], "write", summary="Remove your tool (or any, with admin)",
        returns=ref("Deleted")),
]
