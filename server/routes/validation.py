"""Validation on both path families (`/validation/*` per the docs, `/validate/*` per the SDK).

The same checks as `runrl validate`: prompt and SFT files through `runrl_engine.data`; reward/environment code
through `runrl_engine.sandbox.validate_user_code`, which runs the code in the sandbox on up to three rows of
the given prompt file and reports what it returned. Without a `prompt_file_id` there are no rows with the
user's fields, so `valid` stands for the static checks and the load, a call with an empty row is reported under
`details.warnings` only, and the report says the code was not exercised on the user's rows
(`details.exercised_on_rows: false`, `details.note`, and the envelope's `message`). Problems in the user's
input are a `valid: false` payload (200), not an HTTP error; a file that does not exist or is not the caller's
is a 404.

Code validation runs user code, so it has its own bounded pool (`ValidationPool`: `validation_workers`
threads, at most `validation_per_user` in flight per user, each sandbox capped at `validation_memory_mb`): a
user over their share gets 429 and a full pool 503, both at once with `Retry-After`, and the cheap prompt and
SFT checks never wait behind it. With `require_isolation` (the default) and no working bubblewrap, code
validation answers 503 and runs nothing. Temporary directories live under `<data_dir>/validate/`, emptied at
every server start.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import Response

from runrl_engine import data
from runrl_engine.errors import UserError
from runrl_engine.sandbox import validate_user_code
from runrl_engine.sandbox.isolation import IsolationUnavailable, detect_isolation
from server.auth import Principal
from server.errors import ApiError, ok, read_json
from server.openapi import Body, enum, obj, ref, string
from server.routes import api, field, services
from server.routes.files import file_path, owned_file

RETRY_AFTER_S = 5


class ValidationPool:
    """A fixed set of threads for code validation, with a per-user cap; refuses rather than queues."""

    def __init__(self, workers: int, per_user: int, work_root: Path):
        self.workers, self.per_user, self.work_root = workers, per_user, work_root
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="runrl-validate")
        self._lock = threading.Lock()
        self._busy = 0
        self._by_user: Counter[int] = Counter()
        shutil.rmtree(work_root, ignore_errors=True)  # what a killed server left mid-validation
        work_root.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def run(self, user_id: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        with self._lock:
            if self._by_user[user_id] >= self.per_user:
                raise ApiError(429, f"You already have {self.per_user} code validations running; retry when one "
                                    f"has finished", details={"retry_after": RETRY_AFTER_S}, headers=retry)
            if self._busy >= self.workers:
                raise ApiError(503, "Every code-validation worker is busy; retry in a few seconds",
                               details={"retry_after": RETRY_AFTER_S}, headers=retry)
            self._busy += 1
            self._by_user[user_id] += 1
        try:
            return await asyncio.wrap_future(self._executor.submit(fn, *args, **kwargs))
        finally:
            with self._lock:
                self._busy -= 1
                self._by_user[user_id] -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


MODES = {"function": "function", "reward_function": "function", "reward": "function",
         "environment": "environment", "env": "environment"}
SAMPLE_ROWS = 3


def _typed_file(request: Request, p: Principal, file_id: Any, name: str, ftype: str) -> dict[str, Any]:
    if not isinstance(file_id, str) or not file_id:
        raise ApiError(422, "Validation failed", details={name: "is required (a file id)"})
    row = owned_file(request, p, file_id)
    if row["type"] != ftype:
        raise ApiError(422, "Validation failed", details={name: f"file {file_id} has type {row['type']!r}, "
                                                                 f"expected {ftype!r}"})
    return row


async def reward_function(request: Request, p: Principal) -> Response:
    body = await read_json(request)
    source = body.get("functionCode", body.get("function_code", body.get("code")))
    if not isinstance(source, str):
        raise ApiError(422, "Validation failed", details={"functionCode": "is required (the Python source)"})
    mode = MODES.get(field(body, "mode", str, default="function"))
    if mode is None:
        raise ApiError(422, "Validation failed", details={"mode": "must be `function` or `environment`"})
    rows = None
    prompt_id = body.get("prompt_file_id")
    if prompt_id:
        prompt = _typed_file(request, p, prompt_id, "prompt_file_id", "prompt")
        try:
            rows = [r.fields for r in data.load_prompts(file_path(services(request), prompt))[:SAMPLE_ROWS]]
        except UserError as exc:
            return ok({"valid": False, "error": f"prompt file: {exc.message}", "errors": [exc.render()],
                       "details": {"stage": "prompt_file", "prompt_file_id": prompt_id}})
    svc = services(request)
    isolation = "bwrap" if svc.settings.require_isolation else "auto"
    try:
        detect_isolation(isolation)
    except IsolationUnavailable as exc:
        raise ApiError(503, "This server runs user code only in a bubblewrap sandbox, and none can start on this "
                            "host; the code was not run", details={"isolation": exc.message}) from None
    pool: ValidationPool = svc.validation
    try:
        report = await pool.run(p.user_id, validate_user_code, source, mode=mode, sample_rows=rows,
                                isolation=isolation, memory_mb=svc.settings.validation_memory_mb,
                                work_root=pool.work_root)
    except IsolationUnavailable as exc:  # bubblewrap stopped working since the check above
        raise ApiError(503, "This server runs user code only in a bubblewrap sandbox, and none can start on this "
                            "host; the code was not run", details={"isolation": exc.message}) from None
    if prompt_id:
        report.setdefault("details", {})["prompt_file_id"] = prompt_id
    elif report["valid"]:
        return ok(report, message="Static checks passed and the code loaded; it was not run on your rows' fields "
                                  "(no prompt_file_id): see details.note")
    return ok(report)


async def _file_report(request: Request, p: Principal, name: str, ftype: str, check: Any) -> Response:
    body = await read_json(request)
    row = _typed_file(request, p, body.get(name, body.get("file_id")), name, ftype)
    report = (await asyncio.to_thread(check, file_path(services(request), row))).to_dict()
    report["details"][name] = row["id"]
    return ok(report)


async def prompt_file(request: Request, p: Principal) -> Response:
    return await _file_report(request, p, "prompt_file_id", "prompt", data.validate_prompt_file)


async def sft_file(request: Request, p: Principal) -> Response:
    return await _file_report(request, p, "sft_file_id", "sft", data.validate_sft_file)


# Docs paths (`/validation/...`) and SDK paths (`/validate/...`), each family also accepting the other's
# file-endpoint spelling.
CODE_BODY = Body(obj({"functionCode": string(description="The Python source"),
                      "function_code": string(description="Alias of functionCode"),
                      "code": string(description="Alias of functionCode"), "mode": enum(MODES, default="function"),
                      "prompt_file_id": string(description="A prompt file whose first rows the code is run on")},
                     ["functionCode"]))
SPECS = {  # handler -> what the OpenAPI document says of it
    reward_function: dict(summary="Run reward or environment code in the sandbox on sample rows",
                          body=CODE_BODY, errors=(404, 429, 503)),
    prompt_file: dict(summary="Check a prompt file", errors=(404,), body=Body(obj(
        {"prompt_file_id": string(), "file_id": string(description="Alias of prompt_file_id")}))),
    sft_file: dict(summary="Check an SFT file", errors=(404,), body=Body(obj(
        {"sft_file_id": string(), "file_id": string(description="Alias of sft_file_id")}))),
}
ROUTES = [
    api(f"/{family}/{name}", handler, ["POST"], "read", returns=ref("ValidationReport"), **SPECS[handler])
    for family in ("validation", "validate")
    for name, handler in (("reward-function", reward_function), ("prompt", prompt_file), ("prompt-file", prompt_file),
                          ("sft", sft_file), ("sft-file", sft_file))
]
