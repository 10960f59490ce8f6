"""`/deployments`: check, create (pending -> active | failed), list, detail, delete (soft; stops the model
server), and the inference proxy `POST /deployments/{id}/v1/chat/completions` (= `{api_url}/v1/chat/...`).
Every deployment endpoint needs the `write` scope (spec §1.7). The proxy reaches the owner's model server on
loopback with that deployment's secret (server/deploy.py); the caller's API key is not forwarded. A streamed
answer (`text/event-stream`) is passed through with a keepalive (an empty line) between events after
`sse_keepalive_s` without a byte (a request waiting for the model server, server/sse.py)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.auth import Principal
from server.errors import ApiError, not_found, ok, read_json
from server.hub_push import hub_fields
from server.openapi import Body, array, integer, obj, page_of, query_str, ref, string
from server.routes import PAGING, api, paged, paging, path_id, services
from server.services import Services
from server.sse import with_keepalives
from server.store import now_iso

LIVE = ("pending", "active")


def _base(request: Request) -> str:
    return (services(request).settings.public_url or str(request.base_url)).rstrip("/")


def deployment_object(svc: Services, row: dict[str, Any], base: str) -> dict[str, Any]:
    run = svc.store.runs.get(row["run_id"])
    obj = {"id": row["id"], "run_id": row["run_id"], "base_model": row["base_model"],
           "api_url": f"{base}/api/v1/deployments/{row['id']}" if row["status"] == "active" else "",
           "status": row["status"], "error_message": row["error_message"], "created_at": row["created_at"],
           "updated_at": row["updated_at"],
           "run": {"id": run["id"], "status": run["status"], "model": run["model"],  # hf_name as on the Run
                   "hf_name": hub_fields(svc.settings.runs_dir / str(run["id"]), run["status"], run["hf_name"])[0]}
           if run else None}
    return {**obj, "deployment": dict(obj)}  # SDK 0.2.0 read `data.deployment`; 0.2.1+ reads `data`


def _checks(svc: Services, p: Principal, run_id: Any) -> tuple[dict[str, Any] | None, list[str]]:
    if isinstance(run_id, bool) or not isinstance(run_id, int):
        raise ApiError(422, "Validation failed", details={"run_id": "is required (an integer run id)"})
    run = svc.store.runs.get(run_id, p.user_id)
    if run is None:
        raise not_found("Run")
    reasons = []
    if run["status"] != "COMPLETED":
        reasons.append(f"run {run_id} is {run['status']}; only COMPLETED runs can be deployed")
    elif not svc.deployments.has_model(run_id):
        reasons.append(f"run {run_id} has no final model (final/ holds neither config.json nor adapter_config.json)")
    live = svc.store.deployments.live_for_run(run_id)
    if live:
        reasons.append(f"run {run_id} is already deployed (deployment {live['id']})")
    return run, reasons


async def check(request: Request, p: Principal) -> Response:
    svc = services(request)
    body = await read_json(request)
    run, reasons = _checks(svc, p, body.get("run_id"))
    return ok({"run_id": run["id"], "deployable": not reasons, "can_deploy": not reasons, "reasons": reasons,
               "base_model": run["model"], "model_path_exists": svc.deployments.has_model(run["id"])})


async def create(request: Request, p: Principal) -> Response:
    svc = services(request)
    body = await read_json(request)
    run, reasons = _checks(svc, p, body.get("run_id"))
    if reasons:
        raise ApiError(422, reasons[0], details={"run_id": "; ".join(reasons)})
    now = now_iso()
    dep_id = svc.store.deployments.create({"user_id": p.user_id, "run_id": run["id"], "base_model": run["model"],
                                           "status": "pending", "created_at": now, "updated_at": now})
    svc.deployments.start(dep_id)
    row = svc.store.deployments.get(dep_id)
    return ok(deployment_object(svc, row, _base(request)), message="Deployment started", status=201)


def _owned(request: Request, p: Principal) -> dict[str, Any]:
    dep_id = path_id(request, "deployment_id")
    row = None if dep_id is None else services(request).store.deployments.get(dep_id, p.user_id)
    if row is None:
        raise not_found("Deployment")
    return row


async def list_deployments(request: Request, p: Principal) -> Response:
    svc = services(request)
    page, per_page = paging(request)
    rows, total = svc.store.deployments.list(p.user_id, status=request.query_params.get("status"), page=page,
                                             per_page=per_page)
    return ok(paged([deployment_object(svc, r, _base(request)) for r in rows], page, per_page, total))


async def retrieve(request: Request, p: Principal) -> Response:
    return ok(deployment_object(services(request), _owned(request, p), _base(request)))


async def delete(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = _owned(request, p)
    if row["status"] != "deleted":
        svc.deployments.stop(row["id"])
    row = svc.store.deployments.get(row["id"])
    return ok(deployment_object(svc, row, _base(request)), message="Deployment deleted")


async def _send_unless_gone(request: Request, client: httpx.AsyncClient,
                            upstream_req: httpx.Request) -> httpx.Response | None:
    """`client.send(upstream_req)`, or None when the caller disconnects before the model server answers (a plain
    completion answers only once complete): the send is then cancelled, which closes its connection, and the model
    server drops that request's rows from its batch. A streamed answer's disconnect is StreamingResponse's."""
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    send, watch = asyncio.ensure_future(client.send(upstream_req, stream=True)), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({send, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not send.done():
            send.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await send
    return None if send.cancelled() else send.result()


async def _proxy(request: Request, p: Principal, method: str, path: str) -> Response:
    """Forward to the deployment's model server, streaming the answer back unchanged."""
    row = _owned(request, p)
    if row["status"] != "active":
        raise ApiError(422, f"Deployment {row['id']} is {row['status']}, not active",
                       details={"status": row["status"]})
    token = services(request).deployments.token(row["id"])
    if token is None:
        raise ApiError(503, f"Deployment {row['id']} has no running model server in this process; retry shortly")
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{row['port']}", timeout=httpx.Timeout(600, connect=5))
    upstream_req = client.build_request(method, path, content=await request.body(),
                                        headers={"Content-Type": "application/json",
                                                 "Authorization": f"Bearer {token}"})
    try:
        upstream = await _send_unless_gone(request, client, upstream_req)
    except httpx.HTTPError as exc:
        await client.aclose()
        raise ApiError(503, f"The model server is not reachable: {exc}") from None
    if upstream is None:  # the caller hung up first: the closed connection stops the model server's generation
        await client.aclose()
        return Response(status_code=499)
    if upstream.status_code == 401:  # not our model server (the port was reused) or a stale secret
        await upstream.aclose()
        await client.aclose()
        raise ApiError(503, "The model server refused the proxy's credential; retry shortly")

    async def body() -> AsyncIterator[bytes]:
        async for chunk in upstream.aiter_raw():
            yield chunk

    content_type = upstream.headers.get("content-type", "application/json")
    stream = body()
    if content_type.startswith("text/event-stream"):  # streamed chat: keepalives while the model is silent
        stream = with_keepalives(stream, services(request).settings.sse_keepalive_s)

    async def close() -> None:
        await upstream.aclose()
        await client.aclose()

    return StreamingResponse(stream, status_code=upstream.status_code, media_type=content_type,
                             background=BackgroundTask(close))


async def chat_completions(request: Request, p: Principal) -> Response:
    return await _proxy(request, p, "POST", "/v1/chat/completions")


async def models(request: Request, p: Principal) -> Response:
    return await _proxy(request, p, "GET", "/v1/models")


RUN_ID = Body(obj({"run_id": integer(1)}, ["run_id"]))
CHAT = obj({"messages": array(obj({"role": string(), "content": {}})), "model": string(), "stream": {}},
           ["messages"], description="An OpenAI chat-completions request, passed to the model server as is")
PROXIED = dict(errors=(503,), description="The model server's answer is passed through: its status, its "
                                          "media type (JSON, or text/event-stream when streaming) and its body.",
               media={"application/json": obj(), "text/event-stream": string()})
ROUTES = [
    api("/deployments", list_deployments, ["GET"], "write", summary="Your deployments",
        returns=page_of(ref("Deployment")), query=[*PAGING, query_str("status", "pending, active or failed")]),
    api("/deployments", create, ["POST"], "write", summary="Deploy a completed run", body=RUN_ID,
        returns=ref("Deployment"), status=201, errors=(404,)),
    api("/deployments/check", check, ["POST"], "write", summary="Whether a run can be deployed", body=RUN_ID,
        returns=ref("DeploymentCheck"), errors=(404,)),
    api("/deployments/{deployment_id}", retrieve, ["GET"], "write", summary="A deployment",
        returns=ref("Deployment")),
    api("/deployments/{deployment_id}", delete, ["DELETE"], "write", summary="Stop and delete a deployment",
        returns=ref("Deployment")),
    api("/deployments/{deployment_id}/v1/chat/completions", chat_completions, ["POST"], "write",
        summary="OpenAI-compatible chat completions", body=Body(CHAT), **PROXIED),
    api("/deployments/{deployment_id}/v1/models", models, ["GET"], "write", summary="The served model",
        **{**PROXIED, "errors": (422, 503)}),
]
