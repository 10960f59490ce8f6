"""`runrl runs list|show|logs|cancel`: a small command-line client of a running `runrl serve` (RunRL's API).

The base URL and the API key come from `--base-url`/`--api-key`, else `RUNRL_BASE_URL`/`RUNRL_API_KEY` (the
names the official SDK reads); the base URL defaults to `runrl serve`'s own, http://127.0.0.1:8000/api/v1, and
a bare `http://host:port` gets `/api/v1` appended. `list` prints a compact table, `show` the Run object as
JSON, `logs` the log lines (`--follow`: then the server's SSE stream until the run ends), `cancel` the
server's answer and the run's status. An API error (the failure envelope) raises `ApiCallError` with the
envelope's `message`, which the CLI prints as `error: ...` with exit status 1; a server that cannot be reached
likewise.

This module imports httpx only (never torch, nor the server's own modules), so it is as light as the SDK. It
does not create runs or upload files: the SDK does that (README, "Serve RunRL's API").
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import urlsplit

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000/api/v1"
RUN_COLUMNS = (("id", "ID"), ("status", "STATUS"), ("model", "MODEL"), ("current_step", "STEP"),
               ("total_steps", "OF"), ("created_at", "CREATED"), ("error_message", "ERROR"))


class ApiCallError(Exception):
    """The API answered with its failure envelope (or could not be reached); `message` says why."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status


class MissingCredentials(Exception):
    """No API key from the flags or the environment."""


def resolve(base_url: str | None, api_key: str | None) -> tuple[str, str]:
    """(base URL, key) from the flags, else the environment (RUNRL_BASE_URL, RUNRL_API_KEY)."""
    url = (base_url or os.environ.get("RUNRL_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    if urlsplit(url).path in ("", "/"):
        url += "/api/v1"
    key = api_key or os.environ.get("RUNRL_API_KEY")
    if not key:
        raise MissingCredentials()
    return url, key


class RunsClient:
    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0):
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, timeout=timeout,
                                  headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RunsClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """The success envelope, or ApiCallError with the failure envelope's message."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiCallError(f"cannot reach {self.base_url}: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success and isinstance(body, dict) and body.get("success", True):
            return body
        message = body.get("message") if isinstance(body, dict) else None
        raise ApiCallError(f"{message or response.reason_phrase} (HTTP {response.status_code})", response.status_code)

    def list(self, *, status: str | None = None, page: int = 1, per_page: int = 20) -> dict[str, Any]:
        params: dict[str, Any] = {"page": page, "per_page": per_page}
        if status:
            params["status"] = status
        return self._call("GET", "/runs", params=params)["data"]

    def get(self, run_id: int) -> dict[str, Any]:
        return self._call("GET", f"/runs/{run_id}")["data"]

    def logs(self, run_id: int, *, last_line: int = 0, limit: int = 1000) -> dict[str, Any]:
        return self._call("GET", f"/runs/{run_id}/logs", params={"last_line": last_line, "limit": limit})["data"]

    def all_logs(self, run_id: int) -> Iterator[str]:
        last = 0
        while True:
            chunk = self.logs(run_id, last_line=last)
            yield from chunk["lines"]
            last = chunk["last_line"]
            if not chunk.get("has_more"):
                return

    def follow(self, run_id: int) -> Iterator[str]:
        """Log lines from the SSE stream, from the first, until the server's `end` event."""
        try:
            with self._http.stream("GET", f"/runs/{run_id}/logs/stream", timeout=httpx.Timeout(30.0, read=None),
                                   headers={"Accept": "text/event-stream"}) as response:
                if not response.is_success:
                    response.read()
                    try:
                        message = response.json().get("message")
                    except ValueError:
                        message = None
                    raise ApiCallError(f"{message or response.reason_phrase} (HTTP {response.status_code})",
                                       response.status_code)
                for event, data in _sse_events(response.iter_lines()):
                    if event == "end":
                        return
                    yield data
        except httpx.HTTPError as exc:
            raise ApiCallError(f"cannot reach {self.base_url}: {exc}") from None

    def cancel(self, run_id: int) -> tuple[dict[str, Any], str]:
        body = self._call("POST", f"/runs/{run_id}/cancel")
        return body["data"], body.get("message", "")


def _sse_events(lines: Iterable[str]) -> Iterator[tuple[str | None, str]]:
    """(event, data) per server-sent event; multi-line data joined with newlines."""
    event: str | None = None
    data: list[str] = []
    for line in lines:
        if not line:
            if data or event:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()
    if data:
        yield event, "\n".join(data)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], *,
                 max_width: int = 48) -> str:
    """A plain-text table: one header line, one line per row; None is blank, long cells end in '...'."""
    def cell(value: Any) -> str:
        if value is None:
            return ""
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        text = text.replace("\n", " ")
        return text if len(text) <= max_width else text[: max_width - 3] + "..."

    cells = [[cell(r.get(key)) for key, _ in columns] for r in rows]
    widths = [max([len(title)] + [len(c[i]) for c in cells]) for i, (_, title) in enumerate(columns)]
    lines = ["  ".join(title.ljust(w) for (_, title), w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def format_runs(page: dict[str, Any]) -> str:
    rows = page.get("items", [])
    if not rows:
        return "no runs"
    pagination = page.get("pagination") or {}
    table = format_table(rows, RUN_COLUMNS)
    if pagination.get("last_page", 1) > 1:
        table += (f"\npage {pagination['current_page']} of {pagination['last_page']} ({pagination['total']} runs; "
                  "--page N for more)")
    return table


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)
