"""A run's outputs over HTTP: paginated logs, live logs as Server-Sent Events (both spec paths), metrics
(metrics.jsonl as a W&B-style history) and completions (completions.jsonl grouped by step).

The log of a run is its `logs.txt` (the trainer's lines, plus `[server]` lines the worker appends after the
process ends). Every line served is redacted with the run's secrets, whatever the trainer already did. The live
stream sends a keepalive (an empty line) after `sse_keepalive_s` without a line (server/sse.py), queued runs included.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from runrl_engine.rundir import RunDir
from runrl_engine.secrets import SERVED_MARK, redact, secret_values
from server.auth import Principal
from server.errors import not_found, ok
from server.openapi import query_int, ref, string
from server.queue import TERMINAL, RunStatus
from server.routes import api, int_param, path_id, services
from server.sse import KEEPALIVE

SSE_POLL_S = 0.5
MAX_LOG_LIMIT = 5000


def owned_run(request: Request, p: Principal) -> dict[str, Any]:
    run_id = path_id(request, "run_id")
    row = None if run_id is None else services(request).store.runs.get(run_id, p.user_id)
    if row is None:
        raise not_found("Run")
    return row


def run_dir(request: Request, row: dict[str, Any]) -> RunDir:
    return RunDir(services(request).settings.runs_dir / str(row["id"]))


def _last_json_line(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 8192))
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return None


def read_progress(runs_dir: Path, run_id: int, status: str, total_steps: int | None) -> tuple[int | None, float]:
    """(last logged step, progress in 0..1) from the tail of metrics.jsonl."""
    if status == RunStatus.COMPLETED.value:
        return total_steps, 1.0
    if status == RunStatus.PENDING.value:
        return None, 0.0
    last = _last_json_line(RunDir(runs_dir / str(run_id)).metrics)
    step = int(last["step"]) if last and isinstance(last.get("step"), (int, float)) else None
    if last and isinstance(last.get("total_steps"), int) and last["total_steps"] > 0:
        total_steps = last["total_steps"]  # the trainer's count (after skipped prompts), over the server's estimate
    if not step or not total_steps:
        return step, 0.0
    return step, min(0.99, step / total_steps)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # a line being written right now
    except FileNotFoundError:
        pass
    return out


def log_lines(directory: RunDir, secrets: list[str]) -> list[str]:
    try:
        text = directory.log.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    if not text.endswith("\n"):  # the last line is still being written
        text = text[: text.rfind("\n") + 1]
    return [redact(line, secrets, mark=SERVED_MARK) for line in text.splitlines()]


async def logs(request: Request, p: Principal) -> Response:
    row = owned_run(request, p)
    last_line = int_param(request, "last_line", 0, lo=0)
    limit = int_param(request, "limit", 100, lo=1, hi=MAX_LOG_LIMIT)
    lines = log_lines(run_dir(request, row), secret_values(row["secrets"]))
    chunk = lines[last_line:last_line + limit]
    return ok({"run_id": row["id"], "status": row["status"], "lines": chunk, "last_line": last_line + len(chunk),
               "total_lines": len(lines), "has_more": last_line + len(chunk) < len(lines)})


def _sse(data: str, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return head + "".join(f"data: {part}\n" for part in data.split("\n")) + "\n"


async def stream_logs(request: Request, p: Principal) -> Response:
    row = owned_run(request, p)
    store = services(request).store
    directory = run_dir(request, row)
    secrets = secret_values(row["secrets"])

    keepalive_s = services(request).settings.sse_keepalive_s

    async def events() -> AsyncIterator[str]:
        sent, last_event = 0, time.monotonic()
        while True:
            status = store.runs.status(row["id"])
            lines = log_lines(directory, secrets)
            for line in lines[sent:]:
                yield _sse(line)
                last_event = time.monotonic()
            sent = len(lines)
            if RunStatus(status) in TERMINAL:
                yield _sse(json.dumps({"status": status}), event="end")
                return
            if time.monotonic() - last_event >= keepalive_s:  # queued or silent: keep the connection alive
                yield KEEPALIVE
                last_event = time.monotonic()
            await asyncio.sleep(min(SSE_POLL_S, keepalive_s))

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def metrics(request: Request, p: Principal) -> Response:
    row = owned_run(request, p)
    rows = _jsonl(run_dir(request, row).metrics)
    history = [{"_step": r.get("step"), **r} for r in rows]
    keys = sorted({k for r in rows for k in r})
    return ok({"run_id": row["id"], "status": row["status"], "total_steps": row["total_steps"],
               "history": history, "steps": history, "summary": rows[-1] if rows else {}, "keys": keys})


async def completions(request: Request, p: Principal) -> Response:
    row = owned_run(request, p)
    only_step = int_param(request, "step", None, lo=0)
    per_step = int_param(request, "limit", 64, lo=1, hi=10_000)
    secrets = secret_values(row["secrets"])
    grouped: dict[int, list[dict[str, Any]]] = {}
    for sample in _jsonl(run_dir(request, row).completions):
        step = sample.get("step")
        if not isinstance(step, int) or (only_step is not None and step != only_step):
            continue
        bucket = grouped.setdefault(step, [])
        if len(bucket) < per_step:
            bucket.append(json.loads(redact(json.dumps(sample), secrets, mark=SERVED_MARK)))
    steps = [{"step": s, "samples": grouped[s]} for s in sorted(grouped)]
    return ok({"run_id": row["id"], "status": row["status"], "steps": steps,
               "total_samples": sum(len(s["samples"]) for s in steps)})


SSE = {"text/event-stream": string(description="`data: <log line>` events, then `event: end` with the status; "
                                               "an empty line as a keepalive after 15 s without an event")}
OUTPUT_ROUTES = [
    api("/runs/{run_id}/logs", logs, ["GET"], "read", summary="A page of the run's log lines", returns=ref("RunLogs"),
        query=[query_int("last_line", 0, 0), query_int("limit", 100, 1, MAX_LOG_LIMIT)]),
    *(api(path, stream_logs, ["GET"], "read", summary="Live log lines (Server-Sent Events) until the run ends",
          media=SSE) for path in ("/runs/{run_id}/logs/stream", "/runs/{run_id}/stream-logs")),
    api("/runs/{run_id}/metrics", metrics, ["GET"], "read", summary="metrics.jsonl as a history",
        returns=ref("RunMetrics")),
    api("/runs/{run_id}/completions", completions, ["GET"], "read", summary="Sampled completions by step",
        returns=ref("RunCompletions"), query=[query_int("step", None, 0, description="only this step"),
                                              query_int("limit", 64, 1, 10_000, "samples per step")]),
]
