"""Tool schemas for chat templates that ignore `tools`: a Jinja prefix that writes them into the system turn.

What it is for: the trainer renders MCP tool schemas into every prompt with
`apply_chat_template(messages, tools=...)`. Many chat templates (SmolLM2's plain ChatML, Llama 2, most base
models' fallbacks) silently drop that argument, so the model would never see the tools it is rewarded for
calling. `template_renders_tools(tokenizer)` finds out by rendering a probe tool; `add_tool_prompt(tokenizer)`
then prepends `TOOL_PROMPT_PREFIX` to `tokenizer.chat_template`, so every caller of that tokenizer (rollout
prompts, SFT through TRL, the exported `final/` tokenizer) renders the tools the same way.

What the prefix does, only when `tools` is given and non-empty: it builds a tools prompt in the Hermes/Qwen
convention that `parsing.parse_tool_calls` reads (a `<tools>` block with one JSON schema per line, then how to
write `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks), appends it to the first message when
that is a system message (after a blank line), or else inserts it as a new first system message, and then
hands the original template that conversation with `tools` set to none — exactly the context it gets when
called without tools. Without tools it emits nothing and changes nothing, so the render is byte-identical to
the original template's. The system turn depends only on the first message and the tools, so the template
keeps the prefix property `ChatRenderer.continuation_ids` needs, if the original has it.

Not covered: assistant messages that carry structured `tool_calls` instead of `<tool_call>` text, and
`tool` messages beyond however the original template renders a message of that role (SmolLM2's ChatML
writes `<|im_start|>tool`); a first system message's keys other than `role` and `content` (dropped when the
tools prompt is merged in); templates that do render tools, in whatever format (left unchanged); a template
shipped as named variants (a dict) is patched in its `default` variant only.
"""

from __future__ import annotations

from typing import Any

# A name no real template or tool would contain: seeing it in the render proves the template used `tools`.
PROBE_TOOL_NAME = "runrl_probe_tool_4c1e9b27"
_PROBE_TOOLS = [{"type": "function", "function": {"name": PROBE_TOOL_NAME, "description": "Probe.",
                                                  "parameters": {"type": "object", "properties": {}}}}]

# Written for this project (not any model's own prose), in the shape Hermes/Qwen-tuned models were trained on.
_TOOLS_HEADER = ("# Tools\\n\\nYou can call the functions described below to help with the request. "
                 "Each line between <tools> and </tools> is the JSON schema of one function:\\n<tools>\\n")
_TOOLS_FOOTER = ("\\n</tools>\\n\\nTo call a function, write a block of this form, one block per call "
                 "(several blocks are fine):\\n<tool_call>\\n"
                 '{\\"name\\": \\"function_name\\", \\"arguments\\": {\\"argument_name\\": \\"value\\"}}\\n'
                 "</tool_call>\\nThe result of each call comes back to you in the next message.")

# Emits nothing: it only rebinds `messages` and `tools` at template level (an `if` opens no scope in Jinja), which
# the original template appended after it then reads. Every tag strips the whitespace before it, and the final
# newline is eaten by `trim_blocks` (transformers' setting), so the original starts at a fresh source line and its
# own `lstrip_blocks` / leading text behave exactly as when it stands alone.
TOOL_PROMPT_PREFIX = (
    "{%- if tools %}\n"
    "    {%- set runrl_tools_prompt = '" + _TOOLS_HEADER + "' + (tools | map('tojson') | join('\\n')) + '"
    + _TOOLS_FOOTER + "' %}\n"
    "    {%- if messages and messages[0]['role'] == 'system' %}\n"
    "        {%- set runrl_first = messages[0]['content'] %}\n"
    "        {%- if runrl_first is string and runrl_first %}\n"
    "            {%- set runrl_first = runrl_first + '\\n\\n' + runrl_tools_prompt %}\n"
    "        {%- elif runrl_first is iterable and runrl_first is not string and runrl_first is not mapping %}\n"
    "            {%- set runrl_first = runrl_first + [{'type': 'text', 'text': '\\n\\n' + runrl_tools_prompt}] %}\n"
    "        {%- else %}\n"
    "            {%- set runrl_first = runrl_tools_prompt %}\n"
    "        {%- endif %}\n"
    "        {%- set messages = [{'role': 'system', 'content': runrl_first}] + messages[1:] %}\n"
    "    {%- else %}\n"
    "        {%- set messages = [{'role': 'system', 'content': runrl_tools_prompt}] + messages %}\n"
    "    {%- endif %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
)


def template_renders_tools(tokenizer: Any) -> bool:
    """True when `tokenizer`'s chat template writes the `tools` it is given into the prompt.

    Renders a one-message conversation with a probe tool and looks for the probe's name. A template that fails
    on the probe (no template, or one that rejects `tools`) counts as not rendering them."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello."}], tools=_PROBE_TOOLS,
                                             add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - any failure means the tools would not reach the model
        return False
    return isinstance(text, str) and PROBE_TOOL_NAME in text


def add_tool_prompt(tokenizer: Any) -> bool:
    """Make `tokenizer`'s chat template render `tools` into the system turn, if it does not already; in place.

    Returns True when it patched the template, False when the template already renders tools or there is no
    template to patch. Idempotent: a patched template renders tools, so a second call changes nothing."""
    template = tokenizer.chat_template
    if not template or template_renders_tools(tokenizer):
        return False
    if isinstance(template, dict):
        if "default" not in template:
            return False
        tokenizer.chat_template = {**template, "default": TOOL_PROMPT_PREFIX + template["default"]}
    else:
        tokenizer.chat_template = TOOL_PROMPT_PREFIX + template
    return True
