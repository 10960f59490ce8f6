"""`runrl train` / `runrl validate` from the outside: exit codes, one clear message, nothing stray written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QS = ROOT / "configs" / "data" / "quickstart"


def runrl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def write_config(tmp_path: Path, **over) -> Path:
    base = {"model": "builtin:tiny", "prompt_file": str(QS / "prompts.jsonl"), "reward_file": str(QS / "reward.py"),
            "completion_length": 4, "max_steps": 1, "prompts_per_step": 1, "num_generations": 2, "eval_every": 0,
            "save_every": 0}
    base.update(over)
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def test_train_writes_only_the_output_dir(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, max_steps=2)
    before = set(os.listdir(tmp_path))
    proc = runrl("train", str(config), "--output", "out", "--set", "seed=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and Path(summary["final_dir"]).is_dir()
    assert set(os.listdir(tmp_path)) - before == {"out"}
    assert "seed: 3" in (tmp_path / "out" / "config.yaml").read_text()
    again = runrl("train", str(config), "--output", "out", cwd=tmp_path)
    assert_user_error(again, "already holds a run", "--resume")


@pytest.mark.parametrize("case,needles", [
    ("malformed_yaml", ["run.yaml:2", "malformed YAML"]),
    ("unknown_key", ["unknown key 'num_generation'", "did you mean 'num_generations'"]),
    ("bad_range", ["epochs", "out of range", "<= 100"]),
    ("missing_reward_fn", ["reward.py", "reward_fn"]),
    ("syntax_error", ["reward.py:2", "syntax error"]),
    ("missing_model", ["does not exist", "model"]),
    ("bad_prompts", ["prompts.jsonl:2", "invalid JSON"]),
    ("missing_config", ["config file not found"]),
])
def test_bad_input_is_one_clear_message(tmp_path, case, needles):
    config = write_config(tmp_path)
    if case == "malformed_yaml":
        config.write_text("model: builtin:tiny\nprompt_file: [unclosed\n")
    elif case == "unknown_key":
        config = write_config(tmp_path, num_generation=4)
    elif case == "bad_range":
        config = write_config(tmp_path, epochs=1000)
    elif case == "missing_reward_fn":
        (tmp_path / "reward.py").write_text("def score(completion):\n    return 1.0\n")
        config = write_config(tmp_path, reward_file=str(tmp_path / "reward.py"))
    elif case == "syntax_error":
        (tmp_path / "reward.py").write_text("def reward_fn(completion, **kw):\n    return (1.0\n")
        config = write_config(tmp_path, reward_file=str(tmp_path / "reward.py"))
    elif case == "missing_model":
        config = write_config(tmp_path, model=str(tmp_path / "no-such-model"))
    elif case == "bad_prompts":
        (tmp_path / "prompts.jsonl").write_text('{"prompt": [{"role": "user", "content": "hi"}]}\n{oops\n')
        config = write_config(tmp_path, prompt_file=str(tmp_path / "prompts.jsonl"))
    elif case == "missing_config":
        config = tmp_path / "nope.yaml"
    before = set(os.listdir(tmp_path))
    proc = runrl("train", str(config), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert_user_error(proc, *needles)
    assert set(os.listdir(tmp_path)) - before <= {"out"}


def test_validate_commands(tmp_path):
    ok = runrl("validate", "prompt", str(QS / "prompts.jsonl"), cwd=tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout)["details"]["total_lines"] == 64
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    bad = runrl("validate", "prompt", str(tmp_path / "p.jsonl"), cwd=tmp_path)
    assert bad.returncode == 1 and "line 1" in json.loads(bad.stdout)["error"]
    reward = runrl("validate", "reward", str(QS / "reward.py"), "--prompts", str(QS / "prompts.jsonl"), cwd=tmp_path)
    report = json.loads(reward.stdout)
    assert reward.returncode == 0 and report["valid"], report
    (tmp_path / "r.py").write_text("x = 1\n")
    bad_reward = runrl("validate", "reward", str(tmp_path / "r.py"), cwd=tmp_path)
    assert bad_reward.returncode == 1 and "reward_fn" in json.loads(bad_reward.stdout)["error"]
