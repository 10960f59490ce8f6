"""examples/llm_judge_reward.py from a real `runrl train` run, judged by this project's own model server.

The judge is `python -m server.deploy` serving the builtin tiny model on loopback (OpenAI-compatible
`/v1/chat/completions`, every request checked against the bearer token in its RUNRL_DEPLOY_TOKEN). The run
gets the token only as a secret (`--secrets-stdin` -> `reward_secrets.JUDGE_API_KEY` -> the sandbox worker's
environment): with it, every reward is the judge's; with a wrong one, every call is a 401 and the run stops
with that in its error. Neither run writes the secret anywhere in its directory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
QS = ROOT / "configs" / "data" / "quickstart"
TOKEN = "judge-token-0123456789abcdef"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def judge(tiny_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "server.deploy", "--model-dir", str(tiny_model_dir), "--port",
                             str(port), "--name", "judge-tiny"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "RUNRL_DEPLOY_TOKEN": TOKEN,
                                                         "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the model server did not become ready"
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stderr.close()


def train(tmp_path: Path, base_url: str, key: str) -> tuple[subprocess.CompletedProcess, Path]:
    config = {"model": "builtin:tiny", "prompt_file": str(QS / "prompts.jsonl"),
              "reward_file": str(ROOT / "examples" / "llm_judge_reward.py"), "completion_length": 6, "max_steps": 2,
              "prompts_per_step": 2, "num_generations": 4, "eval_every": 0, "save_every": 0,
              "reward_allow_network": True, "reward_timeout_s": 60, "max_failed_reward_steps": 1}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    # JUDGE_MODEL is left at the example's default; the model server echoes the requested name
    secrets = {"reward_secrets": {"JUDGE_API_KEY": key, "JUDGE_BASE_URL": base_url}}
    proc = subprocess.run([sys.executable, "-m", "runrl_engine.cli", "train", "run.yaml", "--output", "out",
                           "--secrets-stdin"], cwd=tmp_path, input=json.dumps(secrets), capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, tmp_path / "out"


def assert_secret_written_nowhere(run_dir: Path, secret: str) -> None:
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_the_judge_scores_every_completion_with_the_key_given_as_a_secret(tmp_path, judge):
    proc, out = train(tmp_path, judge, TOKEN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["reward_errors"] == 0 and "reward_info/judge_parsed" in m for m in metrics), metrics
    records = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert records and all("error" not in r for r in records)
    assert {r["info"]["judge_model"] for r in records if "judge_model" in r["info"]} == {"gpt-4o-mini"}
    stored = yaml.safe_load((out / "config.yaml").read_text())["reward_secrets"]
    assert stored == {"JUDGE_API_KEY": "***", "JUDGE_BASE_URL": "***"}
    assert_secret_written_nowhere(out, TOKEN)


def test_a_wrong_key_fails_the_run_with_the_judges_401(tmp_path, judge):
    wrong = "not-the-judge-token-42"
    proc, out = train(tmp_path, judge, wrong)
    assert proc.returncode != 0
    assert "every reward failed" in proc.stderr and "the judge answered HTTP 401" in proc.stderr, proc.stderr[-3000:]
    assert_secret_written_nowhere(out, wrong)
    assert_secret_written_nowhere(out, TOKEN)
