"""MCP tool servers for rollouts: one MCP session per episode, driven from synchronous code.

What it is for:
- `handshake(url)` / `handshake_async(url)`: connect, list tools, disconnect; returns the diagnostics dict
  that `POST /tools/test-mcp` serves. Never raises.
- `ToolRuntime`: one background thread running one asyncio event loop for every session of a trainer.
  The trainer is synchronous and runs many episodes at once; it opens one `ToolSession` per episode
  (`open_sessions(n, urls)`, concurrently) and runs the calls of all live episodes together
  (`call_many` or `ToolSession.submit`, which return `concurrent.futures` futures).
- `ToolSession`: the MCP sessions of ONE rollout episode, one per tool-server URL, so a stateful server
  keeps per-episode state. `tools()` merges the servers' listings, `call()` returns a `ToolResult`, and
  every failure (unknown tool, bad arguments, tool error, server error, timeout, refused or lost
  connection, per-episode call cap, closed session) is a `ToolResult(is_error=True, text=...)` with a
  message written for the model to read, never an exception.

Transport, by URL path: a path ending in `/sse` uses the legacy HTTP+SSE transport (`mcp.client.sse`);
anything else uses streamable HTTP (the `/mcp` path RunRL documents). No probing of one then the other:
a failed probe would cost a connect timeout per episode and hide the real error.

Protocol era: sessions connect with the `initialize` handshake (`mcp.Client(..., mode="legacy")`),
because that is what creates an `Mcp-Session-Id`, the key stateful servers use for per-episode state.
The 2026-07-28 era that `mode="auto"` negotiates is sessionless. If a server refuses the handshake with
an MCP error, the connection is retried once with `mode="auto"`.

Destinations: every connection goes through `runrl_engine.netpolicy.AsyncGuardedTransport` with the
`DestinationPolicy` given to `handshake_async` / `ToolRuntime` (default: `PERMISSIVE`, every address allowed,
which is what `runrl train` on a user's own box wants; the server passes its own, and a run's trainer the one
from `tool_allow_private_destinations` / `tool_allowed_destinations`). The check happens on the resolved
address of each new TCP connection (see netpolicy for what that covers). Redirects are never followed, the
SDK's own same-origin following included: a 3xx ends the handshake with "answered with a redirect; register the
final URL". A policy refusal gives the policy's message. Every other failure to connect, initialize or list
tools (connection refused, timeout, DNS failure, TLS error, an HTTP server that is not MCP, an MCP error)
gives ONE message, "could not complete an MCP handshake with <url> ...", so the answer does not tell a closed
port from an open one; the underlying reason is logged at DEBUG for the operator.

Tool-name collisions across servers: the first URL in `tools` order keeps the bare name; a later server's
tool with the same name is exposed as `<server-name>__<tool>` (server name from its initialize reply,
reduced to `[A-Za-z0-9_-]`, `_2`, `_3`... appended if still taken). `ToolSpec.remote_name` keeps the name
the server knows. Duplicate URLs are connected once.

Not covered: authentication or custom headers (RunRL's tools are unauthenticated remote servers), the
stdio transport, MCP resources/prompts/sampling, and reconnecting a lost session (state would be gone,
so the episode sees errors instead). Depends on the `mcp` 2.x SDK.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx2  # the HTTP client the mcp 2.x SDK is built on (a dependency of `mcp`)
import mcp_types
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from runrl_engine.netpolicy import AsyncGuardedTransport, DestinationDenied, DestinationPolicy, RedirectRefused
from runrl_engine.tools.parsing import render_tool_schemas

logger = logging.getLogger(__name__)

Transport = Literal["streamable-http", "sse"]

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_CALL_TIMEOUT_S = 30.0
DEFAULT_CLOSE_TIMEOUT_S = 5.0
DEFAULT_MAX_RESULT_CHARS = 16_000
# Slack on top of a call's timeout before the client gives up on the SDK's own timeout firing.
_TIMEOUT_GRACE_S = 0.5
# The SSE transport drops the connection after this long without an event; episodes can sit idle for the
# whole of a long generation phase between two calls, so the SDK's 300 s default is too short.
_SSE_IDLE_S = 24 * 3600.0
_MAX_TOOL_PAGES = 100
# The default policy of this module's entry points: every destination allowed (redirects still refused).
PERMISSIVE = DestinationPolicy(allow_private=True)


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the policy sees it. `name` may differ from `remote_name` after a collision."""

    name: str
    description: str
    input_schema: dict[str, Any]
    server_url: str
    remote_name: str


@dataclass(frozen=True)
class ToolResult:
    """What goes back into the conversation as a `tool` message.

    `error_type` (None when `is_error` is False) is one of: unknown_tool, invalid_arguments, tool_error
    (the tool reported failure), server_error, timeout, connection, limit, closed.
    """

    text: str
    is_error: bool = False
    error_type: str | None = None
    latency_s: float = 0.0


def detect_transport(url: str) -> Transport:
    """`sse` when the URL path ends in `/sse`, else `streamable-http`."""
    return "sse" if urlsplit(url).path.rstrip("/").endswith("/sse") else "streamable-http"


def _check_url(url: Any) -> str | None:
    if not isinstance(url, str) or not url:
        return "MCP URL must be a non-empty string"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"MCP URL must be an http(s) URL with a host, got {url!r}"
    return None


def _describe(exc: BaseException) -> str:
    """One line for an exception, unwrapping the exception groups anyio's task groups raise."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, MCPError):
        return f"MCP error {exc.code}: {exc.error.message}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    text = str(exc).strip().split("\n", 1)[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _result_text(result: mcp_types.CallToolResult, max_chars: int) -> str:
    parts: list[str] = []
    for block in result.content:
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource":
            resource = block.resource
            text = getattr(resource, "text", None)
            parts.append(text if text is not None else f"[binary resource {resource.uri}]")
        elif kind == "resource_link":
            parts.append(f"[resource link {block.uri}]")
        else:
            parts.append(f"[{kind} content omitted]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    text = "\n".join(parts)
    if len(text) > max_chars:
        text = text[:max_chars] + f"\n[truncated {len(text) - max_chars} characters]"
    return text


@dataclass(frozen=True)
class _Net:
    """How one connection reaches its server: the TLS context, the destination policy, where refusals go."""

    ssl_context: ssl.SSLContext
    policy: DestinationPolicy
    refusals: list[Exception]


def _http_client(net: _Net, timeout_s: float, read_s: float | None) -> httpx2.AsyncClient:
    # One shared SSLContext: building one per client (the SDK's default) costs ~0.1 s of CPU to load the
    # CA bundle, which dominated opening 64 episode sessions.
    transport = AsyncGuardedTransport(net.policy, flavor="httpx2", ssl_context=net.ssl_context,
                                      on_refusal=net.refusals.append)
    return httpx2.AsyncClient(timeout=httpx2.Timeout(timeout_s, read=read_s), transport=transport,
                              follow_redirects=False, trust_env=False)


@asynccontextmanager
async def _streamable_http(url: str, net: _Net, timeout_s: float) -> AsyncIterator[Any]:
    # No read timeout at the HTTP layer: every wait on a response is bounded by a call timeout above it.
    async with (
        _http_client(net, timeout_s, None) as http,
        streamable_http_client(url, http_client=http) as streams,
    ):
        yield streams


def _new_client(url: str, mode: str, timeout_s: float, net: _Net) -> Client:
    if detect_transport(url) == "sse":

        def factory(headers: Any = None, timeout: Any = None, auth: Any = None) -> httpx2.AsyncClient:
            return _http_client(net, timeout_s, _SSE_IDLE_S)

        transport: Any = sse_client(url, timeout=timeout_s, sse_read_timeout=_SSE_IDLE_S, httpx_client_factory=factory)
    else:
        transport = _streamable_http(url, net, timeout_s)
    # read_timeout_seconds bounds initialize and tools/list; tool calls pass their own timeout.
    return Client(transport, mode=mode, read_timeout_seconds=timeout_s, cache=None)


class _Connection:
    """One MCP session to one server, owned by one task on the runtime's loop.

    The SDK's `Client` is an anyio context manager whose task groups must be entered and exited by the
    same task, so a dedicated owner task holds it open until `close()`; calls run in their own tasks
    and race the owner's death (`_dead`), so a call never waits on a connection that is gone.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float,
        max_result_chars: int,
        ssl_context: ssl.SSLContext,
        policy: DestinationPolicy = PERMISSIVE,
    ) -> None:
        self.url = url
        self.net = _Net(ssl_context, policy, [])
        self.transport = detect_transport(url)
        self.connect_timeout_s = connect_timeout_s
        self.max_result_chars = max_result_chars
        self.client: Client | None = None
        self.tools: list[mcp_types.Tool] = []
        self.server_name: str | None = None
        self.server_version: str | None = None
        self.protocol_version: str | None = None
        self.error: str | None = None
        self._owner: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._dead: asyncio.Future[None] | None = None

    async def open(self) -> None:
        """Connect and list tools within `connect_timeout_s`; on failure `self.error` says why."""
        if (problem := _check_url(self.url)) is not None:
            self.error = problem
            return
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._dead = loop.create_future()
        ready: asyncio.Future[str | None] = loop.create_future()
        self._owner = loop.create_task(self._run(ready), name=f"mcp-connection {self.url}")
        done, _ = await asyncio.wait({ready}, timeout=self.connect_timeout_s)
        if not done:
            problem: str | None = f"no answer within {self.connect_timeout_s:g} s"
            await self._stop_owner(1.0)
        else:
            problem = ready.result()
        if problem is not None:
            logger.debug("MCP: handshake with %s failed: %s", self.url, problem)
            self.error = self._failure()

    def _failure(self) -> str:
        """The message for a failed open: the policy's, the redirect's, or the one for everything else."""
        for refusal in self.net.refusals:
            if isinstance(refusal, DestinationDenied):
                return f"{self.url}: {refusal}"
        for refusal in self.net.refusals:
            if isinstance(refusal, RedirectRefused):
                return (f"the MCP server at {self.url} answered with a redirect (HTTP {refusal.status}"
                        f"{f' to {refusal.location}' if refusal.location else ''}); redirects are not followed: "
                        "register the final URL")
        return (f"could not complete an MCP handshake with {self.url} (is an MCP server answering at that URL? "
                "the endpoint is usually a path ending in /mcp, or /sse for SSE)")

    async def _run(self, ready: asyncio.Future[str | None]) -> None:
        assert self._stop is not None and self._dead is not None
        try:
            for mode in ("legacy", "auto"):
                entered = False
                try:
                    async with _new_client(self.url, mode, self.connect_timeout_s, self.net) as client:
                        entered = True
                        tools = await _list_all_tools(client)
                        info = client.server_info
                        self.server_name = info.name if info else None
                        self.server_version = info.version if info else None
                        self.protocol_version = client.protocol_version
                        self.tools = tools
                        self.client = client
                        ready.set_result(None)
                        await self._stop.wait()
                        self.client = None
                    return
                except MCPError:
                    if entered or mode == "auto" or self.net.refusals:
                        raise
                    logger.info("MCP: %s refused the initialize handshake; retrying with mode='auto'", self.url)
        except Exception as e:  # the connection's end, reported to the episode through `error`
            message = _describe(e)
            if not ready.done():
                ready.set_result(message)
            elif self.error is None:
                self.error = f"connection to tool server {self.url} lost: {message}"
                logger.warning("MCP: %s", self.error)
        finally:
            self.client = None
            if not ready.done():
                ready.set_result("connection cancelled")
            if self.error is None and not self._stop.is_set():
                self.error = f"connection to tool server {self.url} closed unexpectedly"
            if not self._dead.done():
                self._dead.set_result(None)

    async def call(self, remote_name: str, arguments: dict[str, Any], timeout_s: float) -> ToolResult:
        start = time.perf_counter()
        client, dead = self.client, self._dead
        if client is None or dead is None or dead.done():
            text = f"Error: tool server {self.url} is unavailable: {self.error or 'not connected'}"
            return ToolResult(text, True, "connection")
        task = asyncio.ensure_future(client.call_tool(remote_name, arguments, read_timeout_seconds=timeout_s))
        done, _ = await asyncio.wait(
            {task, dead}, timeout=timeout_s + _TIMEOUT_GRACE_S, return_when=asyncio.FIRST_COMPLETED
        )
        elapsed = time.perf_counter() - start
        timed_out = f"Error: tool {remote_name!r} timed out after {timeout_s:g} s"
        if task not in done:
            task.cancel()
            task.add_done_callback(_consume_outcome)
            if dead.done():
                return ToolResult(f"Error: {self.error or 'tool server connection lost'}", True, "connection", elapsed)
            return ToolResult(timed_out, True, "timeout", elapsed)
        if task.cancelled():  # cancelled under us: only happens when the connection is being torn down
            return ToolResult(f"Error: {self.error or 'tool server connection lost'}", True, "connection", elapsed)
        try:
            result = task.result()
        except MCPError as e:
            if e.code == mcp_types.REQUEST_TIMEOUT:
                return ToolResult(timed_out, True, "timeout", elapsed)
            if dead.done() or e.code == mcp_types.CONNECTION_CLOSED:
                reason = self.error or f"connection to tool server {self.url} lost: {_describe(e)}"
                return ToolResult(f"Error: {reason}", True, "connection", elapsed)
            return ToolResult(f"Error: tool {remote_name!r} failed: {_describe(e)}", True, "server_error", elapsed)
        except Exception as e:  # e.g. a result that does not validate against the tool's output schema
            return ToolResult(f"Error: tool {remote_name!r} failed: {_describe(e)}", True, "server_error", elapsed)
        text = _result_text(result, self.max_result_chars)
        if result.is_error:
            return ToolResult(text if text.startswith("Error") else f"Error: {text}", True, "tool_error", elapsed)
        return ToolResult(text, False, None, elapsed)

    async def close(self, timeout_s: float) -> None:
        if self._stop is not None:
            self._stop.set()
        await self._stop_owner(timeout_s)

    async def _stop_owner(self, timeout_s: float) -> None:
        owner = self._owner
        if owner is None or owner.done():
            return
        if self._stop is not None and not self._stop.is_set():
            owner.cancel()
        done, _ = await asyncio.wait({owner}, timeout=timeout_s)
        if not done:  # the transport did not wind down (e.g. a server that stopped answering): cut it off
            owner.cancel()
            await asyncio.wait({owner}, timeout=1.0)


def _consume_outcome(task: asyncio.Future[Any]) -> None:
    # Retrieve the outcome of an abandoned call so asyncio does not log "exception never retrieved".
    if not task.cancelled():
        task.exception()


async def _list_all_tools(client: Client) -> list[mcp_types.Tool]:
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _ in range(_MAX_TOOL_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "server"


def _merge_tools(connections: Sequence[_Connection]) -> tuple[dict[str, ToolSpec], list[str]]:
    """Merged specs and one note per renamed tool."""
    specs: dict[str, ToolSpec] = {}
    renames: list[str] = []
    for index, conn in enumerate(connections):
        for tool in conn.tools:
            name = tool.name
            if name in specs:
                base = f"{_slug(conn.server_name or f'server{index}')}__{tool.name}"
                name, k = base, 2
                while name in specs:
                    name, k = f"{base}_{k}", k + 1
                renames.append(f"tool {tool.name!r} of {conn.url} collides with an earlier server's; renamed {name!r}")
            specs[name] = ToolSpec(
                name=name,
                description=tool.description or "",
                input_schema=dict(tool.input_schema or {}),
                server_url=conn.url,
                remote_name=tool.name,
            )
    return specs, renames


async def handshake_async(
    url: str, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, *, policy: DestinationPolicy = PERMISSIVE
) -> dict[str, Any]:
    """Connect to `url` (where `policy` allows), list its tools, disconnect. Never raises.

    Returns `{"ok", "server_info": {"name", "version"} | None, "protocol_version", "transport",
    "tools": [{"name", "description", "inputSchema"}], "latency_ms", "error"}`; `latency_ms` covers
    connect + initialize + tools/list. The whole call takes at most about `timeout_s` + 2 s.
    """
    start = time.perf_counter()
    report: dict[str, Any] = {
        "ok": False,
        "server_info": None,
        "protocol_version": None,
        "transport": None,
        "tools": [],
        "latency_ms": None,
        "error": None,
    }
    try:
        conn = _Connection(
            url,
            connect_timeout_s=timeout_s,
            max_result_chars=DEFAULT_MAX_RESULT_CHARS,
            ssl_context=ssl.create_default_context(),
            policy=policy,
        )
        report["transport"] = conn.transport if _check_url(url) is None else None
        try:
            await conn.open()
            report["latency_ms"] = round((time.perf_counter() - start) * 1000, 1)
            if conn.error is not None:
                report["error"] = conn.error
                return report
            report.update(
                ok=True,
                server_info=(
                    None
                    if conn.server_name is None and conn.server_version is None
                    else {"name": conn.server_name, "version": conn.server_version}
                ),
                protocol_version=conn.protocol_version,
                tools=[
                    {"name": t.name, "description": t.description, "inputSchema": dict(t.input_schema or {})}
                    for t in conn.tools
                ],
            )
        finally:
            await conn.close(min(2.0, timeout_s))
    except Exception as e:  # a bug or an SDK surprise must still come back as a diagnostic
        report.update(ok=False, error=f"handshake failed: {_describe(e)}")
    return report


def handshake(
    url: str, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, *, policy: DestinationPolicy = PERMISSIVE
) -> dict[str, Any]:
    """Blocking `handshake_async` for synchronous callers. Async code should await `handshake_async`."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(handshake_async(url, timeout_s, policy=policy))
    # Called on an event-loop thread: a nested asyncio.run is not allowed there, so use a helper thread.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="runrl-mcp-handshake") as pool:
        return pool.submit(asyncio.run, handshake_async(url, timeout_s, policy=policy)).result()


class ToolSession:
    """The MCP sessions of one rollout episode. Create with `ToolRuntime.open_session(s)`.

    Thread-safe: methods may be called from any thread except the runtime's loop thread. `num_calls`
    counts calls the policy made (including failed ones, not those refused by the `max_calls` cap);
    `num_errors` every call that returned an error; `renamed_tools` notes each tool renamed because
    of a name collision.
    """

    def __init__(
        self,
        runtime: ToolRuntime,
        connections: list[_Connection],
        *,
        call_timeout_s: float,
        max_calls: int | None,
        close_timeout_s: float,
    ) -> None:
        self._runtime = runtime
        self._connections = connections
        self._by_url = {conn.url: conn for conn in connections}
        self._specs, self.renamed_tools = _merge_tools(connections)
        self.call_timeout_s = call_timeout_s
        self.max_calls = max_calls
        self.close_timeout_s = close_timeout_s
        self.num_calls = 0
        self.num_errors = 0
        self._closed = False

    @property
    def urls(self) -> list[str]:
        return [conn.url for conn in self._connections]

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connection_errors(self) -> dict[str, str]:
        """URL -> why that server is unavailable (failed to connect, or lost since); empty when all are up."""
        return {conn.url: conn.error for conn in self._connections if conn.error is not None}

    def tools(self) -> list[ToolSpec]:
        """Merged listing of every reachable server, in URL order then server order."""
        return list(self._specs.values())

    def tool_schemas(self) -> list[dict[str, Any]]:
        """OpenAI-style function specs for `apply_chat_template(..., tools=...)`."""
        return render_tool_schemas(self.tools())

    def call(self, name: str, arguments: Mapping[str, Any] | None = None, timeout_s: float | None = None) -> ToolResult:
        """Run one call and wait for its result (at most about `timeout_s` + 0.5 s)."""
        return self._runtime._wait(self.submit(name, arguments, timeout_s), self._bound(timeout_s))

    def submit(
        self, name: str, arguments: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> concurrent.futures.Future[ToolResult]:
        """Start one call on the runtime's loop; the future's result is always a `ToolResult`."""
        return self._runtime._submit(self._acall(name, arguments, timeout_s))

    def close(self) -> None:
        """End this episode's MCP sessions (DELETE on streamable HTTP). Bounded by `close_timeout_s`."""
        if self._closed:
            return
        self._closed = True
        self._runtime._close_sessions([self])

    def __enter__(self) -> ToolSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bound(self, timeout_s: float | None) -> float:
        return (self.call_timeout_s if timeout_s is None else timeout_s) + _TIMEOUT_GRACE_S + 5.0

    async def _acall(self, name: str, arguments: Mapping[str, Any] | None, timeout_s: float | None) -> ToolResult:
        result = await self._dispatch(name, arguments, self.call_timeout_s if timeout_s is None else timeout_s)
        if result.is_error:
            self.num_errors += 1
        return result

    async def _dispatch(self, name: str, arguments: Mapping[str, Any] | None, timeout_s: float) -> ToolResult:
        # Runs on the loop thread only, so the counters need no lock.
        if self._closed:
            return ToolResult("Error: the tool session of this episode is closed", True, "closed")
        if self.max_calls is not None and self.num_calls >= self.max_calls:
            return ToolResult(f"Error: tool call limit reached ({self.max_calls} per episode)", True, "limit")
        self.num_calls += 1
        spec = self._specs.get(name)
        if spec is None:
            available = ", ".join(self._specs) or "none"
            text = f"Error: unknown tool {name!r}; available tools: {available}"
            if errors := self.connection_errors:
                text += "; unavailable tool servers: " + "; ".join(errors.values())
            return ToolResult(text, True, "unknown_tool")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, Mapping):
            return ToolResult(f"Error: arguments of {name!r} must be an object", True, "invalid_arguments")
        return await self._by_url[spec.server_url].call(spec.remote_name, dict(arguments), timeout_s)

    async def _aclose(self) -> None:
        self._closed = True
        await asyncio.gather(*(conn.close(self.close_timeout_s) for conn in self._connections))


class ToolRuntime:
    """One daemon thread with one asyncio loop that all `ToolSession`s of a trainer share.

    Use as a context manager, or call `close()`: it closes every session still open, cancels what is
    left on the loop, stops the loop and joins the thread. Every connection obeys `policy`.
    """

    def __init__(self, *, name: str = "runrl-mcp", policy: DestinationPolicy = PERMISSIVE) -> None:
        self.policy = policy
        self._loop = asyncio.new_event_loop()
        self._sessions: set[ToolSession] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._ssl_context = ssl.create_default_context()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def open_session(
        self,
        urls: Sequence[str],
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        max_calls: int | None = None,
        close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
        max_result_chars: int = DEFAULT_MAX_RESULT_CHARS,
    ) -> ToolSession:
        """One episode's session; see `open_sessions`."""
        return self.open_sessions(
            1,
            urls,
            connect_timeout_s=connect_timeout_s,
            call_timeout_s=call_timeout_s,
            max_calls=max_calls,
            close_timeout_s=close_timeout_s,
            max_result_chars=max_result_chars,
        )[0]

    def open_sessions(
        self,
        n: int,
        urls: Sequence[str],
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        max_calls: int | None = None,
        close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
        max_result_chars: int = DEFAULT_MAX_RESULT_CHARS,
    ) -> list[ToolSession]:
        """Open `n` independent sessions (one per episode) to every URL, all connecting concurrently.

        Never raises for a server that is down: that session's `connection_errors` says why and calls to
        its tools return errors. Returns within about `connect_timeout_s` + 2 s.
        """
        if self._closed:
            raise RuntimeError("ToolRuntime is closed")
        unique_urls = list(dict.fromkeys(urls))

        async def open_all() -> list[list[_Connection]]:
            groups = [
                [
                    _Connection(
                        url,
                        connect_timeout_s=connect_timeout_s,
                        max_result_chars=max_result_chars,
                        ssl_context=self._ssl_context,
                        policy=self.policy,
                    )
                    for url in unique_urls
                ]
                for _ in range(n)
            ]
            await asyncio.gather(*(conn.open() for group in groups for conn in group))
            return groups

        groups = self._submit(open_all()).result()
        sessions = [
            ToolSession(
                self, group, call_timeout_s=call_timeout_s, max_calls=max_calls, close_timeout_s=close_timeout_s
            )
            for group in groups
        ]
        with self._lock:
            self._sessions.update(sessions)
        # One line per distinct problem, not one per episode: a down server would otherwise log n lines.
        problems: dict[str, int] = {}
        for session in sessions:
            for note in [*session.connection_errors.values(), *session.renamed_tools]:
                problems[note] = problems.get(note, 0) + 1
        for note, count in problems.items():
            logger.warning("MCP (%d of %d sessions): %s", count, n, note)
        return sessions

    def call_many(
        self, calls: Iterable[tuple[ToolSession, str, Mapping[str, Any] | None]], timeout_s: float | None = None
    ) -> list[ToolResult]:
        """Run calls from several episodes concurrently; results in the order given."""
        pending = [(session, session.submit(name, arguments, timeout_s)) for session, name, arguments in calls]
        return [self._wait(future, session._bound(timeout_s)) for session, future in pending]

    def close(self, timeout_s: float = 10.0) -> None:
        """Close all open sessions, stop the loop and join its thread. Idempotent."""
        if self._closed:
            return
        with self._lock:
            sessions = list(self._sessions)
        self._close_sessions(sessions, timeout_s)
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=5.0)
        except Exception as e:  # noqa: BLE001 - shutdown is best effort; the thread is a daemon
            logger.warning("MCP runtime shutdown was not clean: %s", _describe(e))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> ToolRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        if threading.get_ident() == self._thread.ident:
            coro.close()
            raise RuntimeError("ToolRuntime methods must not be called from its own event-loop thread")
        if self._closed or not self._thread.is_alive():
            coro.close()
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            future.set_result(ToolResult("Error: the tool runtime is closed", True, "closed"))
            return future
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _wait(self, future: concurrent.futures.Future[ToolResult], bound_s: float) -> ToolResult:
        # The coroutine is bounded by its own timeout; this bound only guards against a bug in that.
        try:
            return future.result(timeout=bound_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return ToolResult("Error: tool call did not finish", True, "timeout")
        except Exception as e:  # noqa: BLE001 - the model must get a message, never the trainer an exception
            return ToolResult(f"Error: tool call failed: {_describe(e)}", True, "server_error")

    def _close_sessions(self, sessions: list[ToolSession], timeout_s: float | None = None) -> None:
        with self._lock:
            self._sessions.difference_update(sessions)
        live = [s for s in sessions if s._connections]
        if not live or self._closed:
            return
        bound = timeout_s if timeout_s is not None else max(s.close_timeout_s for s in live) + 2.0

        async def close_all() -> None:
            await asyncio.gather(*(s._aclose() for s in live))

        try:
            self._submit(close_all()).result(timeout=bound + 1.5)
        except Exception as e:  # noqa: BLE001 - closing must not take the trainer down
            logger.warning("MCP: closing %d session(s) did not finish: %s", len(live), _describe(e))

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        await self._loop.shutdown_asyncgens()
        await self._loop.shutdown_default_executor()
