"""`reward_secrets` through the API: the create body sets them, the run object and the stored config never show
their values, `runrl train` receives them on stdin (`--secrets-stdin`), and a served log line that prints one is
redacted. The trainer is a stand-in that records what arrived (the queue's own test double, see conftest); the
engine's half (secrets -> the sandbox worker's environment) is tests/engine/test_reward_concurrency.py and
tests/engine/test_llm_judge_example.py with the real trainer."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from tests.server.conftest import PROMPTS, REWARD, wait_status

SECRET = "sk-judge-secret-0123456789"
# Logs the secret it was handed (the server must redact it) and whether it arrived intact.
RECORDER = r"""
import json, sys, pathlib
out = pathlib.Path(sys.argv[sys.argv.index('--output') + 1])
got = json.loads(sys.stdin.read() or '{}') if '--secrets-stdin' in sys.argv else {}
value = (got.get('reward_secrets') or {}).get('JUDGE_API_KEY')
with open(out / 'logs.txt', 'a') as log:
    log.write(f'judge key {value}\n')
    log.write(f'judge key length {len(value or "")}\n')
"""


def test_reward_secrets_reach_the_trainer_on_stdin_only(make_live, settings):
    live = make_live(replace(settings, train_command=(sys.executable, "-c", RECORDER)))
    with live.client(live.key()) as c:
        p = c.post("/files", files={"file": ("p.jsonl", PROMPTS.encode())}, data={"type": "prompt"}).json()["data"]
        r = c.post("/files", json={"type": "reward_function", "name": "r", "content": REWARD}).json()["data"]
        base = {"model": "builtin:tiny", "type": "reward_function", "prompt_file_id": p["id"],
                "reward_file_id": r["id"]}
        bad = c.post("/runs", json={**base, "reward_secrets": {"PATH": SECRET}})
        assert bad.status_code == 422 and "reward_secrets" in bad.json()["details"], bad.text
        assert SECRET not in bad.text
        created = c.post("/runs", json={**base, "reward_secrets": {"JUDGE_API_KEY": SECRET}, "reward_concurrency": 4})
        assert created.status_code == 201, created.text
        run = created.json()["data"]
        assert run["parameters"]["reward_secrets"] == "***" and run["parameters"]["reward_concurrency"] == 4
        stored = live.app.state.services.store.run(run["id"])
        assert SECRET not in json.dumps(stored["config"]) and stored["config"]["reward_concurrency"] == 4
        wait_status(c, run["id"], {"COMPLETED", "FAILED"})
        lines = c.get(f"/runs/{run['id']}/logs").json()["data"]["lines"]
        assert "judge key ***" in lines and f"judge key length {len(SECRET)}" in lines, lines
        assert SECRET not in c.get(f"/runs/{run['id']}").text
        rundir = live.settings.runs_dir / str(run["id"])
        assert not any(SECRET.encode() in f.read_bytes() for f in rundir.rglob("*") if f.is_file())
