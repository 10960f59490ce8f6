"""Tool-call parsing, schema rendering and the MCP client against real servers on loopback.

The servers are `examples/mcp_calculator.py` run as subprocesses (streamable HTTP and SSE), so the test
exercises the shipped example and the official SDK on both ends.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runrl_engine.tools.parsing import (
    ToolCall,
    format_tool_call,
    parse_tool_calls,
    render_tool_schema,
    render_tool_schemas,
    tool_message,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mcp_calculator.py"


# ---------------------------------------------------------------- parsing


def test_parse_one_call():
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    calls, errors = parse_tool_calls(text)
    assert errors == []
    assert calls == [ToolCall("add", {"a": 1, "b": 2}, text[text.index("<tool_call>") :])]


def test_parse_several_calls_in_order():
    text = (
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> and '
        '<tool_call>\n{"name": "recall", "arguments": {}}\n</tool_call>'
        '<tool_call>{"name": "multiply", "arguments": {"a": 3, "b": 4}}</tool_call>'
    )
    calls, errors = parse_tool_calls(text)
    assert errors == []
    assert [(c.name, c.arguments) for c in calls] == [
        ("add", {"a": 1, "b": 2}),
        ("recall", {}),
        ("multiply", {"a": 3, "b": 4}),
    ]


def test_parse_string_arguments_and_missing_arguments():
    text = (
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 5, \\"b\\": 6}"}</tool_call>'
        '<tool_call>{"name": "recall"}</tool_call>'
        '<tool_call>{"name": "evaluate", "parameters": {"expression": "1+1"}}</tool_call>'
    )
    calls, errors = parse_tool_calls(text)
    assert errors == []
    assert [(c.name, c.arguments) for c in calls] == [
        ("add", {"a": 5, "b": 6}),
        ("recall", {}),
        ("evaluate", {"expression": "1+1"}),
    ]


def test_parse_round_trips_format_tool_call():
    calls, errors = parse_tool_calls(format_tool_call("evaluate", {"expression": "(2 + 3) * 4"}))
    assert errors == [] and calls[0].name == "evaluate" and calls[0].arguments == {"expression": "(2 + 3) * 4"}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('{"name": "add", "arguments": {"a": 1,}}', "not valid JSON"),
        ('{"arguments": {"a": 1}}', '"name"'),
        ('{"name": "", "arguments": {}}', '"name"'),
        ('{"name": "add", "arguments": [1, 2]}', "must be a JSON object, got list"),
        ('{"name": "add", "arguments": "not json"}', "not valid JSON"),
        ('["add", {"a": 1}]', "must be a JSON object, got list"),
        ("", "empty tool call"),
    ],
)
def test_parse_malformed_block_is_an_error_not_an_exception(body, fragment):
    text = f"<tool_call>{body}</tool_call>"
    calls, errors = parse_tool_calls(text)
    assert calls == []
    assert len(errors) == 1 and fragment in errors[0].message and errors[0].raw == text


def test_parse_unclosed_tag_does_not_swallow_the_next_call():
    text = '<tool_call>{"name": "add", "arguments": {}}\n<tool_call>{"name": "recall", "arguments": {}}</tool_call>'
    calls, errors = parse_tool_calls(text)
    assert [c.name for c in calls] == ["recall"]
    assert len(errors) == 1 and "unclosed" in errors[0].message

    calls, errors = parse_tool_calls('thinking... <tool_call>{"name": "add", "argu')
    assert calls == [] and len(errors) == 1 and "unclosed" in errors[0].message


def test_parse_plain_text_and_stray_closing_tag():
    assert parse_tool_calls("The answer is 4.") == ([], [])
    calls, errors = parse_tool_calls("done </tool_call>")
    assert calls == [] and len(errors) == 1 and "without a matching" in errors[0].message


def test_tool_message_shape():
    assert tool_message("3.0", name="add") == {"role": "tool", "content": "3.0", "name": "add"}


# ---------------------------------------------------------------- schema rendering


def test_render_mcp_tool_and_mapping_to_openai_function_spec():
    from mcp.types import Tool

    schema = {"type": "object", "properties": {"a": {"type": "number"}}, "required": ["a"]}
    tool = Tool(name="neg", description="Negate a.", input_schema=schema)
    expected = {"type": "function", "function": {"name": "neg", "description": "Negate a.", "parameters": schema}}
    assert render_tool_schema(tool) == expected
    assert render_tool_schema({"name": "neg", "description": "Negate a.", "inputSchema": schema}) == expected
    # No description and no schema still give what templates expect: a string and an object schema.
    empty = {"type": "object", "properties": {}}
    assert render_tool_schemas([{"name": "ping"}]) == [
        {"type": "function", "function": {"name": "ping", "description": "", "parameters": empty}}
    ]


# ---------------------------------------------------------------- example server helpers


def _load_example():
    spec = importlib.util.spec_from_file_location("mcp_calculator_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_evaluate_is_arithmetic_only():
    module = _load_example()
    assert module.evaluate_arithmetic("(2 + 3) * 4 ** 2 - 7 // 2") == 77
    for bad in ["__import__('os').system('true')", "a + 1", "2 ** 100000", "1 / 0", "[1][0]", "(1).real"]:
        with pytest.raises(ValueError):
            module.evaluate_arithmetic(bad)


# ---------------------------------------------------------------- live servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout_s: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server for port {port} exited before accepting connections")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start in {timeout_s} s")


class _ExampleProcess:
    """`python examples/mcp_calculator.py --port P`: the shipped command line, in a process we can kill."""

    def __init__(self, transport: str = "streamable-http") -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}{'/sse' if transport == 'sse' else '/mcp'}"
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--port", str(self.port), "--transport", transport],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_ready(self) -> None:
        _wait_for_port(self.port, 30.0, alive=lambda: self.proc.poll() is None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


class _InThreadServers:
    """The example's apps (streamable HTTP and SSE) under uvicorn on one background thread.

    In-process because each extra process pays ~2 s of CPU importing the SDK; only servers a test kills
    need their own process.
    """

    def __init__(self) -> None:
        import asyncio

        import uvicorn

        example = _load_example()
        self.ports = {"http": _free_port(), "sse": _free_port()}
        self.urls = {
            "http": f"http://127.0.0.1:{self.ports['http']}/mcp",
            "sse": f"http://127.0.0.1:{self.ports['sse']}/sse",
        }
        apps = {"http": example.build_server().streamable_http_app(), "sse": example.build_server().sse_app()}
        self.servers = [
            uvicorn.Server(uvicorn.Config(apps[k], host="127.0.0.1", port=self.ports[k], log_level="warning"))
            for k in ("http", "sse")
        ]

        async def serve_all() -> None:
            await asyncio.gather(*(server.serve() for server in self.servers))

        self.thread = threading.Thread(target=asyncio.run, args=(serve_all(),), name="test-mcp-servers", daemon=True)
        self.thread.start()

    def wait_ready(self) -> None:
        for port in self.ports.values():
            _wait_for_port(port, 30.0, alive=self.thread.is_alive)

    def stop(self) -> None:
        for server in self.servers:
            server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class _Servers:
    http: str  # streamable HTTP URL of a long-lived server
    sse: str  # SSE URL of a long-lived server
    doomed: dict[str, _ExampleProcess]  # servers a test may kill, by transport


@pytest.fixture(scope="module")
def servers() -> Iterator[_Servers]:
    # Everything starts at once so the SDK imports overlap.
    doomed = {"streamable-http": _ExampleProcess(), "sse": _ExampleProcess("sse")}
    local = _InThreadServers()
    try:
        local.wait_ready()
        for process in doomed.values():
            process.wait_ready()
        yield _Servers(http=local.urls["http"], sse=local.urls["sse"], doomed=doomed)
    finally:
        for process in doomed.values():
            process.stop()
        local.stop()


@pytest.fixture(scope="module")
def runtime():
    from runrl_engine.tools.mcp_client import ToolRuntime

    rt = ToolRuntime()
    yield rt
    rt.close()


def test_detect_transport():
    from runrl_engine.tools.mcp_client import detect_transport

    assert detect_transport("http://h:1/mcp") == "streamable-http"
    assert detect_transport("https://h/sse") == "sse"
    assert detect_transport("https://h/v1/sse/?x=1") == "sse"
    assert detect_transport("https://h/") == "streamable-http"


def test_handshake_reports_server_protocol_and_tools(servers):
    from runrl_engine.tools.mcp_client import handshake

    report = handshake(servers.http, timeout_s=10)
    assert report["ok"] is True and report["error"] is None
    assert report["server_info"] == {"name": "runrl-calculator", "version": "1.0"}
    assert report["protocol_version"] == "2025-11-25"  # the initialize handshake, which gives sessions
    assert report["transport"] == "streamable-http"
    tools = {t["name"]: t for t in report["tools"]}
    assert {"add", "multiply", "evaluate", "sleep", "remember", "recall"} <= set(tools)
    assert tools["add"]["description"].startswith("Add two numbers")
    assert tools["add"]["inputSchema"]["required"] == ["a", "b"]
    assert 0 < report["latency_ms"] < 10_000


def test_handshake_closed_port_and_bad_url_fail_fast_without_raising():
    from runrl_engine.tools.mcp_client import handshake

    start = time.monotonic()
    report = handshake(f"http://127.0.0.1:{_free_port()}/mcp", timeout_s=5)
    assert time.monotonic() - start < 3.0
    assert report["ok"] is False and report["tools"] == [] and "could not complete an MCP handshake" in report["error"]

    report = handshake("ftp://example/mcp")
    assert report["ok"] is False and "http(s)" in report["error"]


def test_handshake_from_inside_an_event_loop(servers):
    import asyncio

    from runrl_engine.tools.mcp_client import handshake, handshake_async

    async def both():
        return handshake(servers.http), await handshake_async(servers.sse)

    sync_report, async_report = asyncio.run(both())
    assert sync_report["ok"] and async_report["ok"] and async_report["transport"] == "sse"


def test_session_calls_tools_and_schemas_render(servers, runtime):
    with runtime.open_session([servers.http], call_timeout_s=10) as session:
        assert session.connection_errors == {}
        names = [spec["function"]["name"] for spec in session.tool_schemas()]
        assert {"add", "multiply", "evaluate", "remember", "recall"} <= set(names)
        assert session.call("add", {"a": 2, "b": 3}).text == "5.0"
        assert session.call("multiply", {"a": 2.5, "b": 4}).text == "10.0"
        assert session.call("evaluate", {"expression": "(2 + 3) * 4"}).text == "20"
        bad = session.call("evaluate", {"expression": "__import__('os')"})
        assert bad.is_error and bad.error_type == "tool_error" and "unsupported syntax" in bad.text
        invalid = session.call("add", {"a": "x"})
        assert invalid.is_error and invalid.error_type == "tool_error"
        assert session.num_calls == 5 and session.num_errors == 2


def test_sessions_keep_separate_state(servers, runtime):
    first, second = runtime.open_sessions(2, [servers.http])
    try:
        assert not first.call("remember", {"value": "apple"}).is_error
        assert not second.call("remember", {"value": "pear"}).is_error
        assert not first.call("remember", {"value": "fig"}).is_error
        assert first.call("recall").text == '["apple", "fig"]'
        assert second.call("recall").text == '["pear"]'
    finally:
        first.close()
        second.close()
    with runtime.open_session([servers.http]) as fresh:  # a new episode starts empty
        assert fresh.call("recall").text == "[]"


def test_unknown_tool_bad_arguments_and_call_cap(servers, runtime):
    with runtime.open_session([servers.http], max_calls=3) as session:
        unknown = session.call("subtract", {"a": 1, "b": 2})
        assert unknown.is_error and unknown.error_type == "unknown_tool"
        assert "'subtract'" in unknown.text and "add" in unknown.text
        wrong = session.call("add", ["not", "an", "object"])
        assert wrong.is_error and wrong.error_type == "invalid_arguments"
        assert session.call("add", {"a": 1, "b": 1}).text == "2.0"
        capped = session.call("add", {"a": 1, "b": 1})
        assert capped.is_error and capped.error_type == "limit" and "3 per episode" in capped.text
        assert session.num_calls == 3 and session.num_errors == 3


def test_timeout_is_an_error_within_the_timeout(servers, runtime):
    with runtime.open_session([servers.http], call_timeout_s=0.5) as session:
        start = time.monotonic()
        result = session.call("sleep", {"seconds": 5})
        elapsed = time.monotonic() - start
        assert result.is_error and result.error_type == "timeout" and "timed out after 0.5 s" in result.text
        assert 0.45 < elapsed < 2.0
        # The session survives a timed-out call.
        assert session.call("add", {"a": 1, "b": 2}, timeout_s=5).text == "3.0"


def test_concurrent_calls_from_16_sessions(servers, runtime):
    sessions = runtime.open_sessions(16, [servers.http], call_timeout_s=10)
    try:
        results = runtime.call_many([(s, "remember", {"value": f"episode-{i}"}) for i, s in enumerate(sessions)])
        assert all(not r.is_error for r in results)
        start = time.monotonic()
        slept = runtime.call_many([(s, "sleep", {"seconds": 1}) for s in sessions])
        elapsed = time.monotonic() - start
        assert all(r.text == "slept 1.0 s" for r in slept), slept
        assert elapsed < 8.0, f"16 x 1 s calls took {elapsed:.1f} s: not concurrent"  # serial would be 16 s
        recalls = runtime.call_many([(s, "recall", None) for s in sessions])
        assert [r.text for r in recalls] == [f'["episode-{i}"]' for i in range(16)]
    finally:
        start = time.monotonic()
        for session in sessions:
            session.close()
        assert time.monotonic() - start < 5.0


def test_sse_transport_session_and_state(servers, runtime):
    first, second = runtime.open_sessions(2, [servers.sse])
    try:
        assert first.connection_errors == {}
        assert first.call("add", {"a": 40, "b": 2}).text == "42.0"
        first.call("remember", {"value": "sse-state"})
        assert first.call("recall").text == '["sse-state"]'
        assert second.call("recall").text == "[]"
    finally:
        first.close()
        second.close()


def test_name_collisions_across_servers_are_renamed_and_routed(servers, runtime):
    urls = [servers.http, servers.sse, servers.http]  # duplicate URL connects once
    with runtime.open_session(urls) as session:
        specs = {spec.name: spec for spec in session.tools()}
        assert specs["add"].server_url == servers.http
        renamed = specs["runrl-calculator__remember"]
        assert renamed.server_url == servers.sse and renamed.remote_name == "remember"
        assert len(session.renamed_tools) == len(specs) // 2
        session.call("runrl-calculator__remember", {"value": "on-sse"})
        assert session.call("recall").text == "[]"  # the http server's memory
        assert session.call("runrl-calculator__recall").text == '["on-sse"]'


def test_server_down_at_open_gives_error_results(runtime):
    url = f"http://127.0.0.1:{_free_port()}/mcp"
    start = time.monotonic()
    session = runtime.open_session([url], connect_timeout_s=5)
    assert time.monotonic() - start < 3.0
    assert session.tools() == [] and url in session.connection_errors
    result = session.call("add", {"a": 1, "b": 2})
    assert result.is_error and result.error_type == "unknown_tool" and "could not complete an MCP handshake" in result.text
    session.close()


@pytest.mark.parametrize("transport", ["streamable-http", "sse"])
def test_server_killed_mid_episode(servers, runtime, transport):
    process = servers.doomed[transport]
    sessions = runtime.open_sessions(2, [process.url], call_timeout_s=5)
    assert sessions[0].call("add", {"a": 1, "b": 1}).text == "2.0"
    in_flight = sessions[1].submit("sleep", {"seconds": 30})
    time.sleep(0.3)
    process.stop()
    start = time.monotonic()
    result = sessions[0].call("add", {"a": 1, "b": 1})
    assert result.is_error and result.error_type == "connection", result
    interrupted = in_flight.result(timeout=10)
    assert interrupted.is_error and interrupted.error_type in ("connection", "timeout"), interrupted
    assert time.monotonic() - start < 6.0
    start = time.monotonic()
    for session in sessions:
        session.close()
    assert time.monotonic() - start < 3.0


def test_runtime_close_joins_its_thread_and_later_calls_are_errors(servers):
    from runrl_engine.tools.mcp_client import ToolRuntime

    before = {t.ident for t in threading.enumerate()}
    rt = ToolRuntime()
    session = rt.open_session([servers.http])
    assert session.call("add", {"a": 1, "b": 1}).text == "2.0"
    start = time.monotonic()
    rt.close()  # closes the still-open session too
    assert time.monotonic() - start < 5.0
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert leaked == []
    assert session.closed
    late = session.call("add", {"a": 1, "b": 1})
    assert late.is_error and late.error_type == "closed"
