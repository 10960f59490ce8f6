"""End to end: an SFT-warm-started tiny model calls a real MCP server on loopback during RL rollouts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runrl_engine import train

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "configs" / "data" / "calculator"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def calculator_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "mcp_calculator.py"), "--port", str(port),
                             "--tools", "add"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the example MCP server did not start")
    yield f"http://127.0.0.1:{port}/mcp"
    proc.terminate()
    proc.wait(timeout=10)


def tool_config(url: str, **over) -> dict:
    config = dict(model="builtin:tiny", prompt_file=str(DATA / "prompts.jsonl"), reward_file=str(DATA / "reward.py"),
                  tools=[url], max_turns=2, max_tool_calls=2, completion_length=32, max_steps=1, prompts_per_step=4,
                  num_generations=8, micro_batch_size=8, learning_rate=1e-3, eval_every=0, save_every=0, seed=0)
    config.update(over)
    return config


@pytest.fixture(scope="module")
def warm_started_run(tmp_path_factory, calculator_url, tiny_model_dir):
    out = tmp_path_factory.mktemp("tools") / "run"
    result = train(tool_config(calculator_url, sft_file=str(DATA / "sft.jsonl"), sft_epochs=12, sft_learning_rate=0.01),
                   output_dir=out)
    return result, out


def test_warm_started_model_calls_tools_and_sees_results(warm_started_run):
    result, run = warm_started_run
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in records if r.get("phase") == "sft"]
    assert sft and sft[-1]["sft/loss"] < 0.5 * sft[0]["sft/loss"]
    assert [r["step"] for r in records if "step" in r] == [1]
    assert result.history[-1]["tool_calls_per_episode"] > 0
    completions = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    tool_turns = [m for c in completions for m in c.get("messages", []) if m["role"] == "tool"]
    # results of executed calls came back into the conversation: add() answers with a number (after this short
    # SFT about 1 sample in 5 is a well-formed call; 32 episodes make "none at all" very unlikely on any CPU)
    answered = [m["content"] for m in tool_turns if not m["content"].startswith("Error")]
    assert answered, tool_turns
    assert all(isinstance(float(text), float) for text in answered)
    assert "MCP tools from 1 server(s): add" in (run / "logs.txt").read_text()


def test_server_down_counts_errors_and_the_run_completes(tmp_path, warm_started_run):
    _, warm = warm_started_run
    url = f"http://127.0.0.1:{free_port()}/mcp"  # nothing listens there
    result = train(tool_config(url, model=str(warm / "final")), output_dir=tmp_path / "run")
    assert result.steps == 1 and result.final_dir is not None
    last = result.history[-1]
    assert last["tool_calls_per_episode"] > 0 and last["tool_errors"] > 0
    completions = [json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    errors = [m["content"] for c in completions for m in c.get("messages", []) if m["role"] == "tool"]
    assert errors and all(text.startswith("Error") for text in errors)
    assert "unreachable at start" in (tmp_path / "run" / "logs.txt").read_text()
