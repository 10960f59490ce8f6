"""`/shared-configurations`: saved run recipes (configuration dict + prompt/reward/SFT file references).

Visibility: `public` and `unlisted` (both listed by browse, which filters by `visibility`, `model` and
`reward_mode`, and readable by every key; spec §1.7 "Discover public/unlisted configs" and §1.14's visibility
filter, while §5 calls unlisted "reachable via link": this follows the endpoint's own description), `private`
(owner only; anyone else gets 404). A recipe may reference the caller's own files,
or files of another user that a public/unlisted recipe shares; those are copied into the caller's account
when saved. `copy` clones a readable recipe and its files into the caller's account and returns the new ids.
Saving and copying are one transaction with the file copies they make: a failed request leaves no copy behind.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from server.auth import Principal
from server.errors import ApiError, not_found, ok, read_json
from server.openapi import Body, Param, array, enum, nullable, obj, page_of, query_str, ref, string
from server.routes import PAGING, api, field, paged, paging, services
from server.routes.files import (StagedFiles, file_path, file_ref, new_file_row, preview_of, read_text,
                                 staged_files)
from server.services import Services
from server.store import now_iso

VISIBILITIES = ("public", "unlisted", "private")
LISTED = ("public", "unlisted")  # what browse lists (spec §1.7: "Discover public/unlisted configs")
FILE_KEYS = (("prompt_file_id", "prompt", ("prompt",)), ("reward_file_id", "reward", ("reward_function", "environment")),
             ("sft_file_id", "sft", ("sft",)))
CODE_SNIPPET_LINES = 60


def config_object(svc: Services, row: dict[str, Any], p: Principal, base: str) -> dict[str, Any]:
    likes = svc.store.shared.likes(row["uuid"])
    liked = svc.store.shared.liked(row["uuid"], p.user_id)
    creator = svc.store.users.public(row["user_id"])
    files = {}
    for key, short, _ in FILE_KEYS:
        ref = svc.store.files.get_any(row[key]) if row[key] else None
        files[f"{short}_file"] = file_ref(ref)
    return {"uuid": row["uuid"], "name": row["name"], "description": row["description"],
            "visibility": row["visibility"], "configuration": row["configuration"],
            "shareable_url": f"{base}/runs/create?config={row['uuid']}",
            "stats": {"likes": likes, "copies": row["copies"]}, "creator": creator,
            "is_owner": row["user_id"] == p.user_id, "liked": liked, "files": files,
            "prompt_file_id": row["prompt_file_id"], "reward_file_id": row["reward_file_id"],
            "sft_file_id": row["sft_file_id"], "created_at": row["created_at"], "updated_at": row["updated_at"]}


def _base(request: Request) -> str:
    return (services(request).settings.public_url or str(request.base_url)).rstrip("/")


def readable(request: Request, p: Principal) -> dict[str, Any]:
    row = services(request).store.shared.get(request.path_params["uuid"])
    if row is None or (row["user_id"] != p.user_id and row["visibility"] == "private"):
        raise not_found("Shared configuration")
    return row


def _owned(request: Request, p: Principal) -> dict[str, Any]:
    row = readable(request, p)
    if row["user_id"] != p.user_id:
        raise ApiError(403, "Only the configuration's owner can change it")
    return row


def _copy_row(svc: Services, stage: StagedFiles, row: dict[str, Any], user_id: int) -> dict[str, Any]:
    """The row of a copy of file `row` for `user_id`, its bytes staged; insert it in the transaction."""
    data = file_path(svc, row).read_bytes()
    return new_file_row(stage, user_id, row["name"], row["type"], data, row["original_filename"], row["mime_type"])


def _resolve_file(svc: Services, p: Principal, key: str, types: tuple[str, ...], file_id: Any) -> dict[str, Any] | None:
    """The caller's own file, or a file another user shares through a readable recipe (to be copied)."""
    if file_id in (None, ""):
        return None
    if not isinstance(file_id, str):
        raise ApiError(422, "Validation failed", details={key: "must be a file id"})
    row = svc.store.files.get(file_id)
    shared = row is not None and (row["user_id"] == p.user_id or svc.store.shared.shares_file(key, file_id))
    if not shared:
        raise ApiError(422, "Validation failed", details={key: f"file {file_id} not found"})
    if row["type"] not in types:
        raise ApiError(422, "Validation failed", details={key: f"file has type {row['type']!r}; expected {types[0]}"})
    return row


def _visibility(value: Any) -> str:
    if value not in VISIBILITIES:
        raise ApiError(422, "Validation failed", details={"visibility": f"one of {list(VISIBILITIES)}"})
    return value


async def create(request: Request, p: Principal) -> Response:
    svc = services(request)
    body = await read_json(request)
    name = field(body, "name", str, required=True).strip()
    values = {"uuid": str(uuidlib.uuid4()), "user_id": p.user_id, "name": name,
              "description": field(body, "description", str),
              "visibility": _visibility(body.get("visibility", "private")),
              "configuration": field(body, "configuration", dict, default={})}
    resolved = {key: _resolve_file(svc, p, key, types, body.get(key)) for key, _, types in FILE_KEYS}
    values["created_at"] = values["updated_at"] = now_iso()
    with staged_files(svc) as stage:  # every check is done: copy the other users' files, then one transaction
        copies = []
        for key, f in resolved.items():
            if f is not None and f["user_id"] != p.user_id:
                copies.append(_copy_row(svc, stage, f, p.user_id))
                f = copies[-1]
            values[key] = f["id"] if f else None
        with svc.store.tx():
            for copied in copies:
                svc.store.files.insert(copied)
            svc.store.shared.insert(values)
            stage.commit()
    row = svc.store.shared.get(values["uuid"])
    return ok(config_object(svc, row, p, _base(request)), message="Configuration saved", status=201)  # type: ignore[arg-type]


async def list_own(request: Request, p: Principal) -> Response:
    svc = services(request)
    rows = svc.store.shared.of_user(p.user_id)
    return ok([config_object(svc, r, p, _base(request)) for r in rows])


async def browse(request: Request, p: Principal) -> Response:
    svc = services(request)
    page, per_page = paging(request)
    visibility = request.query_params.get("visibility")
    if visibility and visibility not in LISTED:
        raise ApiError(422, "Invalid query parameter visibility", details={
            "visibility": f"one of {list(LISTED)} (private configurations are listed only by their owner's "
                          "GET /shared-configurations)"})
    rows, total = svc.store.shared.browse(
        [visibility] if visibility else list(LISTED), model=request.query_params.get("model"),
        reward_mode=request.query_params.get("reward_mode") or request.query_params.get("type"),
        search=request.query_params.get("search") or request.query_params.get("q"), page=page, per_page=per_page)
    return ok(paged([config_object(svc, r, p, _base(request)) for r in rows], page, per_page, total))


async def retrieve(request: Request, p: Principal) -> Response:
    return ok(config_object(services(request), readable(request, p), p, _base(request)))


async def data(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = readable(request, p)
    out: dict[str, Any] = {"uuid": row["uuid"], "configuration": row["configuration"]}
    for key, short, _ in FILE_KEYS:
        f = svc.store.files.get(row[key]) if row[key] else None
        if f is None:
            out[f"{short}_preview" if short != "reward" else "reward_code"] = None
        elif short == "reward":
            lines = read_text(svc, f).splitlines()
            out["reward_code"] = "\n".join(lines[:CODE_SNIPPET_LINES])
            out["reward_code_truncated"] = len(lines) > CODE_SNIPPET_LINES
        else:
            out[f"{short}_preview"] = preview_of(svc, f, 5)
    return ok(out)


async def copy(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = readable(request, p)
    new = {"uuid": str(uuidlib.uuid4()), "user_id": p.user_id, "name": row["name"],
           "description": row["description"], "visibility": "private", "configuration": row["configuration"]}
    new["created_at"] = new["updated_at"] = now_iso()
    with staged_files(svc) as stage:
        copies = []
        for key, _, _ in FILE_KEYS:
            f = svc.store.files.get(row[key]) if row[key] else None
            if f:
                copies.append(_copy_row(svc, stage, f, p.user_id))
            new[key] = copies[-1]["id"] if f else None
        with svc.store.tx():
            for copied in copies:
                svc.store.files.insert(copied)
            svc.store.shared.insert(new)
            svc.store.shared.count_copy(row["uuid"])
            stage.commit()
    return ok({"uuid": new["uuid"], "source_uuid": row["uuid"], "configuration": new["configuration"],
               "prompt_file_id": new["prompt_file_id"], "reward_file_id": new["reward_file_id"],
               "sft_file_id": new["sft_file_id"]}, message="Configuration copied", status=201)


async def like(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = readable(request, p)
    liked = svc.store.shared.toggle_like(row["uuid"], p.user_id)
    return ok({"uuid": row["uuid"], "liked": liked, "likes": svc.store.shared.likes(row["uuid"])})


async def update(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = _owned(request, p)
    body = await read_json(request)
    values: dict[str, Any] = {}
    if "name" in body:
        values["name"] = field(body, "name", str, required=True).strip()
    if "description" in body:
        values["description"] = field(body, "description", str)
    if "visibility" in body:
        values["visibility"] = _visibility(body["visibility"])
    if "configuration" in body:
        values["configuration"] = field(body, "configuration", dict, required=True)
    if values:
        values["updated_at"] = now_iso()
        svc.store.shared.update(row["uuid"], values)
    row = svc.store.shared.get(row["uuid"])
    return ok(config_object(svc, row, p, _base(request)), message="Configuration updated")  # type: ignore[arg-type]


async def delete(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = _owned(request, p)
    svc.store.shared.delete(row["uuid"])
    return ok({"uuid": row["uuid"], "deleted": True}, message="Configuration deleted")


FIELDS = {"name": string(minLength=1), "description": nullable(string()), "visibility": enum(VISIBILITIES),
          "configuration": obj(description="The run recipe (model, type, completion_length, ...)")}
FILE_IDS = {key: nullable(string(description=f"Your {short} file, or one a readable configuration shares "
                                             "(copied into your account)")) for key, short, _ in FILE_KEYS}
ONE = ref("SharedConfiguration")
ROUTES = [
    api("/shared-configurations", list_own, ["GET"], "read", summary="Your configurations", returns=array(ONE)),
    api("/shared-configurations", create, ["POST"], "write", summary="Save a run recipe", returns=ONE, status=201,
        body=Body(obj({**FIELDS, **FILE_IDS}, ["name"]))),
    api("/shared-configurations/browse", browse, ["GET"], "read", summary="Public and unlisted configurations",
        returns=page_of(ONE), query=[*PAGING, query_str("model"), query_str("reward_mode"),
                                     Param("visibility", enum(LISTED), "only this visibility (default: both)"),
                                     query_str("type", "alias of reward_mode"), query_str("search"),
                                     query_str("q", "alias of search")]),
    api("/shared-configurations/{uuid}", retrieve, ["GET"], "read", summary="A configuration", returns=ONE),
    api("/shared-configurations/{uuid}", update, ["PUT"], "write", summary="Change your configuration",
        body=Body(obj(FIELDS)), returns=ONE),
    api("/shared-configurations/{uuid}", delete, ["DELETE"], "write", summary="Delete your configuration",
        returns=ref("SharedConfigurationDeleted")),
    api("/shared-configurations/{uuid}/data", data, ["GET"], "read", summary="Prompt preview and reward code",
        returns=ref("SharedConfigurationData"), errors=(422,)),
    api("/shared-configurations/{uuid}/copy", copy, ["POST"], "write", summary="Copy into your account",
        returns=ref("SharedConfigurationCopy"), status=201),
    api("/shared-configurations/{uuid}/like", like, ["POST"], "write", summary="Toggle your like",
        returns=ref("SharedConfigurationLike")),
]
