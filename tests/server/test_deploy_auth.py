"""Issue 16 findings 1 and 11 (deployments): a deployment's model server (a real `python -m server.deploy` on
`builtin:tiny`) refuses every request without its per-deployment secret, the secret is not on its command line,
the API's proxy still answers with a valid key, and a kill -9 of the API server leaves no model server running."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.store import Store
from tests.server.conftest import completed_run, free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "Say hi"}]


def _completed_run(store: Store, runs_dir: Path, model_dir: Path, user: str = "alice") -> int:
    """A COMPLETED run whose `final/` is the builtin tiny model (what a finished run leaves)."""
    run_id = completed_run(store, user)
    shutil.copytree(model_dir, runs_dir / str(run_id) / "final")
    return run_id


def _deploy(c: httpx.Client, run_id: int, timeout: float = 120) -> dict:
    r = c.post("/deployments", json={"run_id": run_id})
    assert r.status_code == 201, r.text
    dep_id, deadline = r.json()["data"]["id"], time.time() + timeout
    while (dep := c.get(f"/deployments/{dep_id}").json()["data"])["status"] == "pending":
        assert time.time() < deadline, "deployment stayed pending"
        time.sleep(0.3)
    assert dep["status"] == "active", dep
    return dep


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_model_server_refuses_requests_without_its_secret(live, tiny_model_dir):
    key = live.key("alice")
    store = live.app.state.services.store
    run_id = _completed_run(store, live.settings.runs_dir, tiny_model_dir)
    with live.client(key) as c:
        dep = _deploy(c, run_id)
        row = store.one("SELECT pid, port FROM deployments WHERE id = ?", (dep["id"],))
        direct = f"http://127.0.0.1:{row['port']}"
        # what alice's reward code did: talk to the loopback port directly — no key, a wrong one, an API key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {key}"},
                        {"Authorization": "Basic eDp5"}):
            for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
                r = httpx.request(method, direct + path, headers=headers, json={"messages": MESSAGES}, timeout=30)
                assert r.status_code == 401, (headers, path, r.status_code, r.text)
        secret = live.app.state.services.deployments.token(dep["id"])
        assert secret and secret.encode() not in Path(f"/proc/{row['pid']}/cmdline").read_bytes()
        if os.geteuid() == 0 and shutil.which("setpriv"):  # the uid sandboxed user code runs as cannot read it
            peek = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat",
                                   f"/proc/{row['pid']}/environ"], capture_output=True)
            assert peek.returncode != 0 and secret.encode() not in peek.stdout
        # the API's proxy adds the secret: a valid key of the owner still gets a completion
        r = c.post(f"/deployments/{dep['id']}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4},
                   timeout=120)
        assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text
        assert c.get(f"/deployments/{dep['id']}/v1/models").json()["data"][0]["id"] == f"run-{run_id}"
        assert c.delete(f"/deployments/{dep['id']}").status_code == 200


SERVER_SCRIPT = """
import sys, uvicorn
from pathlib import Path
from server.app import create_app
from server.settings import Settings
s = Settings(data_dir=Path(sys.argv[1]), poll_interval_s=0.1, start_worker=False)
uvicorn.run(create_app(s), host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')
"""


def test_model_server_dies_with_a_killed_api_server(tmp_path, tiny_model_dir):
    from server.cli import create_key

    data = tmp_path / "data"
    token = create_key(name="k", scopes=["read", "write"], user="alice", data_dir=data)
    store = Store(data / "runrl.db")
    run_id = _completed_run(store, data / "runs", tiny_model_dir)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(data), str(port)], cwd=REPO)
    pid = None
    try:
        url, deadline = f"http://127.0.0.1:{port}/api/v1", time.time() + 30
        while True:
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.time() < deadline and server.poll() is None, "server did not start"
                time.sleep(0.1)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            dep = _deploy(c, run_id)
        pid = store.one("SELECT pid FROM deployments WHERE id = ?", (dep["id"],))["pid"]
        assert _running(pid)
        server.send_signal(signal.SIGKILL)
        server.wait()
        deadline = time.time() + 10
        while _running(pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _running(pid), "the model server outlived the killed API server"
    finally:
        server.kill()
        server.wait()
        store.close()
        if pid and _running(pid):
            os.killpg(pid, signal.SIGKILL)
