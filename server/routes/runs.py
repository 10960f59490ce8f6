"""`/runs`: create (validated), list, detail, history, cancel. Outputs (logs, SSE, metrics, completions) are in
`run_outputs.py`.

The create body is RunRL's (spec §2.1): file ids become paths of the caller's own files, `tool_ids` become
MCP URLs, and the rest maps onto `RunConfig` keys, which also lets engine keys such as `max_steps` or
`num_generations` through. The whole config is validated by `RunConfig.from_dict` before the run is queued,
so a bad value is a 422 naming the field, not a failed run. `completion_length`, `epochs` and
`learning_rate_multiplier` take the engine's bounds, or RunRL's hosted ranges when the operator sets
`hosted_ranges`; `parameters` echoes RunRL's defaults (`API_DEFAULTS`) either way. Unknown keys are ignored
and echoed in `parameters`; the secret keys (`hf_token`, `reward_secrets`) are kept out of `parameters` (shown as
`***`) and of the stored config: they live only in the run's private secrets column, and reach `runrl train`
through its stdin (`--secrets-stdin`).
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from runrl_engine.config import REDACTED, RunConfig
from runrl_engine.errors import ConfigError
from runrl_engine.metrics import recorded_wandb_url
from runrl_engine.schedule import held_out_count, plan_steps
from server.auth import Principal
from server.gpus import check_n_gpus
from server.hub_push import hub_fields
from server.legacy import ignored_warnings, map_legacy
from server.policy import POLICY_KEYS, check_run_request, forced_config
from server.errors import ApiError, ok, read_json
from server.openapi import Body, Param, array, boolean, enum, integer, number, obj, page_of, query_str, ref, string
from server.queue import ACTIVE, RunStatus
from server.routes import PAGING, api, paged, paging, services, sort_clause, sorting
from server.routes.files import file_path, file_ref
from server.routes.run_outputs import OUTPUT_ROUTES, owned_run, read_progress
from server.services import Services
from server.store import RUN_SORTS, now_iso

RUN_TYPES = ("reward_function", "environment")
CACHEABLE = {"PENDING", "COMPLETED", "FAILED", "CANCELLED"}
# RunRL's hosted ranges (spec §2.1, §6), kept when the operator sets `hosted_ranges`; otherwise these keys take
# the engine's own bounds (ENGINE_RANGES, from RunConfig), so the API accepts what `runrl train` accepts.
API_RANGES = {"completion_length": (128, 8192), "epochs": (1, 100), "learning_rate_multiplier": (0.1, 10.0)}
ENGINE_RANGES = {f.name: (f.metadata["ge"], f.metadata["le"]) for f in dataclasses.fields(RunConfig)
                 if f.name in API_RANGES}
API_DEFAULTS = {"completion_length": 1024, "epochs": 1, "learning_rate_multiplier": 1.0, "use_lora": False,
                "lora_rank": 16, "lora_alpha": 16, "lora_dropout": 0.0}
API_ONLY = {"prompt_file_id", "reward_file_id", "sft_file_id", "tool_ids"}
# Config keys a request may not set directly: server paths and tool URLs come only from ids.
# The tool destination policy is the operator's (settings allow_private_destinations / allowed_destinations).
NOT_FROM_BODY = {"prompt_file", "reward_file", "sft_file", "eval_prompt_file", "tools",
                 "tool_allow_private_destinations", "tool_allowed_destinations"}
SECRET_KEYS = {f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("secret")}
CONFIG_KEYS = {f.name for f in dataclasses.fields(RunConfig)}


HF_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # no "..", no leading "/" "~" "."

def run_objects(svc: Services, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run objects for `rows`, with their files and tools fetched in two queries for the whole list."""
    file_ids = {r[k] for r in rows for k in ("prompt_file_id", "reward_file_id", "sft_file_id") if r[k]}
    files = svc.store.files.refs(file_ids)
    tools = svc.store.tools.refs({t for r in rows for t in r["tool_ids"]})
    now = now_iso()

    def ref(file_id: str | None) -> dict[str, Any] | None:
        if not file_id:
            return None
        return file_ref(files.get(file_id)) or {"id": file_id, "name": None, "type": None, "deleted": True}

    out = []
    for row in rows:
        status = row["status"]
        step, progress = read_progress(svc.settings.runs_dir, row["id"], status, row["total_steps"])
        hf_name, hf_push = hub_fields(svc.settings.runs_dir / str(row["id"]), status, row["hf_name"])
        duration = None
        if row["started_at"]:
            end = row["completed_at"] or now
            duration = int((_parse(end) - _parse(row["started_at"])).total_seconds())
        out.append({
            "id": row["id"], "status": status, "type": row["type"], "model": row["model"],
            "parameters": row["parameters"], "uses_tools": bool(row["tool_ids"]), "progress": progress,
            "current_step": step, "total_steps": row["total_steps"],
            "created_at": row["created_at"], "updated_at": row["updated_at"], "started_at": row["started_at"],
            "completed_at": row["completed_at"], "error_message": row["error_message"],
            "wandb_url": recorded_wandb_url(svc.settings.runs_dir / str(row["id"])),  # what the trainer recorded
            "hf_name": hf_name, "hf_push": hf_push, "prompt_file": ref(row["prompt_file_id"]),
            "reward_file": ref(row["reward_file_id"]), "sft_file": ref(row["sft_file_id"]),
            "tools": [tools.get(t) or {"id": t, "name": None, "mcp_url": None, "description": None}
                      for t in row["tool_ids"]],
            "billing_start_time": row["started_at"], "billing_end_time": row["completed_at"],
            "duration_seconds": duration,
            "devices": row["devices"].split(",") if row["devices"] else None})  # its GPUs (server/gpus.py)
    return out


def run_object(svc: Services, row: dict[str, Any]) -> dict[str, Any]:
    return run_objects(svc, [row])[0]


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


# ---- create -----------------------------------------------------------------------------------------------

def _file_for(svc: Services, p: Principal, body: dict[str, Any], name: str, types: tuple[str, ...],
              errors: dict[str, str], required: bool) -> dict[str, Any] | None:
    file_id = body.get(name)
    if file_id in (None, ""):
        if required:
            errors[name] = "is required"
        return None
    if not isinstance(file_id, str):
        errors[name] = "must be a file id (string)"
        return None
    row = svc.store.files.get(file_id, p.user_id)
    if row is None:
        errors[name] = f"file {file_id} not found"
    elif row["type"] not in types:
        errors[name] = f"file {file_id} has type {row['type']!r}; expected {' or '.join(types)}"
    else:
        return row
    return None


def _check_api_fields(body: dict[str, Any], errors: dict[str, str], hosted_ranges: bool = False) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        errors["model"] = "is required (a model id such as Qwen/Qwen3-4B, or builtin:tiny)"
    elif not (model.startswith("builtin:") or HF_MODEL_ID.fullmatch(model)) or model.lower().endswith(".gguf"):
        # a path would let any API user load (and read) a directory of the server's file system; the engine reads
        # any `*.gguf` name as a local file, so those are paths too
        errors["model"] = ("must be a Hugging Face model id (org/name) or builtin:NAME (e.g. "
                           "builtin:smollm2-135m-instruct); server paths and .gguf files are not accepted")
    if body.get("type") not in RUN_TYPES:
        errors["type"] = f"is required: one of {list(RUN_TYPES)}"
    for key, (lo, hi) in (API_RANGES if hosted_ranges else ENGINE_RANGES).items():
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            errors[key] = f"must be a number between {lo:g} and {hi:g}"
        elif key != "learning_rate_multiplier" and not float(value).is_integer():
            errors[key] = "must be an integer"
    reqs = body.get("package_requirements")
    if reqs is not None and (not isinstance(reqs, list) or not all(isinstance(r, str) for r in reqs)):
        errors["package_requirements"] = "must be a list of pip requirement strings"
    for key in ("hf_token", "hf_name"):
        if body.get(key) is not None and not isinstance(body[key], str):
            errors[key] = "must be a string"


def _tools(svc: Services, p: Principal, body: dict[str, Any], errors: dict[str, str]) -> list[dict[str, Any]]:
    ids = body.get("tool_ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        errors["tool_ids"] = "must be a list of tool ids (integers)"
        return []
    tools = []
    for tool_id in ids:
        t = svc.store.tools.visible(tool_id, p.user_id)
        if t is None:
            errors["tool_ids"] = f"tool {tool_id} not found"
            return []
        tools.append(t)
    return tools


def _estimate_steps(path: str, cfg: RunConfig) -> int:
    """The run's length before it starts, by the trainer's own rule (`runrl_engine.schedule`), from the prompt
    file's line count: the server has no tokenizer, so prompts the trainer will skip for length still count here.
    Progress switches to the trainer's number once a step record carries it (`read_progress`)."""
    if cfg.max_steps:
        return cfg.max_steps
    with open(path, "rb") as fh:
        n = sum(1 for line in fh if line.strip())
    n_eval = 0 if cfg.eval_prompt_file else held_out_count(n, cfg.eval_fraction, cfg.eval_max_prompts)
    return plan_steps(n - n_eval, cfg.prompts_per_step, cfg.epochs, cfg.max_steps)


async def create(request: Request, p: Principal) -> Response:
    svc = services(request)
    body = await read_json(request)
    errors: dict[str, str] = {}
    _check_api_fields(body, errors, svc.settings.hosted_ranges)
    errors.update(check_run_request(svc.settings, body))
    legacy = map_legacy(body, errors)  # kl_beta, max_seq_length -> engine keys (server/legacy.py)
    prompt = _file_for(svc, p, body, "prompt_file_id", ("prompt",), errors, True)
    reward = _file_for(svc, p, body, "reward_file_id", ("reward_function", "environment"), errors, True)
    sft = _file_for(svc, p, body, "sft_file_id", ("sft",), errors, False)
    tools = _tools(svc, p, body, errors)
    if errors:
        raise ApiError(422, "Validation failed", details=errors)
    config: dict[str, Any] = {k: v for k, v in body.items()
                              if k in CONFIG_KEYS and k not in NOT_FROM_BODY and k not in POLICY_KEYS
                              and v is not None}
    config.update(legacy)
    config.update(prompt_file=str(file_path(svc, prompt)), reward_file=str(file_path(svc, reward)),
                  tools=[t["mcp_url"] for t in tools])
    if sft:
        config["sft_file"] = str(file_path(svc, sft))
    config = forced_config(svc.settings, config)
    config.update(tool_allow_private_destinations=svc.settings.allow_private_destinations,
                  tool_allowed_destinations=list(svc.settings.allowed_destinations))
    try:
        cfg = RunConfig.from_dict(config, source="run")
    except ConfigError as exc:
        key = (exc.where or "").split(": ", 1)[-1] or "body"
        raise ApiError(422, "Invalid run configuration",  # the envelope adds "<key>: <reason>"
                       details={key: exc.message + (f" ({exc.fix})" if exc.fix else "")}) from None
    gpu_problem = check_n_gpus(svc.settings.gpus, cfg)
    if gpu_problem:
        raise ApiError(422, "Validation failed", details={"n_gpus": gpu_problem})
    secrets = {k: config.pop(k) for k in list(config) if k in SECRET_KEYS}
    parameters = {**API_DEFAULTS, **{k: v for k, v in body.items() if k not in API_ONLY}, **legacy}
    for k in SECRET_KEYS & parameters.keys():
        parameters[k] = REDACTED
    now = now_iso()
    run_id = svc.store.runs.create({
        "user_id": p.user_id, "status": RunStatus.PENDING.value, "type": cfg.type, "model": cfg.model,
        "parameters": parameters, "config": config, "secrets": secrets, "prompt_file_id": prompt["id"],
        "reward_file_id": reward["id"], "sft_file_id": sft["id"] if sft else None,
        "tool_ids": [t["id"] for t in tools], "hf_name": cfg.hf_name,
        "total_steps": _estimate_steps(config["prompt_file"], cfg), "created_at": now, "updated_at": now},
        "Run queued" + "".join(f"; warning: {w}" for w in ignored_warnings(parameters, svc.settings.gpus)))
    svc.store.tools.count_use([t["id"] for t in tools])
    svc.worker.wake()
    return ok(run_object(svc, svc.store.runs.get(run_id)), message="Run created", status=201)  # type: ignore[arg-type]


# ---- read / cancel ----------------------------------------------------------------------------------------

def _instant(param: str, value: str) -> str:
    """A date (`2026-12-01`: its midnight, UTC) or an ISO 8601 time (`2026-12-01T10:00:00Z`, an offset such as
    `+02:00`; none means UTC) as stored timestamps are written (`now_iso`: UTC, microseconds, `Z`), so comparing
    the strings compares the instants; anything else is a 422 naming `param`."""
    try:
        when = datetime.fromisoformat(value.strip())
        when = when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)
    except (ValueError, OverflowError):  # OverflowError: an offset past year 1 or 9999
        raise ApiError(422, f"Invalid query parameter {param}", details={
            param: "must be an ISO 8601 date or time, e.g. 2026-12-01 or 2026-12-01T10:00:00Z"}) from None
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")  # years zero-padded, unlike strftime


async def list_runs(request: Request, p: Principal) -> Response:
    svc = services(request)
    # Pages whose runs can no longer change without a database write are served from a cache (the runs
    # list is what clients poll); RUNNING/SETTING_UP runs read progress from disk, so they are never cached.
    cache_key, generation = (p.user_id, request.url.query), svc.store.generation()
    cached = svc.cache.get(cache_key, generation)
    if cached is not None:
        return Response(cached, media_type="application/json")
    page, per_page = paging(request)
    wanted: list[str] | None = None
    status = request.query_params.get("status")
    if status:
        wanted = [s.strip().upper() for s in status.split(",") if s.strip()]
        bad = [s for s in wanted if s not in RunStatus.__members__]
        if bad:
            raise ApiError(422, "Invalid status filter", details={"status": f"one of {list(RunStatus.__members__)}"})
    after, before = request.query_params.get("created_after"), request.query_params.get("created_before")
    rows, total = svc.store.runs.list(
        p.user_id, statuses=wanted, created_after=_instant("created_after", after) if after else None,
        created_before=_instant("created_before", before) if before else None,
        run_type=request.query_params.get("type"), model=request.query_params.get("model"),
        sort=sort_clause(request, RUN_SORTS, "created_at"), page=page, per_page=per_page)
    response = ok(paged(run_objects(svc, rows), page, per_page, total))
    if all(r["status"] in CACHEABLE for r in rows):
        svc.cache.put(cache_key, generation, response.body)
    return response


async def retrieve(request: Request, p: Principal) -> Response:
    return ok(run_object(services(request), owned_run(request, p)))


async def history(request: Request, p: Principal) -> Response:
    row = owned_run(request, p)
    # through the Store shorthand, which tests/server/test_auth_envelope.py replaces to simulate an engine bug
    return ok({"run_id": row["id"], "history": services(request).store.history(row["id"])})


async def cancel(request: Request, p: Principal) -> Response:
    svc = services(request)
    row = owned_run(request, p)
    if RunStatus(row["status"]) not in ACTIVE:
        return ok(run_object(svc, row), message=f"Run already finished ({row['status']})")
    svc.store.runs.request_cancel(row["id"])
    if not svc.queue.transition(row["id"], RunStatus.CANCELLED, "Cancelled by user before it started",
                                only_from=RunStatus.PENDING):
        svc.worker.cancel(row["id"])
    return ok(run_object(svc, svc.store.runs.get(row["id"])), message="Cancellation requested")  # type: ignore[arg-type]


CREATE_BODY = obj({
    "model": string(pattern=r"^(builtin:.+|[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?)$",
                    description="A Hugging Face model id (org/name) or builtin:NAME; not a path or a .gguf file"),
    "type": enum(RUN_TYPES),
    "prompt_file_id": string(), "reward_file_id": string(description="A reward_function or environment file"),
    "sft_file_id": string(), "tool_ids": array(integer()),
    "completion_length": integer(*ENGINE_RANGES["completion_length"]),
    "epochs": integer(*ENGINE_RANGES["epochs"]),
    "learning_rate_multiplier": number(minimum=ENGINE_RANGES["learning_rate_multiplier"][0],
                                       maximum=ENGINE_RANGES["learning_rate_multiplier"][1]),
    "package_requirements": array(string()), "hf_token": string(), "hf_name": string(), "use_lora": boolean(),
    "reward_secrets": obj(additionalProperties=string(), description="Secrets for the reward/environment code "
                          "({NAME: value}, e.g. a judge's API key): environment variables of its sandbox workers; "
                          "kept out of parameters and of the stored config, like hf_token"),
    "lora_rank": integer(0), "lora_alpha": integer(0), "lora_dropout": number(minimum=0, maximum=1),
    "n_gpus": integer(1, 1024, description="GPUs for the run (one process each); at most the server's count"),
    # RunRL's legacy keys (server/legacy.py)
    "kl_beta": number(minimum=0, maximum=100, description="Legacy name of beta"),
    "max_seq_length": integer(2, description="Legacy: prompt + completion tokens at most (sets max_prompt_length "
                                             "= max_seq_length - completion_length and max_episode_tokens)"),
    "gpu_type": string(description="Legacy; accepted and ignored (a warning in the run's history and log)"),
    "turbo": boolean(description="Legacy; accepted and ignored (a warning when true)")},
    ["model", "type", "prompt_file_id", "reward_file_id"],
    description="RunRL's create-run body (spec §2.1); any other `runrl train` config key (max_steps, "
                "num_generations, ...) is accepted too. With `runrl serve --hosted-ranges`, completion_length, "
                "epochs and learning_rate_multiplier take RunRL's hosted ranges (128..8192, 1..100, 0.1..10).")
ROUTES = [
    api("/runs", list_runs, ["GET"], "read", summary="List your runs, newest first", returns=page_of(ref("Run")),
        query=[*PAGING, query_str("status", "comma-separated statuses, e.g. RUNNING,PENDING"),
               query_str("created_after", "ISO 8601 date or time (no offset: UTC); on or after"),
               query_str("created_before", "ISO 8601 date or time (no offset: UTC); before"),
               Param("type", enum(RUN_TYPES)), query_str("model"), *sorting(RUN_SORTS, "created_at")]),
    api("/runs", create, ["POST"], "write", summary="Queue a run", body=Body(CREATE_BODY), returns=ref("Run"),
        status=201),
    api("/runs/{run_id}", retrieve, ["GET"], "read", summary="A run", returns=ref("Run")),
    api("/runs/{run_id}/history", history, ["GET"], "read", summary="A run's status timeline",
        returns=ref("RunHistory")),
    api("/runs/{run_id}/cancel", cancel, ["POST"], "write", summary="Cancel a run", returns=ref("Run")),
    *OUTPUT_ROUTES,
]
