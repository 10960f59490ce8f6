"""Restart-safe runs (issue 14 item 2): a run whose training process vanished is resumed from its last checkpoint.

With the real `runrl train` on `builtin:tiny`: the server killed with SIGKILL mid-run (a subprocess) and started
again, and separately the trainer killed with SIGKILL while the server lives; both runs complete with every step
once in metrics.jsonl and completions.jsonl, and a history entry for the resume. With the stand-in trainer (the
queue alone): the attempt bound, exits 1 and 2 never retried, and a cancel winning over a resume, also one that
comes while the run is being put back in the queue.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from server.cli import create_key
from server.queue import RunQueue
from server.settings import Settings
from server.store import Store
from server.worker import killed_by
from tests.server.conftest import PROMPTS, free_port, wait_status
from tests.server.test_runs_queue import _alive, _running, body, spawn_server, upload

# each reward call sleeps, so a step takes about a second: the tests kill the run after step 2, well before the end
SLOW_REWARD = ("import time\ndef reward_fn(completion, **kwargs):\n    time.sleep(0.3)\n"
               "    return float(kwargs.get('expected', '') in completion)\n")
TRAIN = dict(completion_length=8, save_every=1, prompts_per_step=2, num_generations=2)
REAL_SERVER = """
import sys, uvicorn
from pathlib import Path
from server.app import create_app
from server.settings import Settings
s = Settings(data_dir=Path(sys.argv[1]), poll_interval_s=0.1, allowed_destinations=tuple(sys.argv[3:]))
uvicorn.run(create_app(s), host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')
"""


def upload_slow(c: httpx.Client) -> tuple[str, str]:
    p = c.post("/files", files={"file": ("p.jsonl", PROMPTS.encode())}, data={"type": "prompt"}).json()["data"]
    r = c.post("/files", json={"type": "reward_function", "name": "r", "content": SLOW_REWARD}).json()["data"]
    return p["id"], r["id"]


def wait_for_step(run_dir: Path, step: int, timeout: float = 120) -> int:
    """Wait until metrics.jsonl has a record for `step` or later; returns the last step logged."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines()] if path.exists() else []
        if steps and steps[-1] >= step:
            return steps[-1]
        time.sleep(0.05)
    raise AssertionError(f"{run_dir} never logged step {step}")


def assert_each_step_once(run_dir: Path, steps: int) -> None:
    logged = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1)), logged
    per_step = collections.Counter(json.loads(x)["step"] for x in (run_dir / "completions.jsonl").read_text()
                                   .splitlines())
    assert per_step == {s: 4 for s in range(1, steps + 1)}, per_step  # 2 prompts x 2 completions each step


def resumed_at(run_dir: Path) -> int:
    """The step the resumed trainer continued from (its 'resumed from ... at step K of N' log line)."""
    lines = [x for x in (run_dir / "logs.txt").read_text().splitlines() if "resumed from" in x]
    assert len(lines) == 1, lines
    return int(lines[0].split(" at step ", 1)[1].split()[0])


def spawn(data: Path, port: int, *allowed_destinations: str) -> subprocess.Popen:
    return spawn_server([REAL_SERVER, str(data), str(port), *allowed_destinations], port)


@pytest.mark.slow
def test_server_killed_mid_run_resumes_from_the_checkpoint(tmp_path):
    steps = 8  # the orphaned trainer runs on until the new server has started: leave it steps to do
    data = tmp_path / "data"
    token = create_key(name="k", scopes=["read", "write"], user="alice", data_dir=data)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1"
    server = spawn(data, port)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            p, r = upload_slow(c)
            run = c.post("/runs", json=body(p, r, max_steps=steps, **TRAIN)).json()["data"]
            run_dir = data / "runs" / str(run["id"])
            killed_at = wait_for_step(run_dir, 2)
            pid = Store(data / "runrl.db").run(run["id"])["pid"]
            server.send_signal(signal.SIGKILL)
            server.wait()
        assert killed_at < steps and _running(pid)  # the trainer outlives the server (its own session)
        server = spawn(data, port, "127.0.0.1:9")  # restarted with another policy, which the resumed run gets
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            assert not _alive(pid)  # the new server stopped the orphan before it queued the run again
            done = wait_status(c, run["id"], {"COMPLETED", "FAILED", "CANCELLED"}, timeout=180)
            assert done["status"] == "COMPLETED", done
            assert done["created_at"] == run["created_at"] and done["progress"] == 1.0
            history = c.get(f"/runs/{run['id']}/history").json()["data"]["history"]
        assert [h["status"] for h in history] == ["PENDING", "SETTING_UP", "RUNNING", "PENDING", "SETTING_UP",
                                                  "RUNNING", "COMPLETED"]
        why = history[3]["message"]
        assert why.startswith("The server restarted while this run was in progress; its training process was "
                              "stopped (attempt 1); queued again to resume from its last checkpoint (step-"), why
        assert why.endswith("resume 1 of at most 3"), why
        assert history[5]["message"] == "Resuming training process (attempt 2, --resume)"
        assert 1 <= resumed_at(run_dir) < steps
        assert_each_step_once(run_dir, steps)
        assert f"[server] {why}\n" in (run_dir / "logs.txt").read_text()
        changes = [x for x in (run_dir / "logs.txt").read_text().splitlines() if "resumed with changes:" in x]
        assert len(changes) == 1 and "reward_allowed_destinations: [] -> ['127.0.0.1:9']" in changes[0], changes
        assert not (run_dir / "run.yaml").exists() and (run_dir / "checkpoints").is_dir()
    finally:
        server.kill()
        server.wait()


@pytest.mark.slow
def test_killed_trainer_resumes_from_the_checkpoint(make_live, settings):
    steps = 5
    live = make_live(replace(settings, train_command=Settings.train_command))
    with live.client(live.key()) as c:
        p, r = upload_slow(c)
        run = c.post("/runs", json=body(p, r, max_steps=steps, **TRAIN)).json()["data"]
        run_dir = live.settings.runs_dir / str(run["id"])
        wait_for_step(run_dir, 2)
        pid = live.app.state.services.store.run(run["id"])["pid"]
        os.kill(pid, signal.SIGKILL)  # as the OOM killer does: the trainer alone, not its process group
        done = wait_status(c, run["id"], {"COMPLETED", "FAILED", "CANCELLED"}, timeout=180)
        assert done["status"] == "COMPLETED", done
        history = c.get(f"/runs/{run['id']}/history").json()["data"]["history"]
    assert [h["status"] for h in history] == ["PENDING", "SETTING_UP", "RUNNING", "PENDING", "SETTING_UP",
                                              "RUNNING", "COMPLETED"]
    step = resumed_at(run_dir)
    assert history[3]["message"] == (f"Training process was killed by SIGKILL (attempt 1); queued again to resume "
                                     f"from its last checkpoint (step-{step}), resume 1 of at most 3")
    assert 1 <= step < steps
    assert_each_step_once(run_dir, steps)
    assert "[server] Training process was killed by SIGKILL (attempt 1)" in (run_dir / "logs.txt").read_text()


def test_a_trainer_killed_every_time_fails_after_max_resumes(make_live, settings):
    live = make_live(replace(settings, max_resumes=2))
    with live.client(live.key()) as c:
        p, r = upload(c)
        run = c.post("/runs", json=body(p, r, run_name="sleep=0,code=-9")).json()["data"]
        later = c.post("/runs", json=body(p, r, run_name="sleep=0,code=0")).json()["data"]
        done = wait_status(c, run["id"], {"COMPLETED", "FAILED", "CANCELLED"})
        history = c.get(f"/runs/{run['id']}/history").json()["data"]["history"]
        assert done["status"] == "FAILED" and done["created_at"] == run["created_at"]
        assert done["error_message"].startswith(
            "Training process was killed by SIGKILL (attempt 3); it was resumed 2 time(s) already, the most "
            "max_resumes (2) allows, so the run has failed"), done["error_message"]
        assert wait_status(c, later["id"], {"COMPLETED", "FAILED"})["status"] == "COMPLETED"
        later_started = c.get(f"/runs/{later['id']}/history").json()["data"]["history"][1]["timestamp"]
    assert [h["status"] for h in history] == ["PENDING"] + ["SETTING_UP", "RUNNING", "PENDING"] * 2 + [
        "SETTING_UP", "RUNNING", "FAILED"]
    assert [h["message"] for h in history if h["status"] == "RUNNING"] == [
        "Starting training process", "Resuming training process (attempt 2, --resume)",
        "Resuming training process (attempt 3, --resume)"]
    assert "(attempt 2); queued again to resume from the start (no checkpoint was written yet), resume 2 of at " \
           "most 2" in history[6]["message"]
    assert history[-1]["timestamp"] < later_started  # the resumed run kept its place before the younger one
    row = live.app.state.services.store.run(run["id"])
    assert (row["attempts"], row["resumes"]) == (3, 2)


def test_exits_1_and_2_are_failures_never_retried(live):
    with live.client(live.key()) as c:
        p, r = upload(c)
        ids = [c.post("/runs", json=body(p, r, run_name=f"sleep=0,code={code}")).json()["data"]["id"]
               for code in (2, 1)]
        for run_id in ids:
            assert wait_status(c, run_id, {"COMPLETED", "FAILED"})["status"] == "FAILED"
            history = c.get(f"/runs/{run_id}/history").json()["data"]["history"]
            assert [h["status"] for h in history] == ["PENDING", "SETTING_UP", "RUNNING", "FAILED"]
            assert live.app.state.services.store.run(run_id)["attempts"] == 1


def test_what_counts_as_a_vanished_process():
    assert killed_by(-9) == "SIGKILL" and killed_by(-15) == "SIGTERM"
    assert killed_by(137) == "SIGKILL"  # `runrl launch` (or a shell) reporting its child's signal as 128+N
    assert killed_by(0) is None and killed_by(1) is None and killed_by(2) is None and killed_by(128) is None


def test_cancel_wins_over_a_resume(make_live, settings):
    live = make_live(replace(settings, start_worker=False))
    svc = live.app.state.services
    with live.client(live.key()) as c:
        p, r = upload(c)
        # a run whose server died (its lease is gone) with a cancel request: CANCELLED, not queued again
        first = c.post("/runs", json=body(p, r)).json()["data"]["id"]
        assert RunQueue(svc.store, "dead-server", lease_s=0.0).claim()["id"] == first
        assert c.post(f"/runs/{first}/cancel").json()["data"]["status"] == "SETTING_UP"
        assert svc.queue.recover(live.settings.runs_dir) == [first]
        assert c.get(f"/runs/{first}").json()["data"]["status"] == "CANCELLED"
        assert c.get(f"/runs/{first}/history").json()["data"]["history"][-1]["message"].startswith(
            "Cancelled by user; the server restarted while this run was in progress")
        # the cancel comes while the run is being put back (after its row was read): it ends CANCELLED
        second = c.post("/runs", json=body(p, r)).json()["data"]["id"]
        assert RunQueue(svc.store, "dead-server", lease_s=0.0).claim()["id"] == second
        before = svc.store.run(second)
        c.post(f"/runs/{second}/cancel")
        state, message = svc.queue.resume_or_fail(before, live.settings.runs_dir / str(second), "It vanished")
        assert (state.value, message) == ("CANCELLED", "Cancelled by user while it waited to resume")
        statuses = [h["status"] for h in c.get(f"/runs/{second}/history").json()["data"]["history"]]
        assert statuses == ["PENDING", "SETTING_UP", "PENDING", "CANCELLED"]
        assert svc.worker.execute_next() is None  # neither is ever started again


def test_cancel_during_a_resume_loop_ends_it(make_live, settings):
    live = make_live(replace(settings, max_resumes=1000))
    store = live.app.state.services.store
    with live.client(live.key()) as c:
        p, r = upload(c)
        run_id = c.post("/runs", json=body(p, r, run_name="sleep=0.2,code=-9")).json()["data"]["id"]
        deadline = time.time() + 30
        while store.run(run_id)["resumes"] < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert c.post(f"/runs/{run_id}/cancel").status_code == 200
        assert wait_status(c, run_id, {"CANCELLED", "FAILED", "COMPLETED"})["status"] == "CANCELLED"
        attempts = store.run(run_id)["attempts"]
        time.sleep(1.0)  # several poll intervals: nothing claims it again
        assert store.run(run_id)["attempts"] == attempts and c.get(f"/runs/{run_id}").json()["data"][
            "status"] == "CANCELLED"
