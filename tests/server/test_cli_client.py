"""`runrl keys list|update|revoke` on a live server's data dir, `runrl runs list|show|logs|cancel` against a live
server over real HTTP (the CLI in a subprocess), and the Run object's `wandb_url` (issue 13 findings 8, 9).

The runs use the stand-in training command (tests/server/conftest.py). W&B has no network here, so `wandb_url`
is checked only as the value a run records in its run directory (runrl_engine.metrics.WANDB_FILE): the engine
test (tests/engine/test_cli_ux.py) checks that an offline run records `url: null`; what a real online run
records comes from wandb's `run.url`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from runrl_engine.metrics import WANDB_FILE
from tests.server.conftest import free_port, wait_status
from tests.server.test_runs_queue import body, upload

ROOT = Path(__file__).resolve().parents[2]


def runrl(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("RUNRL_BASE_URL", "RUNRL_API_KEY")}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**environ, "PYTHONPATH": str(ROOT), **env})


def table(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.strip().splitlines()]


def test_keys_list_update_revoke(live):
    data_dir = str(live.settings.data_dir)
    alice = live.key(user="alice", name="laptop")
    bob = live.key(user="bob", scopes="read", name="ci")
    listed = runrl("keys", "list", "--data-dir", data_dir)
    assert listed.returncode == 0, listed.stderr
    rows = table(listed.stdout)
    assert rows[0][:5] == ["ID", "USER", "NAME", "KEY", "SCOPES"]
    assert [r[1:3] for r in rows[1:]] == [["alice", "laptop"], ["bob", "ci"]]
    assert alice not in listed.stdout and alice.split("_")[1] in listed.stdout  # masked: the prefix, not the secret
    only_bob = json.loads(runrl("keys", "list", "--user", "bob", "--json", "--data-dir", data_dir).stdout)
    assert [(k["name"], k["scopes"], k["active"]) for k in only_bob] == [("ci", ["read"], True)]

    changed = runrl("keys", "update", alice, "--name", "desk", "--requests-per-hour", "5", "--expires-at",
                    "2999-01-01", "--scopes", "read", "--data-dir", data_dir)
    assert changed.returncode == 0, changed.stderr
    key = json.loads(changed.stdout)
    assert (key["name"], key["requests_per_hour"], key["expires_at"], key["scopes"]) == (
        "desk", 5, "2999-01-01T00:00:00Z", ["read"])
    with live.client(alice) as c:  # the server sees the change
        mine = c.get("/keys")
        assert mine.status_code == 200 and mine.json()["data"][0]["name"] == "desk"
        assert c.post("/files", json={"type": "reward_function", "name": "r", "content": "x"}).status_code == 403

    # revoke by prefix, a key the server has not cached: refused at once; --activate restores it
    revoked = runrl("keys", "revoke", f"rl_{bob.split('_')[1]}", "--data-dir", data_dir)
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["active"] is False
    with live.client(bob) as c:
        refused = c.get("/runs")
        assert refused.status_code == 401 and "inactive" in refused.json()["message"]
    restored = runrl("keys", "update", str(only_bob[0]["id"]), "--activate", "--data-dir", data_dir)
    assert json.loads(restored.stdout)["active"] is True
    time.sleep(5.2)  # the server's key cache
    with live.client(bob) as c:
        assert c.get("/runs").status_code == 200

    for args, needles in ((["keys", "revoke", "999", "--data-dir", data_dir], ["999: no such API key"]),
                          (["keys", "update", "1", "--scopes", "root", "--data-dir", data_dir], ["--scopes", "root"]),
                          (["keys", "update", "1", "--expires-at", "soon", "--data-dir", data_dir], ["--expires-at"]),
                          (["keys", "list", "--data-dir", str(live.settings.data_dir / "nope")],
                           ["no runrl serve data here"])):
        bad = runrl(*args)
        assert bad.returncode == 2 and bad.stderr.startswith("error: "), (args, bad.stderr)
        assert all(n in bad.stderr for n in needles) and "Traceback" not in bad.stderr, bad.stderr
    assert not (live.settings.data_dir / "nope").exists()


def test_runs_list_show_logs_cancel(live):
    key = live.key()
    flags = ["--base-url", live.url, "--api-key", key]
    with live.client(key) as c:
        p, r = upload(c)
        done = c.post("/runs", json=body(p, r, run_name="sleep=0.2,code=0")).json()["data"]["id"]
        wait_status(c, done, {"COMPLETED"})
        slow = c.post("/runs", json=body(p, r, run_name="sleep=60,code=0")).json()["data"]["id"]
        wait_status(c, slow, {"RUNNING"})

        listed = runrl("runs", "list", *flags)
        assert listed.returncode == 0, listed.stderr
        rows = table(listed.stdout)
        assert rows[0][:3] == ["ID", "STATUS", "MODEL"]
        assert [r[:3] for r in rows[1:]] == [[str(slow), "RUNNING", "builtin:tiny"], [str(done), "COMPLETED", "builtin:tiny"]]
        running = runrl("runs", "list", "--status", "COMPLETED", *flags)
        assert [r[0] for r in table(running.stdout)[1:]] == [str(done)]

        # base URL and key from the environment, as the SDK reads them (a bare host:port gets /api/v1)
        env = {"RUNRL_BASE_URL": live.url.removesuffix("/api/v1"), "RUNRL_API_KEY": key}
        shown = runrl("runs", "show", str(done), **env)
        assert shown.returncode == 0, shown.stderr
        run = json.loads(shown.stdout)
        assert run["id"] == done and run["status"] == "COMPLETED" and run["wandb_url"] is None
        logs = runrl("runs", "logs", str(done), **env)
        assert logs.stdout.splitlines() == c.get(f"/runs/{done}/logs").json()["data"]["lines"]
        assert "step 2" in logs.stdout.splitlines()

        c.post(f"/runs/{slow}/cancel")
        wait_status(c, slow, {"CANCELLED"})
        short = c.post("/runs", json=body(p, r, run_name="sleep=4,code=0")).json()["data"]["id"]
        wait_status(c, short, {"RUNNING"})
        t0 = time.time()
        followed = runrl("runs", "logs", str(short), "--follow", **env)  # until the run ends
        assert followed.returncode == 0 and "step 2" in followed.stdout.splitlines(), followed.stderr
        assert time.time() - t0 > 1.0 and c.get(f"/runs/{short}").json()["data"]["status"] == "COMPLETED"

        long = c.post("/runs", json=body(p, r, run_name="sleep=60,code=0")).json()["data"]["id"]
        wait_status(c, long, {"RUNNING"})
        cancelled = runrl("runs", "cancel", str(long), **env)
        assert cancelled.returncode == 0 and f"run {long} is" in cancelled.stdout, cancelled.stderr
        assert wait_status(c, long, {"CANCELLED", "FAILED", "COMPLETED"})["status"] == "CANCELLED"
        again = runrl("runs", "cancel", str(long), **env)
        assert "already finished" in again.stdout and "CANCELLED" in again.stdout

    # API errors: the envelope's message, exit status 1; no key at all is a usage mistake (2)
    missing = runrl("runs", "show", "99999", *flags)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and "not found" in missing.stderr
    assert "HTTP 404" in missing.stderr and "Traceback" not in missing.stderr
    wrong = runrl("runs", "list", "--base-url", live.url, "--api-key", "rl_aaaaaaaa_" + "b" * 32)
    assert wrong.returncode == 1 and "Invalid API key" in wrong.stderr
    nokey = runrl("runs", "list", "--base-url", live.url)
    assert nokey.returncode == 2 and "RUNRL_API_KEY" in nokey.stderr
    down = runrl("runs", "list", "--base-url", f"http://127.0.0.1:{free_port()}", "--api-key", key)
    assert down.returncode == 1 and "cannot reach" in down.stderr and "Traceback" not in down.stderr


# A stand-in trainer that records a W&B URL the way RunOutputs does (the online case cannot run here).
RECORDING = r"""
import json, sys, pathlib
out = pathlib.Path(sys.argv[sys.argv.index('--output') + 1])
cfg = __import__('yaml').safe_load(open(sys.argv[1]))
if cfg.get('run_name') == 'online':
    (out / '%s').write_text(json.dumps({'mode': 'online', 'url': 'https://wandb.ai/me/runrl-engine/runs/abc123'}))
elif cfg.get('run_name') == 'offline':
    (out / '%s').write_text(json.dumps({'mode': 'offline', 'url': None, 'sync': 'wandb sync x'}))
(out / 'metrics.jsonl').write_text(json.dumps({'step': 1, 'reward_mean': 1.0}) + '\n')
""" % (WANDB_FILE, WANDB_FILE)


def test_wandb_url_is_what_the_run_recorded(make_live, settings):
    live = make_live(replace(settings, train_command=(sys.executable, "-c", RECORDING)))
    with live.client(live.key()) as c:
        p, r = upload(c)
        ids = {name: c.post("/runs", json=body(p, r, run_name=name)).json()["data"]["id"]
               for name in ("online", "offline", "none")}
        for run_id in ids.values():
            wait_status(c, run_id, {"COMPLETED"})
        urls = {name: c.get(f"/runs/{run_id}").json()["data"]["wandb_url"] for name, run_id in ids.items()}
        assert urls == {"online": "https://wandb.ai/me/runrl-engine/runs/abc123", "offline": None, "none": None}
        listed = {run["id"]: run["wandb_url"] for run in c.get("/runs").json()["data"]["items"]}
        assert listed[ids["online"]] == urls["online"]
