"""Tool calls in model text, tool results as chat messages, tool schemas for chat templates.

What it is for: the multi-turn rollout loop hands each assistant turn's decoded text to
`parse_tool_calls`, executes the calls (see `mcp_client`), and appends each result with
`tool_message`. `render_tool_schemas` turns MCP tool listings into the OpenAI-style function specs that
Qwen/Hermes chat templates take as `apply_chat_template(..., tools=...)`.

Format: Qwen2.5/Qwen3 and Hermes models write one block per call,

    <tool_call>
    {"name": "add", "arguments": {"a": 1, "b": 2}}
    </tool_call>

possibly several per turn. `arguments` may be an object or a JSON string encoding one (some models
double-encode); `parameters` is accepted as an alias, and a missing/empty `arguments` means `{}`.

Model output is untrusted: nothing here raises on it. Every malformed block (bad JSON, no `name`,
non-object arguments, unclosed tag, stray closing tag) becomes a `ToolCallError` that the loop can count
(`tool_errors`) and report back to the model as an error tool message.

Not covered: other tool-call dialects (Llama `<|python_tag|>`, Mistral `[TOOL_CALLS]`, OpenAI
`tool_calls` fields) and the chat templates themselves (`template` fixes templates that ignore `tools`); no
imports beyond the standard library.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """One well-formed call. `raw` is the whole block as written, tags included (for logs)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    raw: str = ""


@dataclass(frozen=True)
class ToolCallError:
    """One malformed block: what is wrong (`message`, written for the model to read) and the text."""

    message: str
    raw: str = ""


class ParsedToolCalls(NamedTuple):
    """`calls, errors = parse_tool_calls(text)`; both in the order they appear."""

    calls: list[ToolCall]
    errors: list[ToolCallError]


def parse_tool_calls(text: str) -> ParsedToolCalls:
    """Find every `<tool_call>...</tool_call>` block in `text` and parse it; never raises.

    An opening tag followed by another opening tag before any closing tag counts as unclosed, and parsing
    resumes at the second one, so one bad block does not swallow the good ones after it.
    """
    calls: list[ToolCall] = []
    errors: list[ToolCallError] = []
    if not isinstance(text, str):
        return ParsedToolCalls(calls, [ToolCallError(f"expected text, got {type(text).__name__}")])
    pos = 0
    while True:
        start = text.find(TOOL_CALL_OPEN, pos)
        stray = text.find(TOOL_CALL_CLOSE, pos)
        if stray != -1 and (start == -1 or stray < start):
            message = f"found {TOOL_CALL_CLOSE} without a matching {TOOL_CALL_OPEN}"
            errors.append(ToolCallError(message, TOOL_CALL_CLOSE))
            pos = stray + len(TOOL_CALL_CLOSE)
            continue
        if start == -1:
            break
        body_start = start + len(TOOL_CALL_OPEN)
        end = text.find(TOOL_CALL_CLOSE, body_start)
        next_open = text.find(TOOL_CALL_OPEN, body_start)
        if end == -1 or (next_open != -1 and next_open < end):
            stop = len(text) if next_open == -1 else next_open
            errors.append(ToolCallError(f"unclosed {TOOL_CALL_OPEN} tag (no {TOOL_CALL_CLOSE})", text[start:stop]))
            if next_open == -1:
                break
            pos = next_open
            continue
        raw = text[start : end + len(TOOL_CALL_CLOSE)]
        parsed = _parse_body(text[body_start:end], raw)
        (calls if isinstance(parsed, ToolCall) else errors).append(parsed)
        pos = end + len(TOOL_CALL_CLOSE)
    return ParsedToolCalls(calls, errors)


def _parse_body(body: str, raw: str) -> ToolCall | ToolCallError:
    body = _strip_code_fence(body.strip())
    if not body:
        return ToolCallError("empty tool call: expected a JSON object with name and arguments", raw)
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError) as e:
        msg = getattr(e, "msg", "nesting too deep")
        return ToolCallError(f"tool call is not valid JSON: {msg}", raw)
    if not isinstance(obj, dict):
        return ToolCallError(f"tool call must be a JSON object, got {type(obj).__name__}", raw)
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return ToolCallError('tool call has no "name" (a non-empty string)', raw)
    args: Any = obj.get("arguments", obj.get("parameters"))
    if args is None or (isinstance(args, str) and not args.strip()):
        args = {}
    elif isinstance(args, str):
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            return ToolCallError(f'"arguments" of {name!r} is a string that is not valid JSON', raw)
    if not isinstance(args, dict):
        return ToolCallError(f'"arguments" of {name!r} must be a JSON object, got {type(args).__name__}', raw)
    return ToolCall(name=name.strip(), arguments=args, raw=raw)


def _strip_code_fence(body: str) -> str:
    # Models fine-tuned on markdown sometimes wrap the JSON in ```json ... ``` inside the tags.
    if body.startswith("```") and body.endswith("```") and len(body) >= 6:
        inner = body[3:-3]
        newline = inner.find("\n")
        if newline != -1 and not inner[:newline].strip().startswith("{"):
            inner = inner[newline + 1 :]
        return inner.strip()
    return body


def format_tool_call(name: str, arguments: Mapping[str, Any] | None = None) -> str:
    """The block a model should write to call `name` (used by SFT data and tests); inverse of parsing."""
    payload = json.dumps({"name": name, "arguments": dict(arguments or {})}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{payload}\n{TOOL_CALL_CLOSE}"


def format_parse_error(error: ToolCallError) -> str:
    """Error text to send back to the model for a malformed block."""
    return f"Error: could not parse tool call: {error.message}"


def tool_message(content: str, *, name: str | None = None) -> dict[str, Any]:
    """A `{"role": "tool", ...}` chat message; Qwen templates wrap it in `<tool_response>` tags."""
    message: dict[str, Any] = {"role": "tool", "content": content}
    if name is not None:
        message["name"] = name
    return message


def render_tool_schema(tool: Any) -> dict[str, Any]:
    """One MCP tool -> `{"type": "function", "function": {"name", "description", "parameters"}}`.

    Accepts an `mcp.types.Tool`, a `mcp_client.ToolSpec`, or a mapping with `name`, `description` and
    `inputSchema` (or `input_schema`). A missing or non-object schema becomes an empty object schema,
    because templates and models expect `parameters` to describe a JSON object.
    """
    if isinstance(tool, Mapping):
        name = tool.get("name")
        description = tool.get("description")
        schema = tool.get("inputSchema", tool.get("input_schema", tool.get("parameters")))
    else:
        name = getattr(tool, "name", None)
        description = getattr(tool, "description", None)
        schema = getattr(tool, "input_schema", None)
        if schema is None:
            schema = getattr(tool, "inputSchema", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool has no name: {tool!r}")
    parameters = dict(schema) if isinstance(schema, Mapping) else {}
    if parameters.get("type") != "object":
        parameters = {"type": "object", "properties": {}, **{k: v for k, v in parameters.items() if k != "type"}}
    parameters.setdefault("properties", {})
    return {
        "type": "function",
        "function": {"name": name, "description": description or "", "parameters": parameters},
    }


def render_tool_schemas(tools: Iterable[Any]) -> list[dict[str, Any]]:
    """`render_tool_schema` over a listing, for `tokenizer.apply_chat_template(messages, tools=...)`."""
    return [render_tool_schema(tool) for tool in tools]
