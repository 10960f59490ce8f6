"""Webhooks (issue 15): a real uvicorn server and a real receiver (http.server on loopback, allowed through
`allowed_destinations`). Signatures verify with the receiver's own HMAC, a 500 is retried, a hanging or refusing
receiver never delays runs or the API, deliveries are recorded and listed, other users' webhooks are invisible,
loopback is refused unless allowed (at registration and again at connect time), redirects are not followed, and
run/deployment events fire for the right objects. Runs use the stand-in train command (conftest), deployments a
stand-in model server that answers /health (the real DeploymentManager starts, watches and stops it)."""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import re
import shutil
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from server.settings import Settings
from server.store import Store
from server.webhooks import DROPPED, sign, signature_header
from tests.server.conftest import PROMPTS, REWARD, completed_run, free_port, wait_status

RUN_EVENTS = ["run.status_changed", "run.completed", "run.failed"]


class Receiver:
    """A webhook receiver on 127.0.0.1 whose behaviour is chosen by path."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.counts: collections.Counter = collections.Counter()
        self.release = threading.Event()
        self.hanging = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer.lock:
                    outer.counts[self.path] += 1
                    n = outer.counts[self.path]
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                           "at": time.time()})
                if self.path == "/hang":
                    with outer.lock:
                        outer.hanging += 1
                    outer.release.wait(60)
                    code = 200
                elif self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/redirect-target")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                else:
                    code = {"/fail-once": 500 if n == 1 else 200, "/always-500": 500}.get(self.path, 200)
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def got(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def hook_settings(settings: Settings) -> Settings:
    return replace(settings, allowed_destinations=("127.0.0.1",), webhook_backoff_s=0.05, webhook_timeout_s=5.0,
                   webhook_attempts=3)


def wait_for(check: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def upload(c: httpx.Client) -> tuple[str, str]:
    p = c.post("/files", files={"file": ("p.jsonl", PROMPTS.encode())}, data={"type": "prompt"}).json()["data"]
    r = c.post("/files", json={"type": "reward_function", "name": "r", "content": REWARD}).json()["data"]
    return p["id"], r["id"]


def start_run(c: httpx.Client, files: tuple[str, str], run_name: str = "sleep=0.2,code=0") -> int:
    r = c.post("/runs", json={"model": "builtin:tiny", "type": "reward_function", "prompt_file_id": files[0],
                              "reward_file_id": files[1], "completion_length": 128, "run_name": run_name})
    assert r.status_code == 201, r.text
    return r.json()["data"]["id"]


def register(c: httpx.Client, url: str, events: list[str], **extra: Any) -> dict[str, Any]:
    r = c.post("/webhooks", json={"url": url, "events": events, **extra})
    assert r.status_code == 201, r.text
    return r.json()["data"]


def deliveries(c: httpx.Client, hook_id: int, **params: Any) -> list[dict[str, Any]]:
    r = c.get(f"/webhooks/{hook_id}/deliveries", params={"per_page": 100, **params})
    assert r.status_code == 200, r.text
    return r.json()["data"]["items"]


README = Path(__file__).resolve().parents[2] / "README.md"
SNIPPET = re.compile(r"<!-- readme-snippet: webhook-verify[^>]*-->\n```python\n(.*?)```\n<!-- /readme-snippet -->", re.S)


def readme_verifier() -> Callable[[str, str, bytes], bool]:
    """The README's receiver code (no server helpers: it parses the header and recomputes the HMAC)."""
    namespace: dict[str, Any] = {}
    exec(SNIPPET.search(README.read_text(encoding="utf-8")).group(1), namespace)
    return namespace["verify_runrl_signature"]


def receiver_verifies(secret: str, request: dict[str, Any]) -> bool:
    return readme_verifier()(secret, request["headers"]["X-RunRL-Signature"], request["body"])


def test_signatures_verify_with_the_readme_receiver():
    """What the server signs, the README's receiver code (what a user deploys) accepts, and nothing else."""
    body, secret, t = b'{"event":"run.completed"}', "s" * 20, int(time.time())
    header = signature_header(secret, t, body)
    assert header == f"t={t},v1={sign(secret, t, body)}"
    assert sign(secret, t, body) == hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    verify = readme_verifier()
    assert verify(secret, header, body)
    assert not verify(secret, header, body + b" ")  # tampered body
    assert not verify("t" * 20, header, body)  # another secret
    assert not verify(secret, signature_header(secret, t - 301, body), body)  # too old
    assert not verify(secret, "", body) and not verify(secret, "t=x,v1=y", body)


def test_signed_deliveries_of_the_right_runs(make_live, hook_settings, receiver):
    live = make_live(hook_settings)
    with live.client(live.key("alice")) as c:
        created = register(c, receiver.url("/ok"), RUN_EVENTS)
        secret = created["secret"]
        assert secret.startswith("whsec_") and len(secret) > 40 and created["warning"]
        failed_only = register(c, receiver.url("/failed-only"), ["run.failed"], secret="my-own-secret-0123456789")
        # the secret is shown once: never on GET or in the list
        assert "secret" not in c.get(f"/webhooks/{created['id']}").json()["data"]
        listed = c.get("/webhooks").json()["data"]
        assert {w["id"] for w in listed["items"]} == {created["id"], failed_only["id"]}
        assert all("secret" not in w for w in listed["items"]) and listed["pagination"]["total"] == 2

        files = upload(c)
        good = start_run(c, files, "sleep=0.2,code=0")
        wait_status(c, good, {"COMPLETED"})
        bad = start_run(c, files, "sleep=0.2,code=1")
        wait_status(c, bad, {"FAILED"})
        # good: SETTING_UP, RUNNING, COMPLETED (+ run.completed); bad: the same with FAILED (+ run.failed)
        wait_for(lambda: len(receiver.got("/ok")) >= 8, what="8 deliveries to /ok")
        wait_for(lambda: receiver.got("/failed-only"), what="the run.failed delivery")
        time.sleep(0.3)  # nothing more arrives
        got = receiver.got("/ok")
        assert len(got) == 8
        payloads = []
        for request in got:
            assert receiver_verifies(secret, request), request["headers"]
            assert not receiver_verifies("another-secret-0123", request)
            payload = json.loads(request["body"])
            assert set(payload) == {"event", "created_at", "data"}
            assert request["headers"]["X-RunRL-Event"] == payload["event"]
            assert request["headers"]["Content-Type"] == "application/json"
            payloads.append(payload)
        by_event = collections.defaultdict(list)
        # deliveries run concurrently, so arrival order is not guaranteed: order by the event's created_at
        for payload in sorted(payloads, key=lambda p: p["created_at"]):
            by_event[payload["event"]].append(payload["data"])
        assert [d["id"] for d in by_event["run.completed"]] == [good]
        assert [d["id"] for d in by_event["run.failed"]] == [bad]
        changes = [(d["id"], d["status"]) for d in by_event["run.status_changed"]]
        assert changes == [(good, "SETTING_UP"), (good, "RUNNING"), (good, "COMPLETED"),
                           (bad, "SETTING_UP"), (bad, "RUNNING"), (bad, "FAILED")]
        # `data` is the Run object GET /runs/{id} returns (for a finished run: exactly)
        assert by_event["run.completed"][0] == c.get(f"/runs/{good}").json()["data"]
        assert by_event["run.failed"][0] == c.get(f"/runs/{bad}").json()["data"]
        assert "config" not in by_event["run.failed"][0] and "secrets" not in by_event["run.failed"][0]
        # one delivery id per (event, webhook)
        assert len({r["headers"]["X-RunRL-Delivery"] for r in got}) == 8
        only = receiver.got("/failed-only")
        assert len(only) == 1 and json.loads(only[0]["body"])["data"]["id"] == bad
        assert receiver_verifies("my-own-secret-0123456789", only[0])

        # deliveries are recorded and listed (newest first, paged)
        rows = deliveries(c, created["id"])
        assert len(rows) == 8 and all(r["success"] and r["status_code"] == 200 and r["attempt"] == 1
                                      and r["error"] is None and not r["retrying"] for r in rows)
        assert {r["delivery_id"] for r in rows} == {q["headers"]["X-RunRL-Delivery"] for q in got}
        assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
        assert all(r["duration_ms"] >= 0 and r["delivered_at"] for r in rows)
        page = c.get(f"/webhooks/{created['id']}/deliveries", params={"per_page": 3, "page": 2}).json()["data"]
        assert len(page["items"]) == 3 and page["pagination"] == {"current_page": 2, "per_page": 3, "total": 8,
                                                                  "last_page": 3}
        # delete: gone, with its deliveries
        assert c.delete(f"/webhooks/{created['id']}").json()["data"] == {"id": created["id"], "deleted": True}
        assert c.get(f"/webhooks/{created['id']}").status_code == 404
        assert c.get(f"/webhooks/{created['id']}/deliveries").status_code == 404
        assert live.app.state.services.store.scalar(
            "SELECT COUNT(*) FROM webhook_deliveries WHERE webhook_id = ?", (created["id"],)) == 0


def test_a_500_is_retried_and_a_dead_receiver_ends_failed(make_live, hook_settings, receiver):
    closed_port = free_port()  # nothing listens there: connection refused
    live = make_live(hook_settings)
    with live.client(live.key("alice")) as c:
        flaky = register(c, receiver.url("/fail-once"), ["run.completed"])
        broken = register(c, receiver.url("/always-500"), ["run.completed"])
        refused = register(c, f"http://127.0.0.1:{closed_port}/hook", ["run.completed"])
        run_id = start_run(c, upload(c))
        wait_status(c, run_id, {"COMPLETED"})

        rows = wait_for(lambda: len(r := deliveries(c, flaky["id"])) >= 2 and r, what="the retry")
        assert [(r["attempt"], r["status_code"], r["success"], r["retrying"]) for r in reversed(rows)] == [
            (1, 500, False, True), (2, 200, True, False)]
        assert rows[1]["error"] == "HTTP 500" and rows[0]["error"] is None
        assert rows[0]["delivery_id"] == rows[1]["delivery_id"]
        sent = receiver.got("/fail-once")
        assert len(sent) == 2 and sent[0]["headers"]["X-RunRL-Delivery"] == sent[1]["headers"]["X-RunRL-Delivery"]
        assert all(receiver_verifies(flaky["secret"], s) for s in sent)
        assert sent[1]["at"] - sent[0]["at"] >= hook_settings.webhook_backoff_s  # waited before retrying

        # bounded: 3 attempts (the setting), the last one stays recorded as failed
        for hook, code in ((broken, 500), (refused, None)):
            rows = wait_for(lambda: len(r := deliveries(c, hook["id"])) >= 3 and r, what="3 attempts")
            time.sleep(0.3)
            rows = deliveries(c, hook["id"])
            assert [(r["attempt"], r["status_code"], r["success"], r["retrying"]) for r in reversed(rows)] == [
                (1, code, False, True), (2, code, False, True), (3, code, False, False)]
            if code is None:
                assert all(r["error"].startswith("connection failed") for r in rows), rows
        assert len(receiver.got("/always-500")) == 3


def test_a_hanging_receiver_never_delays_runs_or_the_api(make_live, hook_settings, receiver):
    live = make_live(replace(hook_settings, webhook_timeout_s=30.0))
    with live.client(live.key("alice")) as c:
        hook = register(c, receiver.url("/hang"), RUN_EVENTS)
        files = upload(c)
        started = time.time()
        first = start_run(c, files)
        wait_for(lambda: receiver.hanging >= 1, what="the receiver to hang")
        wait_status(c, first, {"COMPLETED"}, timeout=20)
        second = start_run(c, files)  # the queue goes on
        wait_status(c, second, {"COMPLETED"}, timeout=20)
        took = time.time() - started
        assert not receiver.release.is_set() and receiver.hanging >= 1  # still hanging when both runs are done
        assert took < 20, took
        for path in ("/runs", f"/runs/{first}", "/webhooks", f"/webhooks/{hook['id']}/deliveries", "/health"):
            t0 = time.time()
            assert c.get(path).status_code == 200
            assert time.time() - t0 < 1.0, (path, time.time() - t0)
        assert deliveries(c, hook["id"]) == []  # nothing finished yet: every attempt is still in flight or queued
        receiver.release.set()
        # 2 runs x (SETTING_UP, RUNNING, COMPLETED + run.completed) = 8, all delivered once released
        rows = wait_for(lambda: len(r := deliveries(c, hook["id"])) >= 8 and r, what="8 deliveries")
        assert all(r["success"] for r in rows)


def test_shutdown_drops_pending_deliveries_and_records_them(make_live, hook_settings, receiver):
    live = make_live(replace(hook_settings, webhook_timeout_s=30.0))
    with live.client(live.key("alice")) as c:
        hook = register(c, receiver.url("/hang"), ["run.completed"])
        run_id = start_run(c, upload(c))
        wait_status(c, run_id, {"COMPLETED"})
        wait_for(lambda: receiver.hanging >= 1, what="the receiver to hang")
    t0 = time.time()
    live.stop()
    assert not live.thread.is_alive() and time.time() - t0 < 10  # a hanging receiver does not hold up shutdown
    store = Store(hook_settings.db_path)
    rows = store.all("SELECT * FROM webhook_deliveries WHERE webhook_id = ?", (hook["id"],))
    store.close()
    assert len(rows) == 1 and rows[0]["error"] == DROPPED and not rows[0]["success"], rows


def test_deleting_a_webhook_ends_its_pending_deliveries(make_live, hook_settings, receiver):
    live = make_live(replace(hook_settings, webhook_timeout_s=30.0))
    store = live.app.state.services.store
    with live.client(live.key("alice")) as c:
        hook = register(c, receiver.url("/hang"), ["run.status_changed"])
        run_id = start_run(c, upload(c))
        wait_status(c, run_id, {"COMPLETED"})
        wait_for(lambda: receiver.hanging >= 2, what="two attempts in flight")
        assert c.delete(f"/webhooks/{hook['id']}").status_code == 200
        receiver.release.set()
        time.sleep(0.5)  # the attempts in flight finish; nothing is recorded or retried for a deleted webhook
        assert store.scalar("SELECT COUNT(*) FROM webhook_deliveries WHERE webhook_id = ?", (hook["id"],)) == 0
        assert len(receiver.got("/hang")) == 2  # the third change (COMPLETED) was never sent


def test_a_broken_listener_never_breaks_the_queue(make_live, hook_settings, receiver):
    live = make_live(hook_settings)
    store = live.app.state.services.store

    def broken(kind: str, obj_id: int, status: str) -> None:
        raise RuntimeError("listener bug")

    store.listeners.insert(0, broken)  # before the dispatcher's
    with live.client(live.key("alice")) as c:
        register(c, receiver.url("/ok"), ["run.completed"])
        run_id = start_run(c, upload(c))
        assert wait_status(c, run_id, {"COMPLETED", "FAILED"})["status"] == "COMPLETED"
        wait_for(lambda: receiver.got("/ok"), what="the delivery after the broken listener")


def test_other_users_webhooks_are_invisible(make_live, hook_settings, receiver):
    live = make_live(hook_settings)
    alice, bob = live.client(live.key("alice")), live.client(live.key("bob", scopes="read,write,admin"))
    mine = register(alice, receiver.url("/alice"), ["run.completed"])
    theirs = register(bob, receiver.url("/bob"), ["run.completed"])
    for method, path in (("GET", f"/webhooks/{mine['id']}"), ("GET", f"/webhooks/{mine['id']}/deliveries"),
                         ("DELETE", f"/webhooks/{mine['id']}")):
        r = bob.request(method, path)
        assert r.status_code == 404 and r.json()["error"] == "not_found", (method, path, r.text)
    assert [w["id"] for w in bob.get("/webhooks").json()["data"]["items"]] == [theirs["id"]]
    assert [w["id"] for w in alice.get("/webhooks").json()["data"]["items"]] == [mine["id"]]
    assert alice.get(f"/webhooks/{mine['id']}").status_code == 200  # bob's DELETE changed nothing
    # alice's run is delivered to alice's webhook only
    run_id = start_run(alice, upload(alice))
    wait_status(alice, run_id, {"COMPLETED"})
    wait_for(lambda: receiver.got("/alice"), what="alice's delivery")
    time.sleep(0.3)
    assert receiver.got("/bob") == [] and deliveries(bob, theirs["id"]) == []
    alice.close()
    bob.close()


def test_registration_validates_url_events_secret_and_destination(live):
    with live.client(live.key("alice")) as c:
        for url in ("http://127.0.0.1:8765/hook", "http://localhost:8765/hook", "http://[::1]:8765/",
                    "http://169.254.169.254/latest", "http://10.1.2.3/hook"):
            r = c.post("/webhooks", json={"url": url, "events": ["run.completed"]})
            assert r.status_code == 422, (url, r.text)
            reason = r.json()["details"]["url"]
            assert "allowed_destinations" in reason and "allow_private_destinations" in reason, reason
            assert "url" in r.json()["message"]
        cases = [({"url": "ftp://example.com/x", "events": ["run.completed"]}, "url", "http(s) URL"),
                 ({"events": ["run.completed"]}, "url", "required"),
                 ({"url": "https://hooks.example/x", "events": ["run.started"]}, "events", "'run.started'"),
                 ({"url": "https://hooks.example/x", "events": []}, "events", "at least one"),
                 ({"url": "https://hooks.example/x", "events": "run.completed"}, "events", "list"),
                 ({"url": "https://hooks.example/x", "events": [3]}, "events", "unknown event 3"),
                 ({"url": "https://hooks.example/x", "events": ["run.failed"], "secret": "short"}, "secret", "16"),
                 ({"url": "https://hooks.example/x", "events": ["run.failed"], "secret": 5}, "secret", "string")]
        for body, key, words in cases:
            r = c.post("/webhooks", json=body)
            assert r.status_code == 422, (body, r.text)
            assert words in r.json()["details"][key], (body, r.json())
        # a name that does not resolve is accepted (the connect-time check is the one that matters)
        r = c.post("/webhooks", json={"url": "https://hooks.example/x", "events": ["run.failed", "run.failed"]})
        assert r.status_code == 201 and r.json()["data"]["events"] == ["run.failed"]
        # a read key lists but cannot create
        reader = live.client(live.key("alice", scopes="read"))
        assert reader.get("/webhooks").json()["data"]["pagination"]["total"] == 1
        assert reader.post("/webhooks", json={"url": "https://hooks.example/y", "events": ["run.failed"]}
                           ).status_code == 403
        reader.close()


def test_connect_time_policy_and_redirects(make_live, hook_settings, receiver):
    # registered while the operator allowed loopback; then the server restarts without that permission
    live = make_live(hook_settings)
    with live.client(key := live.key("alice")) as c:
        hook = register(c, receiver.url("/ok"), ["run.completed"])
    live.stop()
    strict = replace(hook_settings, allowed_destinations=())
    live = make_live(strict)
    with live.client(key) as c:
        run_id = start_run(c, upload(c))
        wait_status(c, run_id, {"COMPLETED"})
        rows = wait_for(lambda: deliveries(c, hook["id"]), what="the refused attempt")
        time.sleep(0.3)
        rows = deliveries(c, hook["id"])
        assert len(rows) == 1 and not rows[0]["success"] and not rows[0]["retrying"], rows  # not retried
        assert "loopback" in rows[0]["error"] and "allowed_destinations" in rows[0]["error"], rows[0]
        assert receiver.got("/ok") == []
    live.stop()
    # a redirecting receiver: the 302 is recorded, its target never requested
    live = make_live(hook_settings)
    with live.client(key) as c:
        redirecting = register(c, receiver.url("/redirect"), ["run.completed"])
        run_id = start_run(c, upload(c))
        wait_status(c, run_id, {"COMPLETED"})
        wait_for(lambda: deliveries(c, redirecting["id"]), what="the redirect attempt")
        time.sleep(0.3)
        rows = deliveries(c, redirecting["id"])
        assert [(r["attempt"], r["status_code"], r["success"], r["retrying"]) for r in rows] == [
            (1, 302, False, False)]
        assert "redirect" in rows[0]["error"] and "not followed" in rows[0]["error"]
        assert len(receiver.got("/redirect")) == 1 and receiver.got("/redirect-target") == []


# A stand-in model server for the DeploymentManager: answers /health (with the deployment's secret) until killed.
STAND_IN_DEPLOY = r"""
import os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
token = os.environ.pop('RUNRL_DEPLOY_TOKEN'); port = int(sys.argv[sys.argv.index('--port') + 1])
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200 if self.headers.get('Authorization') == 'Bearer ' + token else 401)
        self.send_header('Content-Length', '0'); self.end_headers()
HTTPServer(('127.0.0.1', port), H).serve_forever()
"""


def test_deployment_status_changed(make_live, hook_settings, receiver):
    live = make_live(replace(hook_settings, deploy_command=(sys.executable, "-c", STAND_IN_DEPLOY)))
    store = live.app.state.services.store
    with live.client(live.key("alice")) as c:
        hook = register(c, receiver.url("/deploy"), ["deployment.status_changed"])
        run_id = completed_run(store)
        final = Path(live.settings.runs_dir) / str(run_id) / "final"
        final.mkdir(parents=True)
        (final / "config.json").write_text("{}")
        r = c.post("/deployments", json={"run_id": run_id})
        assert r.status_code == 201, r.text
        dep_id = r.json()["data"]["id"]
        wait_for(lambda: c.get(f"/deployments/{dep_id}").json()["data"]["status"] == "active", what="active")
        assert c.delete(f"/deployments/{dep_id}").status_code == 200
        wait_for(lambda: len(receiver.got("/deploy")) >= 3, what="3 deployment events")
        time.sleep(0.3)
        got = receiver.got("/deploy")
        payloads = [json.loads(q["body"]) for q in got]
        assert [p["data"]["status"] for p in payloads] == ["pending", "active", "deleted"]
        assert all(p["event"] == "deployment.status_changed" and p["data"]["id"] == dep_id
                   and p["data"]["run_id"] == run_id for p in payloads)
        assert all(receiver_verifies(hook["secret"], q) for q in got)
        expected = c.get(f"/deployments/{dep_id}").json()["data"]
        assert payloads[-1]["data"] == expected  # the deployment object the API returns (api_url "" when deleted)
        assert len(deliveries(c, hook["id"])) == 3
    shutil.rmtree(final)
