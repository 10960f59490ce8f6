"""Runs through the durable queue with a stand-in training command (tests about the queue itself): the
lifecycle and history, failure messages, cancel (process group), logs/SSE/metrics/completions, validation of
the create body, ownership, file-delete protection, and restart recovery with a killed server (the run is
resumed; tests/server/test_resume_runs.py checks the resumed run's outputs with the real trainer)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from server.queue import RunQueue, RunStatus, TRANSITIONS
from server.store import Store
from tests.server.conftest import PROMPTS, REWARD, STAND_IN, free_port, wait_status

REPO = Path(__file__).resolve().parents[2]
SFT = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'


def upload(c: httpx.Client) -> tuple[str, str]:
    p = c.post("/files", files={"file": ("p.jsonl", PROMPTS.encode())}, data={"type": "prompt"}).json()["data"]
    r = c.post("/files", json={"type": "reward_function", "name": "r", "content": REWARD}).json()["data"]
    return p["id"], r["id"]


def body(p: str, r: str, **extra) -> dict:
    return {"model": "builtin:tiny", "type": "reward_function", "prompt_file_id": p, "reward_file_id": r,
            "completion_length": 128, **extra}


def test_state_machine_is_explicit():
    assert TRANSITIONS[RunStatus.PENDING] == {RunStatus.SETTING_UP, RunStatus.CANCELLED, RunStatus.FAILED}
    assert TRANSITIONS[RunStatus.RUNNING] == {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED,
                                              RunStatus.PENDING}  # PENDING: its process vanished, resumed
    assert all(not TRANSITIONS[s] for s in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED))


def test_execute_next_is_a_synchronous_step(make_live, settings):
    live = make_live(replace(settings, start_worker=False))
    svc = live.app.state.services
    with live.client(live.key()) as c:
        p, r = upload(c)
        ids = [c.post("/runs", json=body(p, r, run_name="sleep=0,code=0")).json()["data"]["id"] for _ in range(2)]
        assert [c.get(f"/runs/{i}").json()["data"]["status"] for i in ids] == ["PENDING", "PENDING"]
        assert svc.worker.execute_next() == ids[0]  # FIFO, runs to the end
        assert [c.get(f"/runs/{i}").json()["data"]["status"] for i in ids] == ["COMPLETED", "PENDING"]
        assert svc.worker.execute_next() == ids[1]
        assert svc.worker.execute_next() is None
        # a claimed run is leased, not removed: a second queue cannot claim it again
        third = c.post("/runs", json=body(p, r)).json()["data"]["id"]
        other = RunQueue(svc.store, "other-worker")
        assert other.claim()["id"] == third and svc.queue.claim() is None
        assert svc.store.run(third)["lease_owner"] == "other-worker"
        # abandoned-job cleanup: a claim whose lease is not renewed goes back to the queue, with the reason
        fourth = c.post("/runs", json=body(p, r)).json()["data"]["id"]
        stale = RunQueue(svc.store, "stale-worker", lease_s=0.0)
        assert stale.claim()["id"] == fourth and stale.recover(live.settings.runs_dir) == [third, fourth]
        again = c.get(f"/runs/{fourth}").json()["data"]
        assert again["status"] == "PENDING" and again["error_message"] is None
        last = c.get(f"/runs/{fourth}/history").json()["data"]["history"][-1]["message"]
        assert "stopped renewing this run's lease" in last and "(attempt 1)" in last, last
        assert "resume 1 of at most 3" in last and "from the start (no checkpoint was written yet)" in last, last
        assert svc.store.run(fourth)["resumes"] == 1 and svc.store.run(third)["resumes"] == 1


def test_lifecycle_logs_metrics_completions(live):
    with live.client(live.key()) as c:
        p, r = upload(c)
        sft = c.post("/files", json={"type": "sft", "name": "s", "content": SFT}).json()["data"]["id"]
        created = c.post("/runs", json=body(p, r, hf_token="hf_SECRETSECRET", max_steps=2, mystery_key=7,
                                            sft_file_id=sft, run_name="sleep=0.4,code=0"))
        assert created.status_code == 201, created.text
        run = created.json()["data"]
        params = run["parameters"]
        assert params["hf_token"] == "***" and params["mystery_key"] == 7 and params["max_steps"] == 2
        assert params["epochs"] == 1 and run["total_steps"] == 2 and run["uses_tools"] is False
        assert run["prompt_file"]["id"] == p and run["reward_file"]["name"] == "r" and run["progress"] == 0.0
        assert run["sft_file"]["id"] == sft
        assert "hf_SECRETSECRET" not in json.dumps(live.app.state.services.store.run(run["id"])["config"])
        done = wait_status(c, run["id"], {"COMPLETED", "FAILED"})
        assert done["status"] == "COMPLETED", done
        assert done["progress"] == 1.0 and done["started_at"] and done["completed_at"]
        history = c.get(f"/runs/{run['id']}/history").json()["data"]["history"]
        assert [h["status"] for h in history] == ["PENDING", "SETTING_UP", "RUNNING", "COMPLETED"]
        assert all(h["message"] and h["timestamp"] for h in history)
        logs = c.get(f"/runs/{run['id']}/logs", params={"last_line": 0, "limit": 2}).json()["data"]
        assert logs["lines"] == ["starting with token ***", "step 1"] and logs["has_more"]
        assert logs["last_line"] == 2 and logs["total_lines"] == 4
        rest = c.get(f"/runs/{run['id']}/logs", params={"last_line": 2}).json()["data"]
        assert rest["lines"] == ["step 2", "[server] training finished"] and not rest["has_more"]
        m = c.get(f"/runs/{run['id']}/metrics").json()["data"]
        assert [h["reward_mean"] for h in m["history"]] == [0.5, 1.0] and m["summary"]["step"] == 2
        comp = c.get(f"/runs/{run['id']}/completions").json()["data"]
        assert [s["step"] for s in comp["steps"]] == [1, 2] and comp["steps"][0]["samples"][0]["completion"] == "hi"
        assert c.get(f"/runs/{run['id']}/completions", params={"step": 2}).json()["data"]["total_samples"] == 1
        rundir = live.settings.runs_dir / str(run["id"])
        assert (rundir / "inputs" / "sft.jsonl").read_text() == SFT
        assert not (rundir / "run.yaml").exists() and (rundir / "inputs" / "reward.py").read_text() == REWARD
        assert "hf_SECRETSECRET" not in "".join(p.read_text(errors="replace") for p in rundir.rglob("*") if p.is_file())
        # SSE on both paths: a finished run streams its lines then closes at once
        for path in ("logs/stream", "stream-logs"):
            with c.stream("GET", f"/runs/{run['id']}/{path}") as s:
                assert s.headers["content-type"].startswith("text/event-stream")
                lines = [line for line in s.iter_lines() if line]
            assert lines[:2] == ["data: starting with token ***", "data: step 1"]
            assert lines[-2:] == ["event: end", 'data: {"status": "COMPLETED"}']


def test_live_sse_follows_a_running_run(live):
    with live.client(live.key()) as c:
        p, r = upload(c)
        run = c.post("/runs", json=body(p, r, run_name="sleep=2,code=0")).json()["data"]
        t0 = time.time()
        with c.stream("GET", f"/runs/{run['id']}/stream-logs") as s:
            lines = [line for line in s.iter_lines() if line]
        assert time.time() - t0 > 1.0  # it waited for the run instead of closing early
        assert "data: step 2" in lines and lines[-1] == 'data: {"status": "COMPLETED"}'


def test_concurrent_slots(make_live, settings):
    live = make_live(replace(settings, slots=2))
    with live.client(live.key()) as c:
        p, r = upload(c)
        ids = [c.post("/runs", json=body(p, r, run_name="sleep=30,code=0")).json()["data"]["id"] for _ in range(3)]
        for run_id in ids[:2]:
            wait_status(c, run_id, {"RUNNING"})
        time.sleep(0.5)
        assert c.get(f"/runs/{ids[2]}").json()["data"]["status"] == "PENDING"  # two slots, two runs
        for run_id in ids:
            c.post(f"/runs/{run_id}/cancel")
        for run_id in ids:
            assert wait_status(c, run_id, {"CANCELLED", "FAILED", "COMPLETED"})["status"] == "CANCELLED"


def test_token_shapes_are_redacted_from_logs(live):
    token = live.key()
    leak = "rl_abcdefgh_" + "0123456789abcdef0123456789abcdef"
    with live.client(token) as c:
        p, r = upload(c)
        run = c.post("/runs", json=body(p, r, run_name="sleep=0,code=0")).json()["data"]
        wait_status(c, run["id"], {"COMPLETED"})
        with open(live.settings.runs_dir / str(run["id"]) / "logs.txt", "a") as fh:  # as if user code printed it
            fh.write(f"key={leak} hf=hf_{'x' * 34} ok\n")
        last = c.get(f"/runs/{run['id']}/logs").json()["data"]["lines"][-1]
        assert last == "key=*** hf=*** ok"


def test_failures_carry_the_error(live):
    with live.client(live.key()) as c:
        p, r = upload(c)
        user_err = c.post("/runs", json=body(p, r, run_name="sleep=0,code=2")).json()["data"]
        crash = c.post("/runs", json=body(p, r, run_name="sleep=0,code=1")).json()["data"]
        a = wait_status(c, user_err["id"], {"FAILED"})
        assert a["error_message"] == "error: prompt.jsonl:3: bad line\n  fix: repair it"
        b = wait_status(c, crash["id"], {"FAILED"})
        assert b["error_message"] == 'Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: boom'
        logs = c.get(f"/runs/{crash['id']}/logs").json()["data"]["lines"]
        assert logs[-1] == "[server] RuntimeError: boom"


def _alive(pid: int, wait: float = 3.0) -> bool:
    """Whether `pid` still runs after up to `wait` seconds (signal delivery is asynchronous)."""
    deadline = time.time() + wait
    while _running(pid) and time.time() < deadline:
        time.sleep(0.05)
    return _running(pid)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_cancel_kills_the_process_group(make_live, settings):
    # the stand-in starts a grandchild in its process group; cancel must kill both
    spawner = STAND_IN.replace("import json, sys", "import json, sys, subprocess\n"
                               "open(sys.argv[sys.argv.index('--output') + 1] + '/child.pid', 'w').write("
                               "str(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']).pid))\n"
                               "import json, sys")
    live = make_live(replace(settings, train_command=(sys.executable, "-c", spawner)))
    with live.client(live.key()) as c:
        p, r = upload(c)
        running = c.post("/runs", json=body(p, r, run_name="sleep=60,code=0")).json()["data"]
        queued = c.post("/runs", json=body(p, r, run_name="sleep=60,code=0")).json()["data"]
        wait_status(c, running["id"], {"RUNNING"})
        child_file = live.settings.runs_dir / str(running["id"]) / "child.pid"
        while not (child_file.exists() and child_file.read_text().strip()):
            time.sleep(0.05)
        child = int(child_file.read_text())
        pid = live.app.state.services.store.run(running["id"])["pid"]
        assert c.post(f"/runs/{queued['id']}/cancel").json()["data"]["status"] == "CANCELLED"
        assert c.post(f"/runs/{running['id']}/cancel").status_code == 200
        done = wait_status(c, running["id"], {"CANCELLED", "FAILED", "COMPLETED"}, timeout=20)
        assert done["status"] == "CANCELLED"
        assert not _alive(pid), open(f"/proc/{pid}/cmdline").read()
        assert not _alive(child)
        hist = [h["status"] for h in c.get(f"/runs/{queued['id']}/history").json()["data"]["history"]]
        assert hist == ["PENDING", "CANCELLED"]
        again = c.post(f"/runs/{running['id']}/cancel").json()
        assert again["data"]["status"] == "CANCELLED" and "already finished" in again["message"]


def test_create_validation_and_ownership(live):
    alice, bob = live.key("alice"), live.key("bob")
    with live.client(alice) as c, live.client(bob) as b:
        p, r = upload(c)
        bp, br = upload(b)
        cases = [
            ({}, {"model", "type", "prompt_file_id", "reward_file_id"}),
            (body(p, r, completion_length=0), {"completion_length"}),  # the engine's bounds (1..32768)
            (body(p, r, epochs=0), {"epochs"}),
            (body(p, r, learning_rate_multiplier=11), {"learning_rate_multiplier"}),
            (body(p, r, type="judge"), {"type"}),
            (body(r, p), {"prompt_file_id", "reward_file_id"}),  # wrong file types
            (body(bp, br), {"prompt_file_id", "reward_file_id"}),  # another user's files
            (body(p, r, tool_ids=[999]), {"tool_ids"}),
            (body(p, r, lora_dropout=5.0), {"lora_dropout"}),  # engine range, checked by RunConfig
            (body(p, r, num_generations=0), {"num_generations"}),
            (body(p, r, model="/root/secret-model"), {"model"}),  # no server paths over the API
            (body(p, r, model="../runs/1/final"), {"model"}),
            (body(p, r, model="models/llama.gguf"), {"model"}),  # GGUF files are server paths too
            (body(p, r, advantage_estimator="vtrace"), {"advantage_estimator"}),
            (body(p, r, algorithm="ppo", advantage_estimator="rloo"), {"advantage_estimator"}),
        ]
        for payload, fields in cases:
            res = c.post("/runs", json=payload)
            assert res.status_code == 422, (payload, res.text)
            assert set(res.json()["details"]) == fields, res.json()
        # every estimator and the PPO keys are run parameters
        store = live.app.state.services.store
        for estimator in ("grpo", "dr_grpo", "rloo", "reinforce_pp"):
            made = c.post("/runs", json=body(p, r, advantage_estimator=estimator, run_name="sleep=0,code=0"))
            assert made.status_code in (200, 201, 202), made.text
            assert store.run(made.json()["data"]["id"])["config"]["advantage_estimator"] == estimator
        ppo = {"algorithm": "ppo", "ppo_epochs": 2, "num_minibatches": 2, "vf_coef": 0.5, "critic": "separate",
               "kl_in_reward": True, "beta": 0.05, "importance_sampling_level": "sequence"}
        made = c.post("/runs", json=body(p, r, run_name="sleep=0,code=0", **ppo))
        assert made.status_code in (200, 201, 202), made.text
        stored = store.run(made.json()["data"]["id"])["config"]
        assert all(stored[k] == v for k, v in ppo.items())
        from runrl_engine.config import RunConfig

        assert RunConfig.from_dict(stored).advantage_estimator == "gae"  # what the worker's `runrl train` resolves
        # the packaged real model is a builtin name, accepted like builtin:tiny
        made = c.post("/runs", json=body(p, r, model="builtin:smollm2-135m-instruct", run_name="sleep=0,code=0"))
        assert made.status_code in (200, 201, 202), made.text
        assert store.run(made.json()["data"]["id"])["config"]["model"] == "builtin:smollm2-135m-instruct"
        # server paths cannot be injected through engine keys
        res = c.post("/runs", json=body(p, r, prompt_file="/etc/passwd", eval_prompt_file="/etc/shadow",
                                        run_name="sleep=0,code=0"))
        run = res.json()["data"]
        assert run["prompt_file"]["id"] == p
        stored = live.app.state.services.store.run(run["id"])["config"]
        assert stored["prompt_file"] != "/etc/passwd" and stored.get("eval_prompt_file") is None
        for path in ("", "/history", "/logs", "/stream-logs", "/logs/stream", "/metrics", "/completions"):
            assert b.get(f"/runs/{run['id']}{path}").status_code == 404
        assert b.post(f"/runs/{run['id']}/cancel").status_code == 404
        assert b.get("/runs").json()["data"]["items"] == []
        assert c.get("/runs/abc").status_code == 404


def test_list_filters_and_delete_protection(make_live, settings):
    live = make_live(replace(settings, start_worker=False))
    svc = live.app.state.services
    with live.client(live.key()) as c:
        p, r = upload(c)
        ids = [c.post("/runs", json=body(p, r, run_name="sleep=0,code=0")).json()["data"]["id"] for _ in range(3)]
        r_del = c.delete(f"/files/{p}")
        assert r_del.status_code == 422 and r_del.json()["details"]["active_runs"] == ids
        assert c.delete(f"/files/{r}", params={"force": "true"}).status_code == 422
        svc.worker.execute_next()
        c.post(f"/runs/{ids[2]}/cancel")
        statuses = lambda **q: [x["status"] for x in c.get("/runs", params=q).json()["data"]["items"]]  # noqa: E731
        assert statuses() == ["CANCELLED", "PENDING", "COMPLETED"]
        assert statuses(status="COMPLETED,CANCELLED") == ["CANCELLED", "COMPLETED"]
        assert statuses(created_after="2000-01-01", created_before="2000-01-02") == []
        assert statuses(per_page=1, page=3) == ["COMPLETED"]
        assert c.get("/runs", params={"status": "DONE"}).status_code == 422
        c.post(f"/runs/{ids[1]}/cancel")
        # the (cached) list follows every change: status, file renames, another connection's writes
        assert statuses() == ["CANCELLED", "CANCELLED", "COMPLETED"]
        c.put(f"/files/{p}", json={"name": "renamed"})
        items = c.get("/runs").json()["data"]["items"]
        assert {i["prompt_file"]["name"] for i in items} == {"renamed"}
        other = Store(live.settings.db_path)
        other.execute("UPDATE runs SET model = 'changed-elsewhere' WHERE id = ?", (ids[0],))
        other.close()
        assert c.get("/runs").json()["data"]["items"][-1]["model"] == "changed-elsewhere"
        assert c.delete(f"/files/{p}").status_code == 200  # no active run uses it any more
        assert c.get(f"/runs/{ids[0]}").json()["data"]["prompt_file"]["id"] == p


def test_server_shutdown_sends_running_runs_back_to_the_queue(make_live, settings):
    """A graceful shutdown stops the training process and queues the run again (not counted against
    max_resumes); the next server resumes it (`--resume`), and a cancel then still ends it."""
    live = make_live(settings)
    token = live.key()
    with live.client(token) as c:
        p, r = upload(c)
        run_id = c.post("/runs", json=body(p, r, run_name="sleep=60,code=0")).json()["data"]["id"]
        running = wait_status(c, run_id, {"RUNNING"})
        pid = live.app.state.services.store.run(run_id)["pid"]
        # the stand-in has trained (written its first metrics), so the next start is a resume: before that there
        # is nothing to resume from and a plain start is right (under load the process may not have begun yet)
        metrics, deadline = live.settings.runs_dir / str(run_id) / "metrics.jsonl", time.time() + 30
        while not metrics.exists():
            assert time.time() < deadline, "the stand-in trainer never wrote metrics.jsonl"
            time.sleep(0.05)
    live.stop()
    store = Store(live.settings.db_path)
    row = store.run(run_id)
    assert row["status"] == "PENDING" and row["error_message"] is None and row["resumes"] == 0
    last = store.history(run_id)[-1]["message"]
    store.close()
    assert "server shut down" in last and "(attempt 1)" in last and "not counted against max_resumes" in last, last
    assert not _alive(pid)
    again = make_live(settings)
    with again.client(token) as c:
        resumed = wait_status(c, run_id, {"RUNNING"})
        assert resumed["created_at"] == running["created_at"] and resumed["started_at"] == running["started_at"]
        history = c.get(f"/runs/{run_id}/history").json()["data"]["history"]
        assert [h["status"] for h in history] == ["PENDING", "SETTING_UP", "RUNNING", "PENDING", "SETTING_UP",
                                                  "RUNNING"]
        assert history[-1]["message"] == "Resuming training process (attempt 2, --resume)"
        assert c.post(f"/runs/{run_id}/cancel").status_code == 200
        assert wait_status(c, run_id, {"CANCELLED", "FAILED", "COMPLETED"}, timeout=20)["status"] == "CANCELLED"


SERVER_SCRIPT = """
import sys, uvicorn
from pathlib import Path
from server.app import create_app
from server.settings import Settings
s = Settings(data_dir=Path(sys.argv[1]), poll_interval_s=0.1, train_command=(sys.executable, '-c', sys.argv[3]))
uvicorn.run(create_app(s), host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')
"""


def _spawn_server(data_dir: Path, port: int) -> subprocess.Popen:
    return spawn_server([SERVER_SCRIPT, str(data_dir), str(port), STAND_IN], port)


def spawn_server(script_and_args: list[str], port: int) -> subprocess.Popen:
    """`python -c SCRIPT ARGS...` serving on `port`, once its /health answers."""
    proc = subprocess.Popen([sys.executable, "-c", *script_and_args], cwd=REPO)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server subprocess did not start")


@pytest.mark.slow
def test_restart_recovery_after_kill(tmp_path):
    from server.cli import create_key

    data = tmp_path / "data"
    token = create_key(name="k", scopes=["read", "write"], user="alice", data_dir=data)
    port = free_port()
    server = _spawn_server(data, port)
    url = f"http://127.0.0.1:{port}/api/v1"
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
            p, r = upload(c)
            mid = c.post("/runs", json=body(p, r, run_name="sleep=60,code=0")).json()["data"]["id"]
            queued = c.post("/runs", json=body(p, r, run_name="sleep=0,code=0")).json()["data"]["id"]
            wait_status(c, mid, {"RUNNING"})
            pid = Store(data / "runrl.db").run(mid)["pid"]
            server.send_signal(signal.SIGKILL)
            server.wait()
            assert _running(pid)  # the trainer runs on in its own session when the server is killed
        server = _spawn_server(data, port)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
            assert not _alive(pid)  # the orphaned training process was stopped before the run was queued again
            resumed = wait_status(c, mid, {"RUNNING"})  # resumed first: it keeps its place before younger runs
            assert c.get(f"/runs/{queued}").json()["data"]["status"] == "PENDING"
            history = c.get(f"/runs/{mid}/history").json()["data"]["history"]
            assert [h["status"] for h in history] == ["PENDING", "SETTING_UP", "RUNNING", "PENDING", "SETTING_UP",
                                                      "RUNNING"]
            assert history[3]["message"].startswith("The server restarted while this run was in progress; its "
                                                    "training process was stopped (attempt 1); queued again"), history
            assert resumed["error_message"] is None
            c.post(f"/runs/{mid}/cancel")
            assert wait_status(c, mid, {"CANCELLED", "FAILED", "COMPLETED"})["status"] == "CANCELLED"
            assert wait_status(c, queued, {"COMPLETED", "FAILED"})["status"] == "COMPLETED"
            assert {f["id"] for f in c.get("/files").json()["data"]["items"]} == {p, r}
            assert c.get("/runs").json()["data"]["pagination"]["total"] == 2
    finally:
        server.kill()
        server.wait()
