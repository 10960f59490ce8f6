"""End to end: an SFT-warm-started tiny model calls a real MCP server on loopback during RL rollouts. The
warm-started run is the session's `tool_warm_start` (tests/conftest.py), which test_determinism trains again."""

from __future__ import annotations

import json

from runrl_engine import train
from tests.conftest import free_port, tool_config


def test_warm_started_model_calls_tools_and_sees_results(tool_warm_start):
    result, run = tool_warm_start
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in records if r.get("phase") == "sft"]
    assert sft and sft[-1]["sft/loss"] < 0.5 * sft[0]["sft/loss"]
    assert [r["step"] for r in records if "step" in r] == [1, 2]
    assert result.history[-1]["tool_calls_per_episode"] > 0
    completions = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    tool_turns = [m for c in completions for m in c.get("messages", []) if m["role"] == "tool"]
    # results of executed calls came back into the conversation: add() answers with a number (after this short
    # SFT about 1 sample in 5 is a well-formed call; 32 episodes make "none at all" very unlikely on any CPU)
    answered = [m["content"] for m in tool_turns if not m["content"].startswith("Error")]
    assert answered, tool_turns
    assert all(isinstance(float(text), float) for text in answered)
    assert "MCP tools from 1 server(s): add" in (run / "logs.txt").read_text()


def test_server_down_counts_errors_and_the_run_completes(tmp_path, tool_warm_start):
    _, warm = tool_warm_start
    url = f"http://127.0.0.1:{free_port()}/mcp"  # nothing listens there
    result = train(tool_config(url, model=str(warm / "final")), output_dir=tmp_path / "run")
    assert result.steps == 1 and result.final_dir is not None
    last = result.history[-1]
    assert last["tool_calls_per_episode"] > 0 and last["tool_errors"] > 0
    completions = [json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    errors = [m["content"] for c in completions for m in c.get("messages", []) if m["role"] == "tool"]
    assert errors and all(text.startswith("Error") for text in errors)
    assert "unreachable at start" in (tmp_path / "run" / "logs.txt").read_text()
