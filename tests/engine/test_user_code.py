"""Static checks of user code, redaction, `validate_user_code` and `install_requirements`."""

from __future__ import annotations

import importlib.util
import textwrap
import zipfile
from pathlib import Path

import pytest

from runrl_engine.errors import UserCodeError, UserError
from runrl_engine.sandbox import RewardSandbox, inspect_user_code, install_requirements, redact, validate_user_code
from runrl_engine.sandbox.isolation import is_secret_name, worker_env

# ----------------------------------------------------------------------------------------------- static


def test_syntax_error_names_file_line_and_column():
    src = "import re\n\ndef reward_fn(completion, **kwargs):\n    return (1.0\n"
    with pytest.raises(UserCodeError) as info:
        inspect_user_code(src, filename="my_reward.py")
    err = info.value
    assert err.where.startswith("my_reward.py:4:")
    assert "syntax error" in err.message and "never closed" in err.message and "return (1.0" in err.message


def test_compile_time_errors_beyond_parsing_are_caught():
    src = "def reward_fn(c, **kw):\n    return 1.0\n\ndef other():\n    nonlocal x\n"
    with pytest.raises(UserCodeError) as info:
        inspect_user_code(src, filename="r.py")
    assert info.value.where.startswith("r.py:5:") and "nonlocal" in info.value.message


def test_path_input_is_read_and_named(tmp_path):
    path = tmp_path / "reward.py"
    path.write_text("def reward_fn(completion, **kwargs):\n    return 1.0\n")
    info = inspect_user_code(path)
    assert (info.filename, info.entry, info.contract, info.warnings) == (str(path), "reward_fn", "reward_fn", ())
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(UserCodeError, match="not UTF-8"):
        inspect_user_code(path)


@pytest.mark.parametrize("src", ["", "   \n", "def reward(completion):\n    return 1\n", "x = 1\n"])
def test_missing_reward_fn_says_what_to_define(src):
    with pytest.raises(UserCodeError) as info:
        inspect_user_code(src, filename="r.py")
    assert "def reward_fn(completion, **kwargs)" in info.value.render()


def test_reward_fn_must_take_the_completion():
    with pytest.raises(UserCodeError) as info:
        inspect_user_code("def reward_fn():\n    return 1.0\n", filename="r.py")
    assert info.value.where == "r.py:1:1" and "completion" in info.value.message


def test_environment_file_given_as_reward_gets_a_hint():
    src = "class CustomEnv:\n    def setup(self, **kw): pass\n    def step(self, action): return {}\n"
    with pytest.raises(UserCodeError, match="type: environment"):
        inspect_user_code(src)


@pytest.mark.parametrize("src, entry, contract", [
    ("def reward_fn(completion, **kwargs):\n    return 1.0\n", "reward_fn", "reward_fn"),
    ("def reward_fn(completion, **kwargs):\n    return len(completion[0]['content'])\n", "reward_fn", "messages"),
    ("def reward_func(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n", "reward_func", "batch"),
    ("try:\n    from scorer import reward_fn\nexcept ImportError:\n    def reward_fn(c, **k): return 0.0\n",
     "reward_fn", "reward_fn"),
    ("reward_fn = lambda completion, **kw: 1.0\n", "reward_fn", "reward_fn"),
])
def test_reward_contract_detection(src, entry, contract):
    info = inspect_user_code(src)
    assert (info.mode, info.entry, info.contract) == ("function", entry, contract)


def test_warnings_and_imports_are_reported():
    src = "import re, numpy as np\nfrom collections import Counter\nfrom . import x\n" \
          "def reward_fn(completion, answer):\n    return 1.0\ndef reward_func(p, c): return []\n"
    info = inspect_user_code(src)
    assert info.imports == ("re", "numpy", "collections")
    assert any("no **kwargs" in w for w in info.warnings)
    assert any("reward_fn is used" in w for w in info.warnings)


@pytest.mark.parametrize("src, entry, init", [
    ("class CustomEnv:\n    def setup(self, **kw): pass\n    def step(self, action): return {}\n", "CustomEnv", "setup"),
    ("class Env:\n    def __init__(self, **kw): pass\n    def step(self, action): return {}\n", "Env", "__init__"),
    ("class Base:\n    def step(self, a): return {}\nclass CustomEnv(Base):\n    def setup(self, **kw): pass\n",
     "CustomEnv", "setup"),
    ("class A:\n    def step(self, a): return {}\nclass CustomEnv:\n    def setup(self): pass\n    def step(self, a): pass\n",
     "CustomEnv", "setup"),
])
def test_environment_class_detection(src, entry, init):
    info = inspect_user_code(src, mode="environment")
    assert (info.contract, info.entry, info.env_init) == ("environment", entry, init)


@pytest.mark.parametrize("src, message", [
    ("def reward_fn(c, **kw):\n    return 1.0\n", "no environment class"),
    ("class CustomEnv:\n    def setup(self, **kw): pass\n", "CustomEnv has no step"),
])
def test_environment_errors(src, message):
    with pytest.raises(UserCodeError, match=message) as info:
        inspect_user_code(src, mode="environment", filename="env.py")
    assert "class CustomEnv" in info.value.render()


def test_static_checks_never_execute_the_code(tmp_path):
    marker = tmp_path / "ran"
    inspect_user_code(f"open({str(marker)!r}, 'w').close()\ndef reward_fn(c, **kw):\n    return 1.0\n")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ secrets


def test_redact_known_values_and_token_patterns():
    text = ("token hf_AbCdEfGhIjKlMnOp and rl_abcdefgh_0123456789abcdef0123456789abcdef, "
            "sk-proj-abcdefghijklmnop1234, my pw hunter2hunter2; short hf_x stays")
    out = redact(text, ["hunter2hunter2", "", "ab"])
    assert out.count("[REDACTED]") == 4
    assert "hunter2" not in out and "hf_AbCd" not in out and "rl_abcdefgh" not in out and "sk-proj" not in out
    assert "short hf_x stays" in out
    assert redact("url_path_parameters and my_hf_tokenizer_config") == "url_path_parameters and my_hf_tokenizer_config"


def test_secret_names_and_the_environment_allowlist(monkeypatch):
    for name in ("HF_TOKEN", "hf_token", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY",
                 "RUNRL_BASE_URL", "DB_PASSWORD", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN"):
        assert is_secret_name(name), name
    assert not is_secret_name("PATH") and not is_secret_name("LANG")
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("PYTHONPATH", "/trainer/only")
    env = worker_env("/home/w", ["/req"])
    assert env["PYTHONPATH"] == "/req" and "PIP_INDEX_URL" not in env and "HTTPS_PROXY" not in env
    pip_env = worker_env("/home/w", for_pip=True)
    assert pip_env["PIP_INDEX_URL"] == "https://mirror.example/simple" and "PYTHONPATH" not in pip_env


# ----------------------------------------------------------------------------------------------- validate


def test_validate_reports_what_each_sample_returned():
    src = "def reward_fn(completion, expected_result=None, **kw):\n    return 0.5, {'expected': str(expected_result)}\n"
    report = validate_user_code(src, sample_rows=[{"prompt": [], "expected_result": i} for i in range(5)])
    assert report["valid"] is True and report["error"] is None and report["errors"] == []
    details = report["details"]
    assert details["entry"] == "reward_fn" and details["samples_tested"] == 3
    assert [s["info"] for s in details["samples"]] == [{"expected": "0"}, {"expected": "1"}, {"expected": "2"}]
    assert all(s["reward"] == 0.5 and s["error"] is None for s in details["samples"])


def test_validate_without_rows_uses_one_empty_row():
    report = validate_user_code("def reward_fn(completion, **kw):\n    return float(len(kw))\n")
    assert report["valid"] and report["details"]["samples"][0]["reward"] == 0.0
    assert report["details"]["exercised_on_rows"] is False and report["details"]["samples_tested"] == 0


@pytest.mark.parametrize("src", [
    "def reward_fn(completion, **kwargs):\n    return float(kwargs['expected'] in completion)\n",
    "def reward_fn(completion, answer, **kwargs):\n    return float(answer in completion)\n",
])
def test_validate_without_rows_does_not_blame_code_for_missing_row_fields(src):
    """An empty row lacks the user's fields: the call's error is a warning, and the report says the call was not
    exercised on the user's rows; with rows that lack the field the same code is invalid."""
    report = validate_user_code(src)
    assert report["valid"] is True and report["error"] is None and report["errors"] == []
    details = report["details"]
    assert details["exercised_on_rows"] is False and "not exercised on your rows" in details["note"]
    assert any(w.startswith("with an empty row") and ("KeyError: 'expected'" in w or "answer" in w)
               for w in details["warnings"])
    assert validate_user_code(src, sample_rows=[{"prompt": [], "expected": "x", "answer": "x"}])["valid"]
    bad = validate_user_code(src, sample_rows=[{"prompt": [], "other": 1}])
    assert bad["valid"] is False and bad["details"]["exercised_on_rows"] is True


def test_validate_without_rows_still_fails_code_that_runs_out_of_time():
    """Resource failures do not come from a missing row field: without rows they are still errors."""
    slow = "import time\ndef reward_fn(completion, **kwargs):\n    time.sleep(30)\n    return 1.0\n"
    report = validate_user_code(slow, timeout_s=1)
    assert report["valid"] is False and "timed out after" in report["error"], report
    assert report["details"]["exercised_on_rows"] is False


@pytest.mark.parametrize("src, stage, text", [
    ("def reward_fn(c, **kw)\n    return 1\n", "static", "syntax error"),
    ("x = 1\n", "static", "no `reward_fn`"),
    ("import not_a_module_xyz\ndef reward_fn(c, **kw):\n    return 1.0\n", "load", "ModuleNotFoundError"),
    ("def reward_fn(c, answer, **kw):\n    return 1.0\n", "run", "missing 1 required positional argument"),
    ("def reward_fn(c, **kw):\n    return 'high'\n", "run", "expected a number"),
])
def test_validate_turns_user_mistakes_into_a_report(src, stage, text):
    report = validate_user_code(src, filename="reward.py", sample_rows=[{"prompt": [], "expected": "x"}])
    assert report["valid"] is False and text in report["error"] and report["errors"][0] == report["error"]
    assert report["details"]["stage"] == stage


def test_validate_environment_steps_each_sample_once():
    src = textwrap.dedent("""
        class CustomEnv:
            def setup(self, **row):
                self.n = row.get("n", 0)
            def step(self, action):
                return {"observation": f"n={self.n}", "reward": 1.0, "done": True}
    """)
    report = validate_user_code(src, mode="environment", sample_rows=[{"n": 1}, {"n": 2}])
    assert report["valid"], report
    assert [(s["observation"], s["reward"], s["done"]) for s in report["details"]["samples"]] == [
        ("n=1", 1.0, True), ("n=2", 1.0, True)]
    bad = validate_user_code(src.replace('"done": True', '"done": True, "reward": "x"'), mode="environment",
                             sample_rows=[{"n": 1}])
    assert not bad["valid"] and "expected a number" in bad["error"]


# ------------------------------------------------------------------------------------------- requirements


def _tiny_wheel(tmp_path: Path, name: str = "runrl_tinypkg") -> Path:
    """A pure-Python wheel built by hand (a wheel is a zip), so installing it needs no network or build step."""
    wheel = tmp_path / f"{name}-0.1-py3-none-any.whl"
    dist = f"{name}-0.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 41\n")
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", f"{name}/__init__.py,,\n{dist}/METADATA,,\n{dist}/WHEEL,,\n{dist}/RECORD,,\n")
    return wheel


def test_install_requirements_reach_the_workers_only(tmp_path):
    wheel = _tiny_wheel(tmp_path)
    logs: list[str] = []
    target = install_requirements(["runrl_tinypkg==0.1", "pip"], tmp_path / "reward_env", logs.append,
                                  extra_args=["--no-index"], find_links=[wheel.parent], timeout_s=120)
    assert (target / "runrl_tinypkg" / "__init__.py").exists()
    assert any("pip" in line and "already satisfied" in line for line in logs)
    assert importlib.util.find_spec("runrl_tinypkg") is None  # the trainer process does not see it
    code = tmp_path / "reward.py"
    code.write_text("import runrl_tinypkg\ndef reward_fn(c, **kw):\n    return runrl_tinypkg.VALUE + 1.0\n")
    with RewardSandbox(code, requirements_dir=target, num_workers=1, work_dir=tmp_path / "sb") as sb:
        assert sb.score(["x"], [{}])[0].reward == 42.0


def test_install_requirements_failure_carries_pips_message(tmp_path):
    with pytest.raises(UserError) as info:
        install_requirements(["bad spec ==="], tmp_path / "reward_env", extra_args=["--no-index"], timeout_s=120)
    err = info.value
    assert err.where == "package_requirements" and "not a requirement specifier" in err.message
    assert not (tmp_path / "reward_env").exists()
    with pytest.raises(UserError) as info:  # a well-formed name that is not on the index: pip's own words
        install_requirements(["runrl-no-such-package==1.0"], tmp_path / "reward_env", extra_args=["--no-index"],
                             timeout_s=120)
    assert "exit code" in info.value.message and "runrl-no-such-package" in info.value.message


@pytest.mark.parametrize("entry", ["/etc", "/no/such/dir", "../reward_env", "./pkg", "~/.ssh", "file:///etc/passwd",
                                   "pkg @ file:///etc", "C:\\x"])
def test_requirements_are_specifiers_never_host_paths(tmp_path, entry):
    # The same message whether the path exists or not: an error never reveals host file-system facts.
    with pytest.raises(UserError) as info:
        install_requirements([entry], tmp_path / "env", extra_args=["--no-index"], timeout_s=60)
    message = info.value.message
    assert info.value.where == "package_requirements" and not (tmp_path / "env").exists()
    assert "not a requirement specifier" in message or "non-http(s) URL" in message
    assert "exist" not in message.lower().replace("not a requirement", "")


def test_url_requirements_only_when_allowed():
    from runrl_engine.sandbox.requirements import check_requirements

    url = "pkg @ https://files.example/pkg-1.0-py3-none-any.whl"
    assert check_requirements([url, " sympy>=1.12 ", ""]) == [url, "sympy>=1.12"]
    with pytest.raises(UserError, match="does not allow"):
        check_requirements(["sympy", url], allow_urls=False)
    assert check_requirements(['requests[socks]==2.32.3; python_version>="3.9"'], allow_urls=False)


def test_install_requirements_refuses_pip_options(tmp_path):
    with pytest.raises(UserError, match="pip option"):
        install_requirements(["--index-url=http://evil.example/simple", "x"], tmp_path / "env")
