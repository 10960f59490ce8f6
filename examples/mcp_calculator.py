"""A small calculator MCP server, built with the official `mcp` SDK (2.x `MCPServer`).

Run it, then point a run's `tools:` at the URL it prints:

    python examples/mcp_calculator.py --port 8765                  # http://127.0.0.1:8765/mcp
    python examples/mcp_calculator.py --port 8765 --transport sse  # http://127.0.0.1:8765/sse
    python examples/mcp_calculator.py --port 8765 --tools add      # serve only `add`

Tools: `add(a, b)`, `multiply(a, b)`, `evaluate(expression)` (arithmetic only: the expression is parsed
into a Python AST and only numbers, + - * / // % ** and parentheses are evaluated; nothing is `eval`ed),
`sleep(seconds)` (for timeout tests), and two stateful tools, `remember(value)` / `recall()`, whose memory
belongs to the MCP session. The trainer opens one MCP session per rollout episode, so one episode never
sees what another remembered.

Session state is keyed by the `Mcp-Session-Id` header (streamable HTTP, created by the `initialize`
handshake) or the `session_id` query parameter (SSE). Clients on the sessionless 2026-07-28 protocol
era carry neither; the stateful tools then return an error saying so. Memory is kept in-process and is
never expired: fine for an example, not for a long-lived public server. No authentication (RunRL's
tools are unauthenticated).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import math
import operator
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 1000
MAX_SLEEP_S = 60.0
MAX_MEMORY_ITEMS = 1000

_BINARY_OPS: dict[type[ast.operator], Any] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type[ast.unaryop], Any] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate_arithmetic(expression: str) -> float | int:
    """Evaluate `+ - * / // % **` over int/float literals; raise ValueError on anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None
    return _eval_node(tree.body)


def _eval_node(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_eval_node(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent larger than {MAX_EXPONENT}")
        try:
            result = _BINARY_OPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("result too large") from None
        if isinstance(result, complex) or (isinstance(result, float) and not math.isfinite(result)):
            raise ValueError("result is not a finite real number")
        return result
    raise ValueError(f"unsupported syntax: {type(node).__name__} (only numbers and + - * / // % ** allowed)")


def _session_key(ctx: Context) -> str:
    headers = ctx.headers or {}
    key = headers.get("mcp-session-id")
    request = ctx.request_context.request
    if key is None and request is not None:
        key = getattr(request, "query_params", {}).get("session_id")
    if not key:
        raise ToolError(
            "this tool keeps per-session state but the connection has no MCP session "
            "(connect with the initialize handshake, e.g. mcp.Client(url, mode='legacy'))"
        )
    return key


def build_server(only: list[str] | None = None) -> MCPServer:
    """The calculator server; state lives in this closure, so every server instance starts empty.
    `only` keeps just the named tools (every tool schema is rendered into the model's prompt)."""
    server = MCPServer("runrl-calculator", version="1.0", log_level="WARNING")
    memory: dict[str, list[str]] = {}

    @server.tool()
    def add(a: float, b: float) -> float:
        """Add two numbers and return a + b."""
        return a + b

    @server.tool()
    def multiply(a: float, b: float) -> float:
        """Multiply two numbers and return a * b."""
        return a * b

    @server.tool()
    def evaluate(expression: str) -> str:
        """Evaluate an arithmetic expression with + - * / // % ** and parentheses, e.g. "(2 + 3) * 4"."""
        try:
            return str(evaluate_arithmetic(expression))
        except ValueError as e:
            raise ToolError(f"cannot evaluate {expression!r}: {e}") from None

    @server.tool()
    async def sleep(seconds: float) -> str:
        """Wait `seconds` (at most 60) before answering; for testing client timeouts."""
        await asyncio.sleep(max(0.0, min(float(seconds), MAX_SLEEP_S)))
        return f"slept {seconds} s"

    @server.tool()
    def remember(value: str, ctx: Context) -> str:
        """Store `value` in this session's memory (other sessions cannot see it)."""
        items = memory.setdefault(_session_key(ctx), [])
        if len(items) >= MAX_MEMORY_ITEMS:
            raise ToolError(f"memory is full ({MAX_MEMORY_ITEMS} items)")
        items.append(value)
        return f"remembered {len(items)} item(s)"

    @server.tool()
    def recall(ctx: Context) -> str:
        """Return everything remembered in this session, as a JSON list."""
        return json.dumps(memory.get(_session_key(ctx), []))

    if only:
        known = {t.name for t in server._tool_manager.list_tools()}
        unknown = sorted(set(only) - known)
        if unknown:
            raise SystemExit(f"unknown tool(s) {unknown}; choose from {sorted(known)}")
        for name in known - set(only):
            server.remove_tool(name)
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--transport", choices=["streamable-http", "sse"], default="streamable-http")
    parser.add_argument("--tools", help="comma-separated subset of tools to serve, e.g. add,multiply")
    args = parser.parse_args(argv)
    server = build_server(args.tools.split(",") if args.tools else None)
    path = "/mcp" if args.transport == "streamable-http" else "/sse"
    print(f"serving MCP ({args.transport}) at http://{args.host}:{args.port}{path}", flush=True)
    if args.transport == "sse":
        server.run("sse", host=args.host, port=args.port)
    else:
        server.run("streamable-http", host=args.host, port=args.port)


if __name__ == "__main__":
    main()
