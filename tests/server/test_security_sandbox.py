"""The server's policy for user code (issue 16): isolation required, validation in its own bounded pool,
requirement specifiers only, no network unless the operator allows it, no secret or user file left on disk.
A real server on loopback, real bubblewrap sandboxes, the real `runrl train` where a run must really start."""

from __future__ import annotations

import os
import stat
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from runrl_engine.sandbox.isolation import detect_isolation
from server.settings import Settings
from tests.server.conftest import PROMPTS, REWARD, wait_status

SLOW = "import time\ndef reward_fn(completion, **row):\n    time.sleep(6)\n    return 1.0\n"


def upload(c: httpx.Client, reward: str = REWARD) -> tuple[str, str]:
    p = c.post("/files", json={"type": "prompt", "name": "p.jsonl", "content": PROMPTS}).json()["data"]
    r = c.post("/files", json={"type": "reward_function", "name": "r.py", "content": reward}).json()["data"]
    return p["id"], r["id"]


def body(p: str, r: str, **extra) -> dict:
    return {"model": "builtin:tiny", "type": "reward_function", "prompt_file_id": p, "reward_file_id": r,
            "completion_length": 128, **extra}


@pytest.fixture
def broken_bwrap(tmp_path, monkeypatch):
    """A `bwrap` first on PATH that cannot start a sandbox (as on a host without user namespaces)."""
    bin_dir = tmp_path / "broken-bin"
    bin_dir.mkdir()
    fake = bin_dir / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    monkeypatch.setenv("PATH", path)
    detect_isolation.cache_clear()
    yield path
    detect_isolation.cache_clear()


# ---- finding 3: no working bubblewrap -> user code is refused, not run unconfined ----------------------------

def test_without_bubblewrap_validation_and_runs_are_refused(make_live, settings, broken_bwrap, tmp_path):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\ndef reward_fn(completion, **row):\n    return 1.0\n"
    live = make_live(replace(settings, train_command=Settings.train_command,
                             extra_env={"PATH": broken_bwrap}))
    with live.client(live.key()) as c:
        got = c.post("/validation/reward-function", json={"functionCode": code})
        assert got.status_code == 503 and "bubblewrap" in got.json()["message"]
        assert "No permissions" in got.json()["details"]["isolation"]
        p, r = upload(c, code)
        run_id = c.post("/runs", json=body(p, r, max_steps=1)).json()["data"]["id"]
        run = wait_status(c, run_id, {"FAILED", "COMPLETED"}, timeout=180)
    assert run["status"] == "FAILED" and "bubblewrap" in run["error_message"], run
    assert "sandbox_isolation" in run["error_message"] and not marker.exists()


def test_operator_can_allow_unisolated_validation(make_live, settings, broken_bwrap):
    live = make_live(replace(settings, require_isolation=False))
    with live.client(live.key()) as c:
        got = c.post("/validation/reward-function", json={"functionCode": REWARD}).json()["data"]
    assert got["valid"] and got["details"]["samples"][0]["isolation"] == "subprocess"


# ---- finding 6: validation cannot starve other users ---------------------------------------------------------

def test_validation_pool_caps_each_user_and_never_blocks_cheap_checks(make_live, settings):
    live = make_live(replace(settings, validation_workers=3, validation_per_user=2))
    alice, bob = live.key("alice"), live.key("bob")
    codes: list[int] = []

    def slow_validation() -> None:
        with live.client(alice) as c:
            codes.append(c.post("/validation/reward-function", json={"functionCode": SLOW}).status_code)

    threads = [threading.Thread(target=slow_validation) for _ in range(2)]
    for t in threads:
        t.start()
    with live.client(bob) as b, live.client(alice) as a:
        p = b.post("/files", json={"type": "prompt", "name": "p.jsonl", "content": PROMPTS}).json()["data"]["id"]
        deadline = time.time() + 30
        while live.app.state.services.validation._busy < 2 and time.time() < deadline:
            time.sleep(0.05)
        third = a.post("/validation/reward-function", json={"functionCode": SLOW})
        assert third.status_code == 429 and third.headers["Retry-After"] == "5"
        assert third.json()["error"] == "rate_limit_exceeded"
        cheap = b.post("/validation/prompt", json={"prompt_file_id": p})
        assert cheap.status_code == 200 and cheap.json()["data"]["valid"]
        assert not codes, "bob's prompt check answered only after alice's validations"  # they are still running
        own = b.post("/validation/reward-function", json={"functionCode": REWARD})  # the pool's last worker
        assert own.status_code == 200 and own.json()["data"]["valid"]
    for t in threads:
        t.join()
    assert codes == [200, 200]


def test_a_full_pool_answers_503_at_once(make_live, settings):
    live = make_live(replace(settings, validation_workers=1, validation_per_user=1))
    started = threading.Event()

    def slow() -> None:
        with live.client(live.key("alice")) as c:
            started.set()
            c.post("/validation/reward-function", json={"functionCode": SLOW})

    t = threading.Thread(target=slow)
    t.start()
    started.wait()
    deadline = time.time() + 30
    while live.app.state.services.validation._busy < 1 and time.time() < deadline:
        time.sleep(0.05)
    with live.client(live.key("bob")) as c:
        got = c.post("/validation/reward-function", json={"functionCode": REWARD})
    t.join()
    assert got.status_code == 503 and got.headers["Retry-After"] == "5" and "busy" in got.json()["message"]


def test_validation_memory_cap_is_the_servers(make_live, settings):
    live = make_live(replace(settings, validation_memory_mb=128))
    hog = "def reward_fn(completion, **row):\n    x = bytearray(300 * 1024 * 1024)\n    return 1.0\n"
    with live.client(live.key()) as c:
        got = c.post("/validation/reward-function", json={"functionCode": hog}).json()["data"]
    assert not got["valid"] and "MemoryError" in got["error"], got


# ---- finding 2: package_requirements are specifiers only ------------------------------------------------------

@pytest.mark.parametrize("entry", ["/etc", "/no/such/dir", "{data}", "{data}/runrl.db-wal", "../x", "./pkg",
                                   "file:///etc/passwd"])
def test_host_paths_in_requirements_are_refused_alike(live, entry):
    data = str(live.settings.data_dir)
    with live.client(live.key()) as c:
        p, r = upload(c)
        got = c.post("/runs", json=body(p, r, package_requirements=["sympy", entry.format(data=data)]))
    assert got.status_code == 422
    detail = got.json()["details"]["package_requirements"]
    assert detail.startswith("entry 2 (") and "not a requirement specifier" in detail
    assert "exist" not in detail.replace("not a requirement", "")


def test_url_requirements_only_when_the_operator_allows(make_live, settings):
    url = "pkg @ https://files.example/pkg-1.0-py3-none-any.whl"
    strict, lenient = make_live(settings), make_live(replace(settings, allow_url_requirements=True))
    for srv, expect in ((strict, 422), (lenient, 201)):
        with srv.client(srv.key()) as c:
            p, r = upload(c)
            got = c.post("/runs", json=body(p, r, package_requirements=[url], run_name="sleep=0,code=0"))
            assert got.status_code == expect, got.json()
    assert "--allow-url-requirements" in str(got.json()) or expect == 201


# ---- finding 1 (network half): user code gets no network unless the operator allows it -----------------------

def test_network_for_user_code_is_the_operators_choice(make_live, settings):
    strict = make_live(settings)
    with strict.client(strict.key()) as c:
        p, r = upload(c)
        refused = c.post("/runs", json=body(p, r, reward_allow_network=True))
        assert refused.status_code == 422 and "--allow-user-network" in refused.json()["details"]["reward_allow_network"]
        run_id = c.post("/runs", json=body(p, r, run_name="sleep=0,code=0")).json()["data"]["id"]
        wait_status(c, run_id, {"COMPLETED"})
    config = strict.app.state.services.store.run(run_id)["config"]
    assert config["reward_allow_network"] is False and config["sandbox_isolation"] == "bwrap"
    lenient = make_live(replace(settings, allow_user_network=True, require_isolation=False))
    with lenient.client(lenient.key()) as c:
        p, r = upload(c)
        run_id = c.post("/runs", json=body(p, r, reward_allow_network=True, sandbox_isolation="subprocess",
                                           run_name="sleep=0,code=0")).json()["data"]["id"]
    config = lenient.app.state.services.store.run(run_id)["config"]
    assert config["reward_allow_network"] is True and config["sandbox_isolation"] == "auto"  # not from the body


# ---- finding 11: nothing secret or user-written stays on disk --------------------------------------------------

def test_the_run_config_on_disk_never_holds_the_token(live):
    with live.client(live.key()) as c:
        p, r = upload(c)
        run_id = c.post("/runs", json=body(p, r, hf_token="hf_SECRETSECRETSECRET",
                                           run_name="sleep=3,code=0")).json()["data"]["id"]
        wait_status(c, run_id, {"RUNNING"})
        run_dir = live.settings.runs_dir / str(run_id)
        deadline = time.time() + 20
        while not (run_dir / "logs.txt").exists() and time.time() < deadline:
            time.sleep(0.05)
        on_disk = (run_dir / "run.yaml").read_text()
        assert "SECRETSECRET" not in on_disk and "hf_token" not in on_disk
        wait_status(c, run_id, {"COMPLETED"})
    # the trainer got it through the pipe (it printed it; the worker redacted the log afterwards)
    log = (run_dir / "logs.txt").read_text()
    assert "starting with token ***" in log and "SECRETSECRET" not in log
    assert not (run_dir / "run.yaml").exists()


def test_stale_validation_dirs_are_removed_at_start(settings, make_live):
    stale = settings.data_dir / "validate" / "runrl-validate-left-by-a-kill"
    stale.mkdir(parents=True)
    (stale / "code.py").write_text("secret user code")
    make_live(settings)
    assert not stale.exists()


def test_a_cancelled_real_run_leaves_no_user_files(make_live, settings):
    live = make_live(replace(settings, train_command=Settings.train_command))
    with live.client(live.key()) as c:
        p, r = upload(c, "import time\ndef reward_fn(completion, **row):\n    time.sleep(0.5)\n    return 1.0\n")
        run_id = c.post("/runs", json=body(p, r, max_steps=200, completion_length=128)).json()["data"]["id"]
        run_dir = live.settings.runs_dir / str(run_id)
        deadline = time.time() + 240
        while not list((run_dir / "sandbox").glob("rank0/runrl-sandbox-*")) and time.time() < deadline:
            time.sleep(0.2)
        assert list((run_dir / "sandbox").glob("rank0/runrl-sandbox-*")), (run_dir / "logs.txt").read_text()
        c.post(f"/runs/{run_id}/cancel")
        assert wait_status(c, run_id, {"CANCELLED", "FAILED", "COMPLETED"}, timeout=60)["status"] == "CANCELLED"
    assert not (run_dir / "sandbox").exists() and not (run_dir / "run.yaml").exists()
    assert "terminated (SIGTERM)" in (run_dir / "stderr.log").read_text()  # the trainer unwound, not just died


# ---- `runrl serve`: the policy flags reach the settings; X-Forwarded-For is not believed by default -----------

def test_runrl_serve_throttles_by_the_real_address(tmp_path):
    import signal
    import subprocess
    import sys

    from tests.server.conftest import free_port

    port = free_port()
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--data-dir",
                             str(tmp_path / "home"), "--slots", "1", "--allow-destination", "127.0.0.1:9"],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api/v1/health"
    try:
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.1)
        bad = "rl_aaaaaaaa_" + "b" * 32
        codes = [httpx.get(url, headers={"Authorization": f"Bearer {bad}", "X-Forwarded-For": f"10.0.0.{i}"}).status_code
                 for i in range(31)]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert codes[:30] == [401] * 30 and codes[30] == 429  # default auth_failures_per_minute=30, one address


def test_runrl_serve_refuses_a_malformed_destination(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--data-dir", str(tmp_path),
                           "--allow-destination", "127.0.0.1:notaport"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--allow-destination 127.0.0.1:notaport" in done.stderr
