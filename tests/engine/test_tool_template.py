"""Tool schemas for chat templates that ignore `tools` (`runrl_engine.tools.template`), on the real SmolLM2 tokenizer.

SmolLM2-135M-Instruct's template is plain ChatML without tool support: patched, it must show the MCP tools in the
system turn in the format `parse_tool_calls` reads, change nothing without tools, keep the prefix property the
multi-turn rollout needs, and carry a call through a real MCP server on loopback. A template that renders tools
itself (builtin:tiny's) is left alone.
"""

from __future__ import annotations

import json

import pytest

from runrl_engine.rollout.episodes import ChatRenderer
from runrl_engine.tools.parsing import format_tool_call, parse_tool_calls, tool_message
from runrl_engine.tools.template import PROBE_TOOL_NAME, add_tool_prompt, template_renders_tools
from tests.engine.test_tools import _InThreadServers

SCHEMAS = [
    {"type": "function", "function": {"name": "add", "description": "Add two numbers; returns a float.",
                                      "parameters": {"type": "object", "required": ["a", "b"],
                                                     "properties": {"a": {"type": "number"},
                                                                    "b": {"type": "number"}}}}},
    {"type": "function", "function": {"name": "recall", "description": "Ünïcödé: every value remembered so far.",
                                      "parameters": {"type": "object", "properties": {}}}},
]
USER = {"role": "user", "content": "What is 6 + 5?"}
SYSTEM = {"role": "system", "content": "Answer inside <answer></answer>."}


@pytest.fixture(scope="module")
def original_template(smollm2_dir) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir).chat_template


@pytest.fixture
def smollm2(smollm2_dir, original_template):
    """A fresh SmolLM2 tokenizer with its shipped template (tests patch it in place)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template == original_template
    return tok


def render(tok, messages, tools=None, generation_prompt=True) -> str:
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False)


def system_turn(text: str) -> str:
    assert text.startswith("<|im_start|>system\n")
    return text[len("<|im_start|>system\n"):text.index("<|im_end|>")]


def test_smollm2_ignores_tools_until_patched(smollm2, original_template):
    assert "add" not in render(smollm2, [USER], SCHEMAS)  # what the trainer sent before: silently dropped
    assert not template_renders_tools(smollm2)
    assert add_tool_prompt(smollm2) is True
    assert smollm2.chat_template.endswith(original_template) and smollm2.chat_template != original_template
    assert template_renders_tools(smollm2)
    assert PROBE_TOOL_NAME not in render(smollm2, [USER], SCHEMAS)
    assert add_tool_prompt(smollm2) is False  # idempotent


@pytest.mark.parametrize("with_system", [False, True], ids=["no-system", "user-system"])
def test_schemas_go_into_the_system_turn_as_tools_block(smollm2, with_system):
    add_tool_prompt(smollm2)
    messages = [SYSTEM, USER] if with_system else [USER]
    text = render(smollm2, messages, SCHEMAS)
    assert text.count("<|im_start|>system\n") == 1  # one system turn: the user's, with the tools appended
    system = system_turn(text)
    if with_system:
        assert system.startswith(SYSTEM["content"] + "\n\n# Tools\n")
    else:  # a new first system message in place of SmolLM2's default one
        assert system.startswith("# Tools\n") and "named SmolLM" not in text
    inside = system[system.index("<tools>\n") + len("<tools>\n"):system.index("\n</tools>")]
    assert [json.loads(line) for line in inside.split("\n")] == SCHEMAS  # one schema per line, nothing else
    for schema in SCHEMAS:
        spec = schema["function"]
        assert json.dumps(spec["parameters"], ensure_ascii=False) in inside
        assert f'"name": "{spec["name"]}"' in inside and spec["description"] in inside
    # the instruction's example is a block `parse_tool_calls` reads
    calls, errors = parse_tool_calls(system[system.index("</tools>"):])
    assert errors == [] and [c.name for c in calls] == ["function_name"]
    assert text.endswith(f"<|im_start|>user\n{USER['content']}<|im_end|>\n<|im_start|>assistant\n")


def test_without_tools_the_render_is_byte_identical(smollm2, original_template):
    convs = [
        [USER],
        [SYSTEM, USER],
        [SYSTEM, USER, {"role": "assistant", "content": format_tool_call("add", {"a": 6, "b": 5})},
         tool_message("11.0", name="add"), {"role": "assistant", "content": "<answer>11</answer>"}],
        [{"role": "system", "content": ""}, {"role": "user", "content": "\n  leading whitespace\n"}],
    ]
    expected = [[render(smollm2, c, None, g) for g in (True, False)] for c in convs]
    add_tool_prompt(smollm2)
    for conv, want in zip(convs, expected):
        for tools in (None, []):
            assert [render(smollm2, conv, tools, g) for g in (True, False)] == want


def test_template_that_renders_tools_is_left_unchanged(tiny_model_dir):
    from transformers import AutoTokenizer

    from runrl_engine.tiny import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny"))
    before = tok.chat_template
    assert template_renders_tools(tok)
    assert add_tool_prompt(tok) is False and tok.chat_template == before


def test_patched_template_keeps_the_prefix_property(smollm2):
    add_tool_prompt(smollm2)
    conv = [SYSTEM, USER, {"role": "assistant", "content": format_tool_call("add", {"a": 6, "b": 5})},
            tool_message("11.0", name="add"), {"role": "assistant", "content": "<answer>11</answer>"}]
    for k in range(1, len(conv)):
        shorter = render(smollm2, conv[:k], SCHEMAS, generation_prompt=conv[k]["role"] == "assistant")
        assert render(smollm2, conv[:k + 1], SCHEMAS, generation_prompt=False).startswith(shorter)


@pytest.fixture(scope="module")
def calculator():
    servers = _InThreadServers()
    try:
        servers.wait_ready()
        yield servers.urls["http"]
    finally:
        servers.stop()


def test_round_trip_through_a_real_mcp_server(smollm2, calculator):
    from runrl_engine.tools.mcp_client import ToolRuntime

    runtime = ToolRuntime()
    try:
        with runtime.open_session([calculator], call_timeout_s=10) as session:
            assert session.connection_errors == {}
            schemas = session.tool_schemas()
            assert add_tool_prompt(smollm2)
            renderer = ChatRenderer(smollm2, schemas)
            prompt = [SYSTEM, USER]
            prompt_text = renderer.render(prompt, add_generation_prompt=True)
            listed = system_turn(prompt_text)
            listed = listed[listed.index("<tools>\n") + 8:listed.index("\n</tools>")].split("\n")
            assert [json.loads(line) for line in listed] == schemas
            assert {"add", "multiply", "evaluate"} <= {s["function"]["name"] for s in schemas}

            # what the model would write, parsed and executed as the rollout loop does
            reply = "I will add them.\n" + format_tool_call("add", {"a": 6, "b": 5})
            calls, errors = parse_tool_calls(reply)
            assert errors == [] and [(c.name, c.arguments) for c in calls] == [("add", {"a": 6, "b": 5})]
            result = session.call(calls[0].name, calls[0].arguments)
            assert not result.is_error and result.text == "11.0"

            # token-in/token-out: prompt ids + the sampled turn (its <|im_end|> included) + the inserted tool turn
            # must be exactly the template's render of the whole conversation
            assistant = {"role": "assistant", "content": reply}
            tool = tool_message(result.text, name=calls[0].name)
            sampled = renderer.encode(reply) + [smollm2.eos_token_id]
            inserted = renderer.continuation_ids(prompt + [assistant], [tool])
            assert smollm2.decode(inserted) == "\n<|im_start|>tool\n11.0<|im_end|>\n<|im_start|>assistant\n"
            whole = renderer.prompt_ids(prompt + [assistant, tool])
            assert renderer.prompt_ids(prompt) + sampled + inserted == whole
    finally:
        runtime.close()


def test_trainer_patches_the_template_before_rendering_prompts(smollm2_dir, calculator, tmp_path):
    from pathlib import Path

    from runrl_engine.config import RunConfig
    from runrl_engine.setup import build_run
    from runrl_engine.trainer import Trainer

    data = Path(__file__).resolve().parents[2] / "configs" / "data" / "calculator"
    cfg = RunConfig.from_dict(dict(model="builtin:smollm2-135m-instruct", prompt_file=str(data / "prompts.jsonl"),
                                   reward_file=str(data / "reward.py"), tools=[calculator], max_prompt_length=1024,
                                   completion_length=16, max_steps=1, eval_every=0, save_every=0, seed=0))
    trainer = Trainer(build_run(cfg, tmp_path / "run"))
    try:
        assert template_renders_tools(trainer.tokenizer)
        _, ids = trainer.train_rows[0]
        prompt = trainer.tokenizer.decode(ids)
        for schema in trainer.tool_schemas:  # the ids RL samples from show every tool the server listed
            assert json.dumps(schema, ensure_ascii=False) in prompt
    finally:
        trainer.close()
    assert "the chat template ignores `tools`" in (tmp_path / "run" / "logs.txt").read_text()
