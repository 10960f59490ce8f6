"""`/files`: upload (multipart) or create from JSON content, list, metadata, preview, content, download,
update (rename / replace code), delete (soft; `force=true` purges; refused while an active run uses it).

Bytes live at `files/<uuid>` under the data dir: a client-supplied name is only ever metadata, never a path.
Uploads over the cap are rejected before anything is stored (the request body itself is capped earlier, by
server/hygiene.py). Writes are transactional with their bytes (`StagedFiles`): bytes go to a temporary file
first and are renamed into place inside the database transaction that records them, so a request that fails
leaves no row and no file, and a failed `PUT` leaves the old content.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from server.auth import Principal
from server.errors import ApiError, check_text, not_found, ok, read_json
from server.openapi import Body, Param, enum, nullable, obj, page_of, query_bool, query_int, query_str, ref, string
from server.routes import PAGING, api, bool_param, field, int_param, paged, paging, services, sort_clause, sorting
from server.services import Services
from server.store import FILE_SORTS, now_iso

FILE_TYPES = ("prompt", "reward_function", "environment", "sft")
CODE_TYPES = ("reward_function", "environment")
MIME = {"prompt": "application/jsonl", "sft": "application/jsonl", "reward_function": "text/x-python",
        "environment": "text/x-python"}
MAX_NAME = 255


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}".replace(".0 ", " ")
        size /= 1024
    return f"{n} B"


def base_url(request: Request) -> str:
    configured = services(request).settings.public_url
    return (configured or str(request.base_url)).rstrip("/")


def file_object(row: dict[str, Any], request: Request) -> dict[str, Any]:
    base = f"{base_url(request)}/api/v1/files/{row['id']}"
    return {"id": row["id"], "name": row["name"], "original_filename": row["original_filename"],
            "type": row["type"], "file_size": row["file_size"], "file_size_human": human_size(row["file_size"]),
            "mime_type": row["mime_type"], "created_at": row["created_at"], "updated_at": row["updated_at"],
            "download_url": f"{base}/download", "content_url": f"{base}/content", "preview_url": f"{base}/preview"}


def file_ref(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """The short `{id, name, type}` form embedded in runs and shared configurations."""
    if row is None:
        return None
    return {"id": row["id"], "name": row["name"], "type": row["type"], "deleted": row.get("deleted_at") is not None}


def _check_type(value: Any) -> str:
    if value not in FILE_TYPES:
        raise ApiError(422, "Validation failed", details={"type": f"must be one of {list(FILE_TYPES)}"})
    return value


def _check_name(value: Any, fieldname: str = "name") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ApiError(422, "Validation failed", details={fieldname: "must be a non-empty string"})
    if len(value) > MAX_NAME:
        raise ApiError(422, "Validation failed", details={fieldname: f"at most {MAX_NAME} characters"})
    return value.strip()


def _too_large(svc: Services) -> ApiError:
    mb = svc.settings.max_upload_bytes / (1024 * 1024)
    return ApiError(422, f"File is too large: the limit is {mb:g} MB", details={"file": f"must be at most {mb:g} MB"})


class StagedFiles:
    """File bytes waiting for the database write that records them. `add` writes a temporary file in the files
    dir; `commit` (call it last inside `store.tx()`) renames each into place, so a commit failure rolls the rows
    back; whatever was not committed is removed by `staged_files` when its block ends."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._pending: list[tuple[Path, Path, bool]] = []  # (temporary, final, final is new)

    def add(self, storage: str, data: bytes) -> None:
        final = self.directory / storage
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{storage}.", suffix=".part")
        self._pending.append((Path(tmp), final, not final.exists()))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)

    def commit(self) -> None:
        moved: list[tuple[Path, bool]] = []
        try:
            for tmp, final, new in self._pending:
                os.replace(tmp, final)
                moved.append((final, new))
        except BaseException:
            for final, new in moved:
                if new:
                    final.unlink(missing_ok=True)
            raise
        self._pending.clear()

    def discard(self) -> None:
        for tmp, _, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending.clear()


@contextmanager
def staged_files(svc: Services) -> Iterator[StagedFiles]:
    stage = StagedFiles(svc.settings.files_dir)
    try:
        yield stage
    finally:
        stage.discard()


def new_file_row(stage: StagedFiles, user_id: int, name: str, ftype: str, data: bytes,
                 original_filename: str | None, mime: str | None = None) -> dict[str, Any]:
    """The row of a new file whose bytes are staged; insert it inside the transaction that commits `stage`."""
    file_id = str(uuid.uuid4())
    stage.add(file_id, data)
    now = now_iso()
    return {"id": file_id, "user_id": user_id, "name": name, "original_filename": original_filename, "type": ftype,
            "file_size": len(data), "mime_type": mime or MIME[ftype], "storage": file_id, "created_at": now,
            "updated_at": now}


def insert_file(svc: Services, user_id: int, name: str, ftype: str, data: bytes, original_filename: str | None,
                mime: str | None = None) -> dict[str, Any]:
    with staged_files(svc) as stage:
        row = new_file_row(stage, user_id, name, ftype, data, original_filename, mime)
        with svc.store.tx():
            svc.store.files.insert(row)
            stage.commit()
    return svc.store.files.get(row["id"])  # type: ignore[return-value]  (just inserted)


def file_path(svc: Services, row: dict[str, Any]) -> Path:
    return svc.settings.files_dir / row["storage"]


def owned_file(request: Request, p: Principal, file_id: str | None = None) -> dict[str, Any]:
    row = services(request).store.files.get(file_id or request.path_params["file_id"], p.user_id)
    if row is None:
        raise not_found("File")
    return row


# ---- handlers ---------------------------------------------------------------------------------------------

async def create(request: Request, p: Principal) -> Response:
    svc = services(request)
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=20)
        except ApiError:  # the body cap (server/hygiene.py)
            raise
        except Exception as exc:  # malformed multipart
            raise ApiError(400, f"Malformed multipart body: {exc}") from None
        for key, value in form.multi_items():  # a multipart charset such as unicode_escape can make surrogates
            check_text(key, "body")
            check_text(value if isinstance(value, str) else value.filename or "", key)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "Validation failed", details={"file": "is required (multipart field `file`)"})
        ftype = _check_type(form.get("type"))
        if (upload.size or 0) > svc.settings.max_upload_bytes:
            raise _too_large(svc)
        data = await upload.read()
        if len(data) > svc.settings.max_upload_bytes:
            raise _too_large(svc)
        original = os.path.basename(upload.filename or "") or None
        name = _check_name(form.get("name") or original or "upload")
        mime = MIME[ftype]
    else:
        body = await read_json(request)
        ftype = _check_type(body.get("type"))
        content = field(body, "content", str, required=True)
        name = _check_name(body.get("name"))
        original = field(body, "original_filename", str)
        original = os.path.basename(original) if original else None
        data = content.encode("utf-8")
        if len(data) > svc.settings.max_upload_bytes:
            raise _too_large(svc)
        mime = MIME[ftype]
    row = insert_file(svc, p.user_id, name, ftype, data, original, mime)
    return ok(file_object(row, request), message="File created", status=201)


async def list_files(request: Request, p: Principal) -> Response:
    svc = services(request)
    page, per_page = paging(request)
    ftype = request.query_params.get("type")
    rows, total = svc.store.files.list(p.user_id, ftype=_check_type(ftype) if ftype else None,
                                       search=request.query_params.get("search"),
                                       sort=sort_clause(request, FILE_SORTS, "created_at"), page=page,
                                       per_page=per_page)
    return ok(paged([file_object(r, request) for r in rows], page, per_page, total))


async def retrieve(request: Request, p: Principal) -> Response:
    return ok(file_object(owned_file(request, p), request))


def read_text(svc: Services, row: dict[str, Any]) -> str:
    try:
        return file_path(svc, row).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(422, "File is not UTF-8 text; use /download for its bytes",
                       details={"file": "not text"}) from None


def preview_of(svc: Services, row: dict[str, Any], lines: int) -> dict[str, Any]:
    text = read_text(svc, row)
    all_lines = text.splitlines()
    if row["type"] in ("prompt", "sft"):
        all_lines = [line for line in all_lines if line.strip()]
    head = all_lines[:lines]
    shown: list[Any] = head
    if row["type"] in ("prompt", "sft"):
        shown = []
        for line in head:
            try:
                shown.append(json.loads(line))
            except json.JSONDecodeError:
                shown.append(line)
    return {"file_id": row["id"], "type": row["type"], "lines": shown, "content": "\n".join(head),
            "total_lines": len(all_lines), "preview_lines": len(head), "truncated": len(all_lines) > len(head)}


async def preview(request: Request, p: Principal) -> Response:
    row = owned_file(request, p)
    lines = int_param(request, "lines", 20, lo=1, hi=1000)
    return ok(preview_of(services(request), row, lines))


async def content(request: Request, p: Principal) -> Response:
    row = owned_file(request, p)
    text = read_text(services(request), row)
    return ok({"file_id": row["id"], "content": text, "lines": len(text.splitlines()), "size": row["file_size"]})


async def download(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = owned_file(request, p)
    filename = row["original_filename"] or row["name"]
    return FileResponse(file_path(svc, row), media_type=row["mime_type"] or "application/octet-stream",
                        filename=filename)


async def update(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = owned_file(request, p)
    body = await read_json(request)
    values: dict[str, Any] = {}
    if "name" in body:
        values["name"] = _check_name(body["name"])
    if "content" in body:
        if row["type"] not in CODE_TYPES:
            raise ApiError(422, "Only reward_function and environment files can have their content replaced",
                           details={"content": f"not allowed for a {row['type']} file; upload a new file"})
        data = field(body, "content", str, required=True).encode("utf-8")
        if len(data) > svc.settings.max_upload_bytes:
            raise _too_large(svc)
        values["file_size"] = len(data)
    if not values:
        raise ApiError(422, "Nothing to update", details={"body": "send `name` and/or `content`"})
    values["updated_at"] = now_iso()
    with staged_files(svc) as stage:
        if "file_size" in values:
            stage.add(row["storage"], data)
        with svc.store.tx():
            svc.store.files.update(row["id"], values)
            stage.commit()
    return ok(file_object(svc.store.files.get(row["id"]), request), message="File updated")


async def delete(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = owned_file(request, p)
    force = bool_param(request, "force")
    active = svc.store.files.active_runs_using(row["id"])
    if active:
        raise ApiError(422, f"File is used by active run(s) {active}; cancel them or wait until they finish",
                       details={"active_runs": active})
    if force:
        svc.store.files.purge(row["id"])
        file_path(svc, row).unlink(missing_ok=True)
    else:
        svc.store.files.soft_delete(row["id"])
    return ok({"id": row["id"], "deleted": True, "purged": force}, message="File deleted")


NAME = string(minLength=1, maxLength=MAX_NAME)
UPLOAD = Body(json=obj({"type": enum(FILE_TYPES), "name": NAME, "content": string(),
                        "original_filename": nullable(string())}, ["type", "name", "content"]),
              multipart=obj({"file": string(format="binary"), "type": enum(FILE_TYPES), "name": NAME},
                            ["file", "type"]))
BYTES = {m: string(format="binary") for m in (*sorted(set(MIME.values())), "application/octet-stream")}
ROUTES = [
    api("/files", list_files, ["GET"], "read", summary="List your files", returns=page_of(ref("File")),
        query=[*PAGING, *sorting(FILE_SORTS, "created_at"), Param("type", enum(FILE_TYPES)),
               query_str("search", "in the name or original filename")]),
    api("/files", create, ["POST"], "write", summary="Upload a file (multipart) or create one from JSON content",
        body=UPLOAD, returns=ref("File"), status=201),
    api("/files/{file_id}", retrieve, ["GET"], "read", summary="A file's metadata", returns=ref("File")),
    api("/files/{file_id}", update, ["PUT"], "write", summary="Rename a file or replace a code file's content",
        body=Body(obj({"name": NAME, "content": string()})), returns=ref("File")),
    api("/files/{file_id}", delete, ["DELETE"], "write", summary="Delete a file (soft; force=true purges)",
        query=[query_bool("force", description="purge the row and the bytes")], returns=ref("FileDeleted")),
    api("/files/{file_id}/preview", preview, ["GET"], "read", summary="The first lines", returns=ref("FilePreview"),
        query=[query_int("lines", 20, 1, 1000)]),
    api("/files/{file_id}/content", content, ["GET"], "read", summary="The text content",
        returns=ref("FileContent"), errors=(422,)),
    api("/files/{file_id}/download", download, ["GET"], "read", summary="The file's bytes", media=BYTES),
]
