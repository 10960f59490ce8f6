"""The OpenAPI 3.1 document of the REST service, built from the route table, and `GET /api/v1/openapi.json`.

Every route is declared once, where it is mounted: `api(path, handler, methods, scope, summary=..., query=[...],
body=..., returns=..., status=..., errors=(...))` (server/routes/__init__.py) attaches an `Operation` to the
route's endpoint, and `build(routes)` walks the routes the app really mounts, so the schema cannot list a route
that does not exist or miss one that does (tests/server/test_openapi.py also checks the query parameters and
body fields each handler reads against its declaration).

What each operation gets without being told: its path parameters (named in the path; their schemas are
`PATH_PARAMS`), the Bearer security requirement and its scope (`x-required-scope`), the success envelope
`{success: true, data, message?}` around `returns`, and the error envelope for the statuses every route can
answer: 401 (no or bad key), 429 (hourly quota, or too many failed authentications), 413 (every request body is
capped, server/hygiene.py), 403 where a scope is needed, 404 where a path names a resource, 400 and 422 where a
JSON body is read, 422 where query parameters are checked; `errors` adds the rest (503, ...). Data shapes are
named components (`COMPONENTS`: Run, File, ApiKey, ...). Links from each create operation to the operations
on the resource it made are derived from `RESOURCES`, so a client (or Schemathesis' stateful phase) can follow
a new id.

`GET /api/v1/openapi.json` is public: the document names routes and shapes, no data and nothing secret, and
tools (Schemathesis, code generators, the dashboard) read it before they hold a key. Sending a key is
allowed and counts against its quota like any request. Not covered: the response headers (`X-RateLimit-*`,
`Retry-After`) are described in text only; the body of the deployment proxy routes is the model server's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from server.errors import INT64_MAX, EnvelopeJSON

JSON = dict[str, Any]
OPENAPI_VERSION = "3.1.0"


# ---- schema helpers (JSON Schema 2020-12, as OpenAPI 3.1 uses it) -----------------------------------------

def string(**kw: Any) -> JSON:
    return {"type": "string", **kw}


def integer(lo: int | None = None, hi: int | None = None, **kw: Any) -> JSON:
    out: JSON = {"type": "integer", **kw}
    if lo is not None:
        out["minimum"] = lo
    if hi is not None:
        out["maximum"] = hi
    return out


def number(**kw: Any) -> JSON:
    return {"type": "number", **kw}


def boolean(**kw: Any) -> JSON:
    return {"type": "boolean", **kw}


def array(items: JSON, **kw: Any) -> JSON:
    return {"type": "array", "items": items, **kw}


def enum(values: Iterable[str], **kw: Any) -> JSON:
    return {"type": "string", "enum": list(values), **kw}


def obj(properties: JSON | None = None, required: Iterable[str] = (), **kw: Any) -> JSON:
    """An object; other properties are allowed unless `additionalProperties=False` is passed."""
    out: JSON = {"type": "object", "properties": properties or {}, **kw}
    if required:
        out["required"] = list(required)
    return out


def ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: JSON) -> JSON:
    if "$ref" in schema or "type" not in schema or "enum" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return {**schema, "type": [*kinds, "null"]}


ANY: JSON = {}
STAMP = string(description="UTC time, ISO 8601 (2026-01-31T12:00:00Z)")
NSTAMP = nullable(STAMP)
NSTR = nullable(string())
NINT = nullable(integer())


def page_of(item: JSON) -> JSON:
    """`data` of a paged list (spec §1.4)."""
    return obj({"items": array(item), "pagination": ref("Pagination")}, ["items", "pagination"])


# ---- declarations ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """A query parameter."""

    name: str
    schema: JSON
    description: str = ""
    required: bool = False


@dataclass(frozen=True)
class Body:
    """A request body: `json` (an object schema) and/or `multipart` (a form schema)."""

    json: JSON | None = None
    multipart: JSON | None = None
    required: bool = True


@dataclass(frozen=True)
class Operation:
    """What `api()` records for the schema: the scope it enforces and what the handler reads and answers."""

    scope: str
    summary: str = ""
    query: tuple[Param, ...] = ()
    body: Body | None = None
    returns: JSON | None = None  # schema of `data` in the success envelope
    status: int = 200
    errors: tuple[int, ...] = ()
    media: JSON | None = None  # a success that is not the envelope: media type -> schema
    description: str = ""


def query_int(name: str, default: int | None, lo: int | None = None, hi: int | None = None,
              description: str = "") -> Param:
    extra = {} if default is None else {"default": default}
    return Param(name, integer(lo, INT64_MAX if hi is None else hi, **extra), description)


def query_bool(name: str, default: bool = False, description: str = "") -> Param:
    return Param(name, boolean(default=default), description + " (true/false, 1/0, yes/no)".lstrip())


def query_str(name: str, description: str = "", **kw: Any) -> Param:
    return Param(name, string(**kw), description)


# Path parameters, by name: every `{name}` in a mounted path must be here (the builder refuses one that is not).
PATH_PARAMS: dict[str, JSON] = {
    "run_id": integer(1, INT64_MAX, description="A run id"),
    "key_id": integer(1, INT64_MAX, description="An API key id"),
    "tool_id": integer(1, INT64_MAX, description="A tool id"),
    "deployment_id": integer(1, INT64_MAX, description="A deployment id"),
    "webhook_id": integer(1, INT64_MAX, description="A webhook id"),
    "file_id": string(format="uuid", description="A file id (UUID)"),
    "uuid": string(format="uuid", description="A shared configuration's uuid"),
}

# Resources a create operation returns (component -> path parameter, JSON pointer of the id in the response),
# from which the builder links each create operation to the operations on that resource.
RESOURCES = {
    "Run": ("run_id", "/data/id"),
    "File": ("file_id", "/data/id"),
    "Tool": ("tool_id", "/data/id"),
    "ApiKeyCreated": ("key_id", "/data/api_key/id"),
    "Deployment": ("deployment_id", "/data/id"),
    "SharedConfiguration": ("uuid", "/data/uuid"),
    "SharedConfigurationCopy": ("uuid", "/data/uuid"),
    "WebhookCreated": ("webhook_id", "/data/id"),
}


# ---- components --------------------------------------------------------------------------------------------

FILE_TYPES = ("prompt", "reward_function", "environment", "sft")
RUN_STATUSES = ("PENDING", "SETTING_UP", "RUNNING", "COMPLETED", "FAILED", "CANCELLED")
FILE_REF = obj({"id": string(), "name": NSTR, "type": nullable(enum(FILE_TYPES)), "deleted": boolean()},
               ["id", "name", "type", "deleted"])
TOOL_REF = obj({"id": integer(), "name": NSTR, "mcp_url": NSTR, "description": NSTR}, ["id", "name", "mcp_url"])

COMPONENTS: dict[str, JSON] = {
    "Error": obj({
        "success": {"const": False}, "error": string(description="bad_request, unauthorized, forbidden, "
                                                                 "not_found, validation_error, ..."),
        "message": string(description="What went wrong, with the first reason of `details`"),
        "details": {"description": "Field -> reason, or other specifics (retry_after, ...)"},
        "retry_after": integer(description="On a 429: seconds to wait"), "reset_time": string()},
        ["success", "error", "message"]),
    "Pagination": obj({"current_page": integer(1), "per_page": integer(1), "total": integer(0),
                       "last_page": integer(1)}, ["current_page", "per_page", "total", "last_page"]),
    "Health": obj({"status": enum(["ok"]), "version": string(), "queue": obj(additionalProperties=integer()),
                   "slots": integer()}, ["status", "version", "queue", "slots"]),
    "ApiKey": obj({
        "id": integer(), "name": string(), "scopes": array(enum(["read", "write", "admin"])),
        "masked_key": string(), "active": boolean(), "requests_per_hour": integer(),
        "remaining_requests": integer(), "total_requests": integer(), "created_at": STAMP,
        "expires_at": NSTAMP, "last_used_at": NSTAMP},
        ["id", "name", "scopes", "masked_key", "active", "requests_per_hour", "remaining_requests",
         "total_requests", "created_at", "expires_at", "last_used_at"]),
    "ApiKeyCreated": obj({"api_key": ref("ApiKey"), "token": string(description="Shown once"),
                          "warning": string()}, ["api_key", "token", "warning"]),
    "ApiKeyUsage": obj({
        "key_id": integer(), "requests_per_hour": integer(), "requests_this_hour": integer(),
        "remaining_requests": integer(), "reset": integer(description="Unix time the hourly window resets"),
        "total_requests": integer(), "last_used_at": NSTAMP, "active": boolean()},
        ["key_id", "requests_per_hour", "requests_this_hour", "remaining_requests", "reset", "total_requests",
         "active"]),
    "FileRef": FILE_REF,
    "File": obj({
        "id": string(format="uuid"), "name": string(), "original_filename": NSTR, "type": enum(FILE_TYPES),
        "file_size": integer(0), "file_size_human": string(), "mime_type": string(), "created_at": STAMP,
        "updated_at": STAMP, "download_url": string(), "content_url": string(), "preview_url": string()},
        ["id", "name", "original_filename", "type", "file_size", "file_size_human", "mime_type", "created_at",
         "updated_at", "download_url", "content_url", "preview_url"]),
    "FilePreview": obj({
        "file_id": string(), "type": enum(FILE_TYPES),
        "lines": array(ANY, description="Parsed JSON lines (prompt, sft) or text lines (code)"),
        "content": string(), "total_lines": integer(0), "preview_lines": integer(0), "truncated": boolean()},
        ["file_id", "type", "lines", "content", "total_lines", "preview_lines", "truncated"]),
    "FileContent": obj({"file_id": string(), "content": string(), "lines": integer(0), "size": integer(0)},
                       ["file_id", "content", "lines", "size"]),
    "FileDeleted": obj({"id": string(), "deleted": {"const": True}, "purged": boolean()},
                       ["id", "deleted", "purged"]),
    "Deleted": obj({"id": integer(), "deleted": {"const": True}}, ["id", "deleted"]),
    "ValidationReport": obj({
        "valid": boolean(), "error": NSTR, "errors": array(ANY), "warnings": array(ANY),
        "details": nullable(obj())}, ["valid", "error"],
        description="Problems in the user's input are `valid: false` here (HTTP 200), not an HTTP error"),
    "Run": obj({
        "id": integer(), "status": enum(RUN_STATUSES), "type": enum(["reward_function", "environment"]),
        "model": string(), "parameters": obj(description="The creation parameters, RunRL's defaults filled in"),
        "uses_tools": boolean(), "progress": number(minimum=0, maximum=1), "current_step": NINT,
        "total_steps": NINT, "created_at": STAMP, "updated_at": STAMP, "started_at": NSTAMP,
        "completed_at": NSTAMP, "error_message": NSTR, "wandb_url": NSTR,
        "hf_name": nullable(string(description="The Hub repo the model is on: the requested one while the run is "
                                               "active, afterwards only if the push succeeded")),
        "hf_push": nullable(obj({
            "repo_id": string(), "status": enum(["pending", "pushed", "failed", "skipped"]), "url": NSTR,
            "endpoint": NSTR, "error": NSTR, "at": NSTAMP}, ["repo_id", "status", "url", "endpoint", "error", "at"],
            description="The push of final/ to the Hugging Face Hub (null without hf_name)")),
        "prompt_file": nullable(ref("FileRef")), "reward_file": nullable(ref("FileRef")),
        "sft_file": nullable(ref("FileRef")), "tools": array(TOOL_REF), "billing_start_time": NSTAMP,
        "billing_end_time": NSTAMP, "duration_seconds": NINT,
        "devices": nullable(array(string(), description="The GPUs the run holds, or last held once it ended: its "
                                                        "CUDA_VISIBLE_DEVICES (null: placed on no GPU)"))},
        ["id", "status", "type", "model", "parameters", "uses_tools", "progress", "current_step", "total_steps",
         "created_at", "updated_at", "started_at", "completed_at", "error_message", "wandb_url", "hf_name",
         "hf_push", "prompt_file", "reward_file", "sft_file", "tools"]),
    "RunHistory": obj({"run_id": integer(), "history": array(obj(
        {"status": string(), "message": NSTR, "timestamp": STAMP}, ["status", "timestamp"]))},
        ["run_id", "history"]),
    "RunLogs": obj({"run_id": integer(), "status": enum(RUN_STATUSES), "lines": array(string()),
                    "last_line": integer(0), "total_lines": integer(0), "has_more": boolean()},
                   ["run_id", "status", "lines", "last_line", "total_lines", "has_more"]),
    "RunMetrics": obj({
        "run_id": integer(), "status": enum(RUN_STATUSES), "total_steps": NINT,
        "history": array(obj(description="One metrics.jsonl record, plus `_step`")),
        "steps": array(obj()), "summary": obj(description="The last record"), "keys": array(string())},
        ["run_id", "status", "total_steps", "history", "steps", "summary", "keys"]),
    "RunCompletions": obj({
        "run_id": integer(), "status": enum(RUN_STATUSES),
        "steps": array(obj({"step": integer(), "samples": array(obj(description="One completions.jsonl record"))},
                           ["step", "samples"])),
        "total_samples": integer(0)}, ["run_id", "status", "steps", "total_samples"]),
    "Tool": obj({
        "id": integer(), "name": string(), "description": NSTR, "mcp_url": string(), "owner_user_id": integer(),
        "is_public": boolean(), "verified": boolean(), "usage_count": integer(0), "created_at": STAMP,
        "updated_at": STAMP},
        ["id", "name", "description", "mcp_url", "owner_user_id", "is_public", "verified", "usage_count"]),
    "McpHandshake": obj({
        "ok": boolean(), "server_info": nullable(obj({"name": NSTR, "version": NSTR})),
        "protocol_version": NSTR, "transport": nullable(enum(["streamable-http", "sse"])),
        "tools": array(obj({"name": string(), "description": NSTR, "inputSchema": obj()})),
        "latency_ms": nullable(number()), "error": NSTR},
        ["ok", "server_info", "protocol_version", "transport", "tools", "latency_ms", "error"]),
    "SharedConfiguration": obj({
        "uuid": string(format="uuid"), "name": string(), "description": NSTR,
        "visibility": enum(["public", "unlisted", "private"]), "configuration": obj(), "shareable_url": string(),
        "stats": obj({"likes": integer(0), "copies": integer(0)}, ["likes", "copies"]),
        "creator": nullable(obj({"id": integer(), "name": NSTR})), "is_owner": boolean(), "liked": boolean(),
        "files": obj({k: nullable(ref("FileRef")) for k in ("prompt_file", "reward_file", "sft_file")}),
        "prompt_file_id": NSTR, "reward_file_id": NSTR, "sft_file_id": NSTR, "created_at": STAMP,
        "updated_at": STAMP},
        ["uuid", "name", "description", "visibility", "configuration", "shareable_url", "stats", "creator",
         "is_owner", "liked", "files"]),
    "SharedConfigurationData": obj({
        "uuid": string(), "configuration": obj(), "prompt_preview": nullable(ref("FilePreview")),
        "sft_preview": nullable(ref("FilePreview")), "reward_code": NSTR, "reward_code_truncated": boolean()},
        ["uuid", "configuration", "prompt_preview", "sft_preview", "reward_code"]),
    "SharedConfigurationCopy": obj({
        "uuid": string(format="uuid"), "source_uuid": string(), "configuration": obj(), "prompt_file_id": NSTR,
        "reward_file_id": NSTR, "sft_file_id": NSTR},
        ["uuid", "source_uuid", "configuration", "prompt_file_id", "reward_file_id", "sft_file_id"]),
    "SharedConfigurationLike": obj({"uuid": string(), "liked": boolean(), "likes": integer(0)},
                                   ["uuid", "liked", "likes"]),
    "SharedConfigurationDeleted": obj({"uuid": string(), "deleted": {"const": True}}, ["uuid", "deleted"]),
    "Webhook": obj({"id": integer(), "url": string(), "events": array(string()), "created_at": STAMP,
                    "updated_at": STAMP}, ["id", "url", "events", "created_at", "updated_at"]),
    "WebhookCreated": {"allOf": [ref("Webhook"), obj(
        {"secret": string(description="Shown once"), "warning": string()}, ["secret", "warning"])]},
    "WebhookDelivery": obj({
        "id": integer(), "webhook_id": integer(), "delivery_id": string(), "event": string(),
        "attempt": integer(1), "status_code": NINT, "success": boolean(), "error": NSTR,
        "duration_ms": nullable(number()), "retrying": boolean(), "delivered_at": STAMP},
        ["id", "webhook_id", "delivery_id", "event", "attempt", "status_code", "success", "error", "duration_ms",
         "retrying", "delivered_at"]),
    "DeploymentFields": obj({
        "id": integer(), "run_id": integer(), "base_model": string(),
        "api_url": string(description="`{base}/api/v1/deployments/{id}` while active, else \"\""),
        "status": enum(["pending", "active", "failed", "deleted"]), "error_message": NSTR,
        "created_at": STAMP, "updated_at": STAMP,
        "run": nullable(obj({"id": integer(), "status": string(), "model": string(), "hf_name": NSTR}))},
        ["id", "run_id", "base_model", "api_url", "status", "created_at", "updated_at", "run"]),
    "Deployment": {"allOf": [ref("DeploymentFields"), obj(
        {"deployment": ref("DeploymentFields")}, ["deployment"],
        description="`deployment` repeats the fields for SDK 0.2.0, which read `data.deployment`")]},
    "DeploymentCheck": obj({
        "run_id": integer(), "deployable": boolean(), "can_deploy": boolean(), "reasons": array(string()),
        "base_model": string(), "model_path_exists": boolean()},
        ["run_id", "deployable", "can_deploy", "reasons", "base_model", "model_path_exists"]),
    "SearchResults": obj({"query": string(), "runs": array(ref("Run")), "files": array(ref("File")),
                          "tools": array(ref("Tool"))}, ["query", "runs", "files", "tools"]),
}


# ---- the builder -------------------------------------------------------------------------------------------

ERROR_TEXT = {400: "Malformed request body", 401: "Missing, malformed, unknown, inactive or expired API key",
              403: "The key lacks the scope, or the caller does not own the resource",
              404: "No such resource for this key's user", 405: "Method not allowed",
              409: "Conflict", 413: "Request body over the cap",
              422: "Validation failed (`details` names the field)",
              429: "Hourly quota used up, too many failed authentications, or too many validations at once",
              503: "Temporarily unavailable (`Retry-After` where known)"}
_PATH_PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")


def api_routes(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, Route]]:
    """(full path, route) for every `Route` in `routes`, Mounts followed."""
    for route in routes:
        if isinstance(route, Mount):
            yield from api_routes(route.routes or [], prefix + route.path)
        elif isinstance(route, Route):
            yield prefix + route.path, route


def operation_of(route: Route) -> Operation | None:
    return getattr(route.endpoint, "operation", None)


def route_methods(route: Route) -> list[str]:
    return sorted(m for m in (route.methods or ()) if m != "HEAD")


def _envelope(data: JSON | None) -> JSON:
    return obj({"success": {"const": True}, "data": ANY if data is None else data, "message": string()},
               ["success", "data"])


def _error_codes(path: str, op: Operation) -> list[int]:
    if op.scope == "public":
        return sorted({401, 413, 429, *op.errors})  # a bad key is refused before any route, a good one counted
    codes = {401, 413, 429, *op.errors}
    if op.scope != "any":
        codes.add(403)
    if _PATH_PARAM.search(path):
        codes.add(404)
    if op.body is not None:
        codes |= {400, 422}
    if op.query:
        codes.add(422)
    return sorted(codes)


def _parameters(path: str, op: Operation) -> list[JSON]:
    out = []
    for name in _PATH_PARAM.findall(path):
        if name not in PATH_PARAMS:
            raise ValueError(f"path parameter {{{name}}} of {path} has no schema in server.openapi.PATH_PARAMS")
        out.append({"name": name, "in": "path", "required": True, "schema": PATH_PARAMS[name]})
    for p in op.query:
        item: JSON = {"name": p.name, "in": "query", "required": p.required, "schema": p.schema}
        if p.description:
            item["description"] = p.description
        out.append(item)
    return out


def _request_body(body: Body) -> JSON:
    content: JSON = {}
    if body.json is not None:
        content["application/json"] = {"schema": body.json}
    if body.multipart is not None:
        content["multipart/form-data"] = {"schema": body.multipart}
    return {"required": body.required, "content": content}


def _returned_component(op: Operation) -> str | None:
    name = (op.returns or {}).get("$ref", "").rsplit("/", 1)[-1]
    return name if name in RESOURCES else None


def _operation_id(route: Route, method: str) -> str:
    module = getattr(route.endpoint, "__module__", "").rsplit(".", 1)[-1]
    return f"{module}.{route.endpoint.__name__}.{method.lower()}"


def _operation(path: str, route: Route, method: str, op: Operation) -> JSON:
    out: JSON = {"operationId": _operation_id(route, method), "tags": [path.strip("/").split("/")[0]]}
    if op.summary:
        out["summary"] = op.summary
    scope_text = {"public": "No key needed.", "any": "Any valid key."}.get(op.scope, f"Scope: `{op.scope}`.")
    out["description"] = " ".join(filter(None, [op.description, scope_text]))
    if op.scope == "public":
        out["security"] = [{}, {"bearer": []}]
    else:
        out["x-required-scope"] = op.scope
    params = _parameters(path, op)
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = _request_body(op.body)
    if op.media is not None:
        success: JSON = {"description": "OK", "content": {m: {"schema": s} for m, s in op.media.items()}}
    else:
        success = {"description": op.summary or "OK",
                   "content": {"application/json": {"schema": _envelope(op.returns)}}}
    out["responses"] = {str(op.status): success}
    for code in _error_codes(path, op):
        out["responses"][str(code)] = {"description": ERROR_TEXT.get(code, "Error"),
                                       "content": {"application/json": {"schema": ref("Error")}}}
    return out


def _links(paths: JSON, ops: list[tuple[str, str, Operation]]) -> None:
    """Link each create operation to the operations on the resource it returns (by its path parameter)."""
    for path, method, op in ops:
        component = _returned_component(op)
        if component is None or method != "POST" or op.status != 201:
            continue
        param, pointer = RESOURCES[component]
        links = {}
        for other_path, other_method, _ in ops:
            if "{" + param + "}" in other_path and "{" in other_path.replace("{" + param + "}", ""):
                continue  # needs another id too
            if "{" + param + "}" in other_path:
                target = paths[other_path][other_method.lower()]["operationId"]
                links[target.replace(".", "_")] = {"operationId": target,
                                                   "parameters": {param: f"$response.body#{pointer}"}}
        if links:
            paths[path][method.lower()]["responses"]["201"]["links"] = links


def build(routes: Iterable[BaseRoute], *, title: str = "runrl-engine REST API", version: str = "",
          server_url: str = "/api/v1", api_prefix: str = "/api/v1") -> JSON:
    """The OpenAPI document of every route mounted under `api_prefix` in `routes` (paths relative to it)."""
    paths: JSON = {}
    ops: list[tuple[str, str, Operation]] = []
    for full, route in api_routes(routes):
        if not full.startswith(api_prefix + "/"):
            continue  # the dashboard and other non-API routes
        path = full[len(api_prefix):]
        op = operation_of(route) or Operation(scope="any", description="Undeclared route (no `api()` spec).")
        for method in route_methods(route):
            paths.setdefault(path, {})[method.lower()] = _operation(path, route, method, op)
            ops.append((path, method, op))
    _links(paths, ops)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version,
                 "description": "RunRL's REST API, self-hosted (spec: docs.runrl.com). Every response is an "
                                "envelope: `{success: true, data, message?}` or `{success: false, error, "
                                "message, details?}`. Responses to an authenticated request carry "
                                "`X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset`."},
        "servers": [{"url": server_url}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"schemas": COMPONENTS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "rl_<8 chars>_<32 chars>",
                       "description": "An API key: `Authorization: Bearer rl_...`"}}},
    }


# ---- the route ---------------------------------------------------------------------------------------------

async def openapi_json(request: Request) -> Response:
    """The document, built once per app from the routes it mounts."""
    import runrl_engine

    state = request.app.state
    doc = getattr(state, "openapi", None)
    if doc is None:
        doc = state.openapi = build(request.app.routes, version=runrl_engine.__version__)
    return EnvelopeJSON(doc)


openapi_json.operation = Operation(  # type: ignore[attr-defined]
    scope="public", summary="This OpenAPI document", media={"application/json": obj(
        {"openapi": string(), "paths": obj()}, ["openapi", "info", "paths"])})


def route(api_prefix: str = "/api/v1") -> Route:
    """`GET {api_prefix}/openapi.json`, mounted next to (not inside) the API's Mount: it needs no key."""
    return Route(f"{api_prefix}/openapi.json", openapi_json, methods=["GET"])
