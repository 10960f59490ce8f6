"""runrl_engine/secrets.py: one redaction for the engine, the sandbox and the server; a test per pattern."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from runrl_engine.secrets import MARK, SERVED_MARK, env_secret_values, is_secret_name, redact, secret_values

ROOT = Path(__file__).resolve().parents[2]
RL_KEY = "rl_abcdefgh_" + "0123456789abcdef0123456789abcdef"  # this API's key shape (server/auth.py)


def test_run_secret_values_are_replaced_longest_first():
    # "hunter2hunter2" contains "hunter2h"... a shorter secret replaced first would leave a tail of the longer one
    out = redact("pw=hunter2hunter2 other=hunt", ["hunt", "hunter2hunter2"])
    assert out == f"pw={MARK} other={MARK}"


def test_secret_values_shorter_than_four_characters_and_empty_ones_are_left_alone():
    assert redact("a b ab abc", ["", "ab", "abc"]) == "a b ab abc"


def test_non_string_secret_values_are_skipped_not_an_error():
    assert redact("x hunter2hunter2", [{"NAME": "v"}, None, "hunter2hunter2"]) == f"x {MARK}"  # type: ignore[list-item]


@pytest.mark.parametrize("token", [RL_KEY, "rl-abcd_0123456789"], ids=["rl_", "older-rl-"])
def test_api_key_shapes(token):
    assert redact(f"key={token}, end") == f"key={MARK}, end"


@pytest.mark.parametrize("token", ["hf_AbCdEfGh", "hf_" + "x" * 34], ids=["short-hf", "long-hf"])
def test_hugging_face_token_shapes(token):
    assert redact(f"hf={token} ok") == f"hf={MARK} ok"


def test_openai_style_key_shape():
    assert redact("k=sk-proj-abcdefghijklmnop1234 ok") == f"k={MARK} ok"


@pytest.mark.parametrize("text", ["short hf_x and hf_1234567", "my_hf_tokenizer_config", "url_path_parameters",
                                  "rl_abc_12345678", "sk-short", "task-abcdefghijklmnop"])
def test_ordinary_text_is_not_a_token(text):
    assert redact(text) == text


def test_the_server_marks_redactions_as_config_yaml_does():
    assert redact(f"{RL_KEY} s3cr3t!", ["s3cr3t!"], mark=SERVED_MARK) == "*** ***"


def test_secret_values_flattens_a_runs_secrets():
    run = {"hf_token": "hf_AbCdEfGhIj", "reward_secrets": {"JUDGE_API_KEY": "judge-key-1", "OTHER": ""},
           "missing": None}
    assert secret_values(run) == ["hf_AbCdEfGhIj", "judge-key-1"]


def test_secret_names_and_their_values():
    for name in ("HF_TOKEN", "hf_token", "WANDB_API_KEY", "RUNRL_BASE_URL", "DB_PASSWORD", "GITHUB_TOKEN"):
        assert is_secret_name(name), name
    assert not is_secret_name("PATH") and not is_secret_name("HOME")
    env = {"GITHUB_TOKEN": "ghp_abcdef", "SHORT_KEY": "abc", "PATH": "/usr/bin:/bin"}
    assert env_secret_values(env) == ["ghp_abcdef"]  # values under 6 characters are not collected


def test_the_sandbox_and_the_server_use_this_function():
    from runrl_engine import metrics, sandbox
    from runrl_engine.sandbox import pool
    from runrl_engine.secrets import redact as one
    from server import worker
    from server.routes import run_outputs

    assert sandbox.redact is one and pool.redact is one and metrics.redact is one
    assert worker.redact is one and run_outputs.redact is one


def non_stdlib_imports(path: Path) -> list[str]:
    """The modules `path` imports from outside the standard library."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return sorted(n for n in names if n.split(".")[0] not in sys.stdlib_module_names and n != "__future__")


def test_the_module_imports_only_the_standard_library():
    assert non_stdlib_imports(ROOT / "runrl_engine" / "secrets.py") == []
