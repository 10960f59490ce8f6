"""Envelope, error handlers, auth (hashing, scopes, expiry, ownership), rate limits, keys, health, CLI."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys

import httpx
import pytest
import runrl
from runrl.exceptions import NotFoundError

from server.routes import MAX_PER_PAGE

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_server_import_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, server.app, server.cli, server.worker; "
                          "print('torch' in sys.modules or 'transformers' in sys.modules)"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_keys_create_cli_prints_only_the_token(tmp_path):
    out = subprocess.run([sys.executable, "-m", "server.cli", "keys", "create", "--name", "ci", "--scopes",
                          "read,write", "--user", "bob", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, check=True)
    token = out.stdout.strip()
    assert out.stdout.count("\n") == 1
    parts = token.split("_")
    assert parts[0] == "rl" and len(parts[1]) == 8 and len(parts[2]) == 32
    db = sqlite3.connect(tmp_path / "runrl.db")
    (stored,) = db.execute("SELECT key_hash FROM api_keys").fetchone()
    assert stored == hashlib.sha256(token.encode()).hexdigest()
    raw = (tmp_path / "runrl.db").read_bytes() + (tmp_path / "runrl.db-wal").read_bytes() \
        if (tmp_path / "runrl.db-wal").exists() else (tmp_path / "runrl.db").read_bytes()
    assert parts[2].encode() not in raw  # the secret is never stored
    bad = subprocess.run([sys.executable, "-m", "server.cli", "keys", "create", "--name", "x", "--scopes",
                          "root", "--data-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "scope" in bad.stderr and "Traceback" not in bad.stderr


def test_envelope_for_errors(live):
    token = live.key()
    with live.client(token) as c:
        r = c.get("/health")
        assert r.status_code == 200 and r.json()["success"] is True and r.json()["data"]["status"] == "ok"
        r = c.get("/nope")
        assert r.status_code == 404 and r.json() == {"success": False, "error": "not_found",
                                                     "message": "No route for GET /api/v1/nope"}
        r = c.delete("/health")
        assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
        r = c.post("/keys", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "bad_request" and "Malformed JSON" in r.json()["message"]
        r = c.post("/keys", json={"scopes": ["read"]})
        assert r.status_code == 422 and r.json()["details"] == {"name": "is required"}
        r = c.post("/keys", json=["a"])
        assert r.status_code == 422 and r.json()["error"] == "validation_error"
        r = c.get("/files", params={"per_page": MAX_PER_PAGE + 1})
        assert r.status_code == 422 and "per_page" in r.json()["details"]


def test_500_has_no_traceback(live):
    def boom(*a, **k):
        raise RuntimeError("secret internals /etc/passwd")

    live.app.state.services.store.history = boom  # an engine bug, simulated on this app instance only
    token = live.key()
    with live.client(token) as c:
        run_id = live.app.state.services.store.insert("runs", {
            "user_id": 1, "status": "PENDING", "type": "reward_function", "model": "m", "parameters": {},
            "config": {}, "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"})
        r = c.get(f"/runs/{run_id}/history")
    assert r.status_code == 500
    assert r.json() == {"success": False, "error": "internal_error", "message": "Internal server error"}
    assert "Traceback" not in r.text and "passwd" not in r.text


def test_auth_failures(live):
    with live.client(None) as c:
        r = c.get("/files")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    for bad in ("rl_short_x", "rl_aaaaaaaa_" + "b" * 32, "Bearer"):
        with live.client(bad) as c:
            assert c.get("/files").status_code == 401
    read_only = live.key(scopes="read")
    with live.client(read_only) as c:
        r = c.post("/files", json={"type": "reward_function", "name": "r", "content": "x"})
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        assert c.get("/files").status_code == 200
        r = c.post("/keys", json={"name": "escalate", "scopes": ["write"]})
        assert r.status_code == 403  # read keys cannot create keys


def test_inactive_and_expired_keys(live):
    token = live.key()
    sdk = runrl.RunRLClient(api_key=token, base_url=live.url)
    created = sdk.api_keys.create(name="second", scopes=["read", "write"], expires_at="2099-01-01")
    assert created.api_key.active and created.api_key.requests_per_hour == 10000
    second = created.token
    with live.client(second) as c:
        assert c.get("/files").status_code == 200
    sdk.api_keys.update(created.api_key.id, active=False)
    with live.client(second) as c:
        r = c.get("/files")
        assert r.status_code == 401 and "inactive" in r.json()["message"]
    expired = sdk.api_keys.create(name="old", scopes=["read"], expires_at="2020-01-01").token
    with live.client(expired) as c:
        r = c.get("/files")
        assert r.status_code == 401 and "expired" in r.json()["message"]


def test_keys_sdk_round_trip_and_ownership(live):
    alice = runrl.RunRLClient(api_key=live.key("alice"), base_url=live.url)
    bob_token = live.key("bob")
    bob = runrl.RunRLClient(api_key=bob_token, base_url=live.url)
    made = alice.api_keys.create(name="ci", scopes=["read"], requests_per_hour=50)
    assert made.warning and made.token.startswith("rl_") and made.api_key.masked_key.endswith(made.token[-4:])
    names = [k.name for k in alice.api_keys.list()]
    assert names == ["test", "ci"]
    assert [k.name for k in bob.api_keys.list()] == ["test"]
    updated = alice.api_keys.update(made.api_key.id, name="ci2", scopes=["read"], requests_per_hour=40)
    assert updated.name == "ci2" and updated.requests_per_hour == 40  # lowered (only admin raises)
    for call in (lambda: bob.api_keys.update(made.api_key.id, name="x"), lambda: bob.api_keys.usage(made.api_key.id),
                 lambda: bob.api_keys.delete(made.api_key.id)):
        with pytest.raises(NotFoundError):
            call()
    with live.client(made.token) as c:
        for _ in range(3):
            c.get("/files")
    usage = alice.api_keys.usage(made.api_key.id)
    assert usage["requests_this_hour"] == 3 and usage["total_requests"] == 3 and usage["remaining_requests"] == 37
    alice.api_keys.delete(made.api_key.id)
    with live.client(made.token) as c:
        assert c.get("/files").status_code == 401


def test_rate_limit_headers_and_429(live):
    token = live.key()
    with live.client(token) as c:
        key_id = c.get("/keys").json()["data"][0]["id"]
        r = c.put(f"/keys/{key_id}", json={"requests_per_hour": 5})
        assert r.status_code == 200
        seen = []
        for _ in range(3):
            r = c.get("/nope-404")  # headers on every response, errors included
            seen.append(int(r.headers["X-RateLimit-Remaining"]))
            assert r.headers["X-RateLimit-Limit"] == "5" and int(r.headers["X-RateLimit-Reset"]) > 0
        assert seen == [2, 1, 0]  # the GET and the PUT were the first two of the 5
        r = c.get("/files")
        assert r.status_code == 429
        body = r.json()
        assert body["error"] == "rate_limit_exceeded" and body["details"]["retry_after"] > 0
        assert body["retry_after"] == body["details"]["retry_after"] and body["reset_time"].endswith(" UTC")
        assert 0 < int(r.headers["Retry-After"]) <= 3600 and r.headers["X-RateLimit-Remaining"] == "0"


def test_runrl_serve_with_sdk_from_environment(tmp_path):
    """`runrl serve` + `runrl keys create`, and the SDK configured only through RUNRL_* variables."""
    import os
    import signal
    import time

    from tests.server.conftest import free_port

    data = tmp_path / "home"
    token = subprocess.run([sys.executable, "-m", "server.cli", "keys", "create", "--name", "cli", "--scopes",
                            "read,write", "--data-dir", str(data)], capture_output=True, text=True, cwd=REPO,
                           check=True).stdout.strip()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--data-dir",
                             str(data), "--slots", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        env = {"RUNRL_API_KEY": token, "RUNRL_BASE_URL": f"http://127.0.0.1:{port}/api/v1"}
        deadline = time.time() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.1)
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            sdk = runrl.RunRLClient()
            f = sdk.files.create_from_content(name="r", content="def reward_fn(c, **k):\n    return 1.0\n",
                                              file_type="reward_function")
            assert [x.id for x in sdk.files.list().items] == [f.id]
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        assert (data / "runrl.db").exists() and (data / "files" / f.id).exists()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
