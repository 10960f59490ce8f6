"""Tool calling for rollouts: Hermes/Qwen tool-call parsing (`parsing`), MCP servers (`mcp_client`), and tool
schemas for chat templates that ignore `tools` (`template`).

Only the dependency-free parsing helpers are re-exported here; import `runrl_engine.tools.mcp_client`
explicitly for the MCP client, so that importing this package does not import the `mcp` SDK.
"""

from runrl_engine.tools.parsing import (
    ParsedToolCalls,
    ToolCall,
    ToolCallError,
    format_parse_error,
    format_tool_call,
    parse_tool_calls,
    render_tool_schema,
    render_tool_schemas,
    tool_message,
)

__all__ = [
    "ParsedToolCalls",
    "ToolCall",
    "ToolCallError",
    "format_parse_error",
    "format_tool_call",
    "parse_tool_calls",
    "render_tool_schema",
    "render_tool_schemas",
    "tool_message",
]
