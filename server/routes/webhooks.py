"""`/webhooks`: a user's webhooks (create and delete need `write`; list, detail and deliveries `read`), and
`GET /webhooks/{id}/deliveries`, one row per delivery attempt, newest first. Only the caller's own webhooks
exist for them: another user's are 404 and never listed.

A webhook is a URL, the events it wants (server/webhooks.py `EVENTS`; an unknown one is a 422 naming it) and a
secret (given, 16 to 256 characters, or generated); the secret is shown once, in the create response, and never
again. The URL must be http(s) and pass the operator's destination policy (settings `allow_private_destinations`,
`allowed_destinations`, as for MCP URLs): a host that resolves to a loopback, private, link-local or other
non-public address the policy does not allow is a 422 naming `url` and the setting. A name that does not resolve
yet is accepted; every delivery checks the address it connects to (server/webhooks.py). Sending is not here.
"""

from __future__ import annotations

import secrets as pysecrets
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from runrl_engine.netpolicy import DestinationDenied, url_host_port
from server.auth import Principal
from server.errors import ApiError, check_text, not_found, ok, read_json
from server.openapi import Body, array, enum, obj, page_of, ref, string
from server.routes import PAGING, api, field, paged, paging, path_id, services
from server.routes.tools import destination_policy
from server.store import now_iso
from server.webhooks import EVENTS

MAX_URL = 2048
SECRET_LENGTH = (16, 256)
WARNING = "Store this secret safely. You will not be able to see it again."


def webhook_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "url": row["url"], "events": row["events"], "created_at": row["created_at"],
            "updated_at": row["updated_at"]}


def delivery_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "webhook_id": row["webhook_id"], "delivery_id": row["delivery_id"],
            "event": row["event"], "attempt": row["attempt"], "status_code": row["status_code"],
            "success": bool(row["success"]), "error": row["error"], "duration_ms": row["duration_ms"],
            "retrying": bool(row["retrying"]), "delivered_at": row["delivered_at"]}


def _url(body: dict[str, Any]) -> str:
    url = check_text(field(body, "url", str, required=True).strip(), "url")
    try:
        url_host_port(url)
        good = len(url) <= MAX_URL
    except ValueError:
        good = False
    if not good:
        raise ApiError(422, "Validation failed",
                       details={"url": f"must be an http(s) URL with a host, at most {MAX_URL} characters, "
                                       "e.g. https://example.com/hooks/runrl"})
    return url


def _events(body: dict[str, Any]) -> list[str]:
    events = field(body, "events", list, required=True)
    if not events:
        raise ApiError(422, "Validation failed", details={"events": f"must name at least one of {list(EVENTS)}"})
    for event in events:
        if not isinstance(event, str) or event not in EVENTS:
            raise ApiError(422, "Validation failed",
                           details={"events": f"unknown event {event!r}; one of {list(EVENTS)}"})
    return list(dict.fromkeys(events))


def _secret(body: dict[str, Any]) -> str:
    secret = field(body, "secret", str)
    if secret is None:
        return "whsec_" + pysecrets.token_urlsafe(32)
    lo, hi = SECRET_LENGTH
    if not lo <= len(secret) <= hi or not secret.isprintable() or secret != secret.strip():
        raise ApiError(422, "Validation failed",
                       details={"secret": f"must be {lo} to {hi} printable characters without surrounding spaces "
                                          "(or leave it out and the server generates one)"})
    return secret


def _owned(request: Request, p: Principal) -> dict[str, Any]:
    webhook_id = path_id(request, "webhook_id")
    row = None if webhook_id is None else services(request).store.webhooks.get(webhook_id, p.user_id)
    if row is None:
        raise not_found("Webhook")
    return row


async def create(request: Request, p: Principal) -> Response:
    svc = services(request)
    body = await read_json(request)
    url, events, secret = _url(body), _events(body), _secret(body)
    limit = svc.settings.max_webhooks_per_user
    if svc.store.webhooks.count(p.user_id) >= limit:
        raise ApiError(422, f"At most {limit} webhooks per user; delete one first",
                       details={"max_webhooks_per_user": f"at most {limit} webhooks per user"})
    try:
        await destination_policy(request).check_url(url)
    except DestinationDenied as exc:
        raise ApiError(422, "Destination not allowed", details={"url": str(exc)}) from None
    now = now_iso()
    webhook_id = svc.store.webhooks.create({"user_id": p.user_id, "url": url, "events": events, "secret": secret,
                                            "created_at": now, "updated_at": now})
    row = svc.store.webhooks.get(webhook_id)
    return ok({**webhook_object(row), "secret": secret, "warning": WARNING}, message="Webhook created", status=201)


async def list_webhooks(request: Request, p: Principal) -> Response:
    svc = services(request)
    page, per_page = paging(request)
    rows, total = svc.store.webhooks.list(p.user_id, page=page, per_page=per_page)
    return ok(paged([webhook_object(r) for r in rows], page, per_page, total))


async def retrieve(request: Request, p: Principal) -> Response:
    return ok(webhook_object(_owned(request, p)))


async def delete(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = _owned(request, p)
    svc.store.webhooks.delete(row["id"])
    return ok({"id": row["id"], "deleted": True}, message="Webhook deleted")


async def deliveries(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = _owned(request, p)
    page, per_page = paging(request)
    rows, total = svc.store.webhooks.deliveries(row["id"], page=page, per_page=per_page)
    return ok(paged([delivery_object(r) for r in rows], page, per_page, total))


CREATE_BODY = obj({"url": string(maxLength=MAX_URL, description="An http(s) URL"),
                   "events": array(enum(EVENTS), minItems=1),
                   "secret": string(minLength=SECRET_LENGTH[0], maxLength=SECRET_LENGTH[1],
                                    description="Leave it out and the server generates one")}, ["url", "events"])
ROUTES = [
    api("/webhooks", list_webhooks, ["GET"], "read", summary="Your webhooks", query=PAGING,
        returns=page_of(ref("Webhook"))),
    api("/webhooks", create, ["POST"], "write", summary="Register a webhook (its secret is shown once)",
        body=Body(CREATE_BODY), returns=ref("WebhookCreated"), status=201),
    api("/webhooks/{webhook_id}", retrieve, ["GET"], "read", summary="A webhook", returns=ref("Webhook")),
    api("/webhooks/{webhook_id}", delete, ["DELETE"], "write", summary="Delete a webhook and its deliveries",
        returns=ref("Deleted")),
    api("/webhooks/{webhook_id}/deliveries", deliveries, ["GET"], "read", summary="Delivery attempts, newest first",
        query=PAGING, returns=page_of(ref("WebhookDelivery"))),
]
