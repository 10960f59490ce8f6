"""`/keys`: create, list (bare array), update, delete, usage — only the caller's own keys.

No key gains privilege through these routes: a new key holds only scopes its creator holds, a quota of at most
the creator's own (default min(10 000, the creator's)) and, when the creator expires, an expiry no later than
the creator's (default: the same). On update, only an `admin` key raises a quota, reactivates an inactive key or
extends (or removes) an expiry; any `write` key may lower, deactivate, rename or delete its user's keys, and set
scopes it holds itself. A refusal is a 403 naming the field."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from server import auth
from server.auth import Principal
from server.errors import ApiError, not_found, ok, read_json
from server.openapi import Body, array, boolean, enum, integer, nullable, obj, ref, string
from server.routes import api, field, parse_id, services
from server.services import Services

WARNING = "Store this token safely. You will not be able to see it again."


def key_object(row: dict[str, Any], svc: Services) -> dict[str, Any]:
    used, _ = svc.limiter.used(row["id"])
    return {"id": row["id"], "name": row["name"], "scopes": row["scopes"], "masked_key": auth.masked(row),
            "active": bool(row["active"]), "requests_per_hour": row["requests_per_hour"],
            "remaining_requests": max(0, row["requests_per_hour"] - used),
            "total_requests": row["total_requests"] + svc.limiter.unflushed(row["id"]),
            "created_at": row["created_at"], "expires_at": row["expires_at"], "last_used_at": row["last_used_at"]}


def _own_key(svc: Services, key_id: str, p: Principal) -> dict[str, Any]:
    numeric = parse_id(key_id)
    row = None if numeric is None else svc.store.keys.get(numeric, p.user_id)
    if row is None:
        raise not_found("API key")
    return row


def _rate(body: dict[str, Any]) -> int | None:
    value = field(body, "requests_per_hour", int)
    if value is not None and not 1 <= value <= 10_000_000:
        raise ApiError(422, "Validation failed", details={"requests_per_hour": "must be between 1 and 10000000"})
    return value


def _caller(svc: Services, p: Principal) -> dict[str, Any]:
    row = svc.store.keys.get(p.key_id)
    if row is None:
        raise ApiError(401, "Invalid API key")  # deleted since it authenticated
    return row


def _later(a: str | None, b: str | None) -> bool:
    """Whether expiry `a` is later than expiry `b` (None: never expires)."""
    if b is None:
        return False
    if a is None:
        return True
    return datetime.fromisoformat(a.replace("Z", "+00:00")) > datetime.fromisoformat(b.replace("Z", "+00:00"))


def _refuse(field_name: str, why: str) -> ApiError:
    return ApiError(403, f"Not allowed: {why}", details={field_name: why})


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
    caller, admin = _caller(svc, p), p.allows("admin")
    rate = _rate(body)
    if rate is None:
        rate = min(auth.DEFAULT_REQUESTS_PER_HOUR, caller["requests_per_hour"])
    elif rate > caller["requests_per_hour"] and not admin:
        raise _refuse("requests_per_hour", f"at most {caller['requests_per_hour']}, this key's own quota; "
                                           "only an admin key grants more")
    expires = auth.parse_expiry(body.get("expires_at"))
    if caller["expires_at"] and not admin:
        if "expires_at" not in body:
            expires = caller["expires_at"]
        elif _later(expires, caller["expires_at"]):
            raise _refuse("expires_at", f"at most {caller['expires_at']}, when this key expires; "
                                        "only an admin key grants later")
    row, token = auth.create_key(svc.store, p.user_id, name, scopes, rate, expires)
    return ok({"api_key": key_object(row, svc), "token": token, "warning": WARNING},
              message="API key created", status=201)


async def list_keys(request: Request, p: Principal) -> Response:
    svc = services(request)
    rows = svc.store.keys.of_user(p.user_id)
    return ok([key_object(r, svc) for r in rows])


async def update(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = _own_key(svc, request.path_params["key_id"], p)
    body = await read_json(request)
    admin = p.allows("admin")
    values: dict[str, Any] = {}
    if "name" in body:
        values["name"] = field(body, "name", str, required=True).strip()
    if "active" in body:
        values["active"] = int(field(body, "active", bool, required=True))
        if values["active"] and not row["active"] and not admin:
            raise _refuse("active", "only an admin key reactivates an inactive key")
    if "scopes" in body:
        values["scopes"] = auth.check_scopes(body["scopes"])
        _no_escalation(p, values["scopes"])
    if "requests_per_hour" in body:
        values["requests_per_hour"] = _rate(body) or row["requests_per_hour"]
        if values["requests_per_hour"] > row["requests_per_hour"] and not admin:
            raise _refuse("requests_per_hour", f"only an admin key raises a quota (now {row['requests_per_hour']})")
    if "expires_at" in body:
        values["expires_at"] = auth.parse_expiry(body["expires_at"])
        if _later(values["expires_at"], row["expires_at"]) and not admin:
            raise _refuse("expires_at", "only an admin key extends or removes an expiry")
    if values:
        svc.store.keys.update(row["id"], values)
        svc.auth.invalidate()
    return ok(key_object(svc.store.keys.get(row["id"]), svc),  # type: ignore[arg-type]  (_own_key found it)
              message="API key updated")


async def delete(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = _own_key(svc, request.path_params["key_id"], p)
    svc.store.keys.delete(row["id"])
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


KEY_FIELDS = {"name": string(minLength=1), "scopes": array(enum(auth.SCOPES), minItems=1),
              "requests_per_hour": integer(1, 10_000_000),
              "expires_at": nullable(string(description="ISO date or datetime; null: never"))}
ROUTES = [
    api("/keys", create, ["POST"], "write", summary="Create an API key (its token is shown once)",
        body=Body(obj(KEY_FIELDS, ["name"])), returns=ref("ApiKeyCreated"), status=201),
    api("/keys", list_keys, ["GET"], "read", summary="List your API keys", returns=array(ref("ApiKey"))),
    api("/keys/{key_id}", update, ["PUT"], "write", summary="Rename, toggle, rescope or re-limit a key",
        body=Body(obj({**KEY_FIELDS, "active": boolean()})), returns=ref("ApiKey")),
    api("/keys/{key_id}", delete, ["DELETE"], "write", summary="Delete a key", returns=ref("Deleted")),
    api("/keys/{key_id}/usage", usage, ["GET"], "read", summary="A key's usage", returns=ref("ApiKeyUsage")),
]
