"""`/keys`: create, list (bare array), update, delete, usage — only the caller's own keys."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from server import auth
from server.auth import Principal
from server.errors import ApiError, not_found, ok, read_json
from server.routes import api, field, services

WARNING = "Store this token safely. You will not be able to see it again."


def key_object(row: dict[str, Any], svc: Any) -> dict[str, Any]:
    used, _ = svc.limiter.used(row["id"])
    return {"id": row["id"], "name": row["name"], "scopes": row["scopes"], "masked_key": auth.masked(row),
            "active": bool(row["active"]), "requests_per_hour": row["requests_per_hour"],
            "remaining_requests": max(0, row["requests_per_hour"] - used),
            "total_requests": row["total_requests"] + svc.limiter.unflushed(row["id"]),
            "created_at": row["created_at"], "expires_at": row["expires_at"], "last_used_at": row["last_used_at"]}


def _own_key(svc: Any, key_id: str, p: Principal) -> dict[str, Any]:
    row = svc.store.one("SELECT * FROM api_keys WHERE id = ? AND user_id = ?",
                        (int(key_id) if key_id.isdigit() else -1, p.user_id))
    if row is None:
        raise not_found("API key")
    return row


def _rate(body: dict[str, Any]) -> int | None:
    value = field(body, "requests_per_hour", int)
    if value is not None and not 1 <= value <= 10_000_000:
        raise ApiError(422, "Validation failed", details={"requests_per_hour": "must be between 1 and 10000000"})
    return value


def _no_escalation(p: Principal, scopes: list[str]) -> None:
    extra = [s for s in scopes if not p.allows(s)]
    if extra:
        raise ApiError(403, f"A key cannot grant scopes it does not hold: {extra}", details={"scopes": extra})


async def create(request: Request, p: Principal) -> Response:
    svc = services(request)
    body = await read_json(request)
    name = field(body, "name", str, required=True).strip()
    scopes = auth.check_scopes(body.get("scopes", ["read"]))
    _no_escalation(p, scopes)
    rate = _rate(body) or auth.DEFAULT_REQUESTS_PER_HOUR
    row, token = auth.create_key(svc.store, p.user_id, name, scopes, rate, auth.parse_expiry(body.get("expires_at")))
    return ok({"api_key": key_object(row, svc), "token": token, "warning": WARNING},
              message="API key created", status=201)


async def list_keys(request: Request, p: Principal) -> Response:
    svc = services(request)
    rows = svc.store.all("SELECT * FROM api_keys WHERE user_id = ? ORDER BY id", (p.user_id,))
    return ok([key_object(r, svc) for r in rows])


async def update(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = _own_key(svc, request.path_params["key_id"], p)
    body = await read_json(request)
    values: dict[str, Any] = {}
    if "name" in body:
        values["name"] = field(body, "name", str, required=True).strip()
    if "active" in body:
        values["active"] = int(field(body, "active", bool, required=True))
    if "scopes" in body:
        values["scopes"] = auth.check_scopes(body["scopes"])
        _no_escalation(p, values["scopes"])
    if "requests_per_hour" in body:
        values["requests_per_hour"] = _rate(body) or row["requests_per_hour"]
    if "expires_at" in body:
        values["expires_at"] = auth.parse_expiry(body["expires_at"])
    if values:
        svc.store.update("api_keys", "id", row["id"], values)
        svc.auth.invalidate()
    return ok(key_object(svc.store.one("SELECT * FROM api_keys WHERE id = ?", (row["id"],)), svc),
              message="API key updated")


async def delete(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = _own_key(svc, request.path_params["key_id"], p)
    svc.store.execute("DELETE FROM api_keys WHERE id = ?", (row["id"],))
    svc.auth.invalidate()
    return ok({"id": row["id"], "deleted": True}, message="API key deleted")


async def usage(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = _own_key(svc, request.path_params["key_id"], p)
    used, reset = svc.limiter.used(row["id"])
    return ok({"key_id": row["id"], "requests_per_hour": row["requests_per_hour"], "requests_this_hour": used,
               "remaining_requests": max(0, row["requests_per_hour"] - used), "reset": reset,
               "total_requests": row["total_requests"] + svc.limiter.unflushed(row["id"]),
               "last_used_at": row["last_used_at"], "active": bool(row["active"])})


ROUTES = [
    api("/keys", create, ["POST"], "write"),
    api("/keys", list_keys, ["GET"], "read"),
    api("/keys/{key_id}", update, ["PUT"], "write"),
    api("/keys/{key_id}", delete, ["DELETE"], "write"),
    api("/keys/{key_id}/usage", usage, ["GET"], "read"),
]
