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


@pytest.fixture
def quickstart_files() -> tuple[Path, Path]:
    return QUICKSTART / "prompts.jsonl", QUICKSTART / "reward.py"
