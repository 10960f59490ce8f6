"""API fidelity (issue 14 item 4) against a real uvicorn server on loopback: SSE keepalives on both log-stream
paths and on a deployment's streamed chat (the official SDK's `runs.stream_logs` outlasting its read timeout on
a queued and on a silent run), `GET /runs` sort/direction and date filters compared as instants, `hf_name`
validated at create, a failed Hub push (a real push attempt to a closed port on loopback) visible on the run,
and reward validation without sample rows. Browse over public and unlisted configurations is in
test_shared_search.py."""

from __future__ import annotations

import re
import shutil
import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import runrl

from server.client import _sse_events
from server.settings import Settings
from server.store import Store
from tests.server.conftest import completed_run, wait_status
from tests.server.test_runs_queue import body, upload

KEEPALIVE = ""  # an empty line (server/sse.py)




def key_requests(c: httpx.Client, name: str) -> int:
    return next(k["total_requests"] for k in c.get("/keys").json()["data"] if k["name"] == name)


# ---- SSE keepalives -----------------------------------------------------------------------------------------

def test_both_log_stream_paths_send_keepalives_while_a_run_is_queued(make_live, settings):
    live = make_live(replace(settings, start_worker=False, sse_keepalive_s=0.2))
    with live.client(live.key()) as c:
        run_id = c.post("/runs", json=body(*upload(c))).json()["data"]["id"]
        for path in (f"/runs/{run_id}/stream-logs", f"/runs/{run_id}/logs/stream"):
            lines, t0 = [], time.monotonic()
            # a read timeout of 1 s: without keepalives a queued run's stream sends nothing and this raises
            with c.stream("GET", path, timeout=httpx.Timeout(5, read=1.0)) as s:
                assert s.headers["content-type"].startswith("text/event-stream")
                for line in s.iter_lines():
                    lines.append(line)
                    if lines.count(KEEPALIVE) == 3:
                        break
            assert 0.5 < time.monotonic() - t0 < 3, path  # about one every 0.2 s, not all at once
            assert set(lines) == {KEEPALIVE}, lines  # empty lines only: no event, no comment
        c.post(f"/runs/{run_id}/cancel")
        with c.stream("GET", f"/runs/{run_id}/stream-logs", timeout=httpx.Timeout(5, read=1.0)) as s:
            assert [line for line in s.iter_lines() if line] == ["event: end", 'data: {"status": "CANCELLED"}']
    # `runrl runs logs --follow` parses the stream into events: a keepalive is none
    assert list(_sse_events([KEEPALIVE, KEEPALIVE, "data: step 1", "", KEEPALIVE])) == [(None, "step 1")]


def test_sdk_stream_logs_outlasts_its_read_timeout_on_a_silent_and_a_queued_run(make_live, settings):
    """One slot: run A trains silently for 2 s at a time (the stand-in trainer), run B waits behind it for ~4 s.
    The SDK, with a 1 s timeout, reads each stream in one request (its key's request count is 1: it never timed
    out and retried) and yields the events' lines only: an empty-line keepalive is no line to it."""
    live = make_live(replace(settings, slots=1, sse_keepalive_s=0.2))
    with live.client(live.key(name="owner")) as c:
        p, r = upload(c)
        a = c.post("/runs", json=body(p, r, run_name="sleep=4,code=0")).json()["data"]["id"]
        b = c.post("/runs", json=body(p, r, run_name="sleep=0.2,code=0")).json()["data"]["id"]
        streamed: dict[int, list[str]] = {}
        errors: list[BaseException] = []

        def stream(run_id: int, key_name: str) -> None:
            sdk = runrl.RunRLClient(api_key=live.key(name=key_name), base_url=live.url, timeout=1.0)
            try:
                streamed[run_id] = list(sdk.runs.stream_logs(run_id))
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)
            finally:
                sdk.close()

        threads = [threading.Thread(target=stream, args=(a, "sdk-a")), threading.Thread(target=stream, args=(b, "sdk-b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        for run_id, key_name in ((a, "sdk-a"), (b, "sdk-b")):
            assert key_requests(c, key_name) == 1, key_name  # one request: no read timeout, no retry from the start
            lines = streamed[run_id]
            events = lines
            assert KEEPALIVE not in events and not any(line.startswith(":") for line in events), run_id
            assert events[-2:] == ["event: end", 'data: {"status": "COMPLETED"}']
            assert "data: step 1" in events and "data: step 2" in events
            logged = c.get(f"/runs/{run_id}/logs", params={"limit": 100}).json()["data"]["lines"]
            assert events[:-2] == [f"data: {line}" for line in logged]


STREAMING_MODEL_SERVER = r"""
import os, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
token = os.environ.pop('RUNRL_DEPLOY_TOKEN'); port = int(sys.argv[sys.argv.index('--port') + 1])
PIECES = [('data: {"n": 1}\n\n', 0.7), ('data: {"n": 2, ', 0.7), ('"split": true}\n\n', 0.7), ('data: [DONE]\n\n', 0)]
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def authorized(self):
        if self.headers.get('Authorization') == 'Bearer ' + token:
            return True
        self.send_response(401); self.send_header('Content-Length', '0'); self.end_headers()
    def do_GET(self):
        if self.authorized():
            self.send_response(200); self.send_header('Content-Length', '0'); self.end_headers()
    def do_POST(self):
        self.rfile.read(int(self.headers.get('Content-Length', 0)))
        if self.authorized():
            self.send_response(200); self.send_header('Content-Type', 'text/event-stream'); self.end_headers()
            for piece, pause in PIECES:  # an event split across a pause, as a model server may send it
                self.wfile.write(piece.encode()); self.wfile.flush(); time.sleep(pause)
HTTPServer(('127.0.0.1', port), H).serve_forever()
"""


def test_deployment_chat_stream_gets_keepalives_between_events_only(make_live, settings):
    """The proxy passes a slow model server's stream through unchanged, adding keepalives only where an
    event has ended: none inside the event that arrived in two parts."""
    live = make_live(replace(settings, sse_keepalive_s=0.2,
                             deploy_command=(sys.executable, "-c", STREAMING_MODEL_SERVER)))
    store = live.app.state.services.store
    run_id = completed_run(store)
    final = Path(live.settings.runs_dir) / str(run_id) / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    with live.client(live.key("alice")) as c:
        dep = c.post("/deployments", json={"run_id": run_id}).json()["data"]
        deadline = time.time() + 30
        while c.get(f"/deployments/{dep['id']}").json()["data"]["status"] != "active":
            assert time.time() < deadline, "deployment never became active"
            time.sleep(0.1)
        with c.stream("POST", f"/deployments/{dep['id']}/v1/chat/completions", timeout=httpx.Timeout(5, read=1.0),
                      json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            text = s.read().decode()
        c.delete(f"/deployments/{dep['id']}")
    ka = re.escape("\n")
    assert re.fullmatch(rf'data: {{"n": 1}}\n\n({ka})+data: {{"n": 2, "split": true}}\n\n({ka})+data: \[DONE\]\n\n',
                        text), text
    shutil.rmtree(final)


# ---- GET /runs: sort, direction, dates ------------------------------------------------------------------------

def test_runs_list_sorts_and_compares_dates_as_instants(make_live, settings):
    live = make_live(replace(settings, start_worker=False))
    with live.client(live.key()) as c:
        p, r = upload(c)
        ids = [c.post("/runs", json=body(p, r, model=m)).json()["data"]["id"] for m in ("org/b", "org/a",
                                                                                  "org/c")]
        other = Store(live.settings.db_path)  # creation times out of id order
        for run_id, stamp in zip(ids, ("2026-12-01T10:00:00.000000Z", "2026-11-30T23:30:00.000000Z",
                                       "2026-12-02T00:00:00.000000Z")):
            other.execute("UPDATE runs SET created_at = ? WHERE id = ?", (stamp, run_id))
        other.close()
        one, two, three = ids

        def listed(**q) -> list[int]:
            response = c.get("/runs", params=q)
            assert response.status_code == 200, response.text
            return [x["id"] for x in response.json()["data"]["items"]]

        assert listed() == [three, one, two]  # default: created_at, newest first
        assert listed(sort="created_at", direction="asc") == [two, one, three]
        assert listed(sort="id") == [three, two, one]
        assert listed(sort="id", direction="asc") == [one, two, three]
        assert listed(sort="model", direction="asc") == [two, one, three]
        assert listed(created_after="2026-12-01") == [three, one]  # a date: its midnight (UTC)
        assert listed(created_before="2026-12-01") == [two]
        assert listed(created_after="2026-12-01T10:00:00Z") == [three, one]  # the same instant, other spelling
        assert listed(created_after="2026-12-01T12:00:00+02:00") == [three, one]  # an offset: 10:00 UTC
        assert listed(created_after="2026-12-01T12:00:01+02:00") == [three]
        assert listed(created_before="2026-12-01T01:00:00+01:00") == [two]  # midnight UTC
        assert listed(created_after="2026-12-01T10:00:00", created_before="2026-12-02") == [one]  # no offset: UTC
        for q, name in (({"created_after": "notadate"}, "created_after"), ({"created_before": "2026-13-01"},
                                                                           "created_before"),
                        ({"sort": "name"}, "sort"), ({"direction": "sideways"}, "direction")):
            response = c.get("/runs", params=q)
            assert response.status_code == 422 and name in response.json()["details"], (q, response.text)
            assert name in response.json()["message"]


# ---- hf_name and the Hub push -----------------------------------------------------------------------------------

def test_hf_name_is_validated_at_create(make_live, settings):
    live = make_live(replace(settings, start_worker=False))
    with live.client(live.key()) as c:
        p, r = upload(c)
        for bad in ("not a repo!!", "a/b/c", "alice/x..y", "alice/model.git", "-alice/model"):
            response = c.post("/runs", json=body(p, r, hf_name=bad))
            assert response.status_code == 422, (bad, response.text)
            assert list(response.json()["details"]) == ["hf_name"] and "hf_name" in response.json()["message"]
        run = c.post("/runs", json=body(p, r, hf_name="alice/tiny-rl")).json()["data"]
        assert run["hf_name"] == "alice/tiny-rl"  # the requested repo while the run is active
        assert run["hf_push"] == {"repo_id": "alice/tiny-rl", "status": "pending", "url": None, "endpoint": None,
                                  "error": None, "at": None}
        assert c.post("/runs", json=body(p, r)).json()["data"]["hf_push"] is None
        assert c.post(f"/runs/{run['id']}/cancel").json()["data"]["hf_name"] is None  # ended: never pushed


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.slow
def test_a_failed_hub_push_is_visible_on_the_run(tmp_path):
    """A real `runrl train` on builtin:tiny whose push goes to HF_ENDPOINT = a closed port on loopback: the run
    completes (its model is local and downloadable) but is not shown as pushed: `hf_name` null, `hf_push` failed
    with the error and the configured endpoint, `error_message` and a history entry saying so."""
    from tests.server.conftest import start_server

    endpoint = f"http://127.0.0.1:{closed_port()}"
    secret = "hf_pushSECRETtoken0123456789abcdefXYZ"
    live = start_server(Settings(data_dir=tmp_path / "data", poll_interval_s=0.2, extra_env={"HF_ENDPOINT": endpoint}))
    try:
        with live.client(live.key()) as c:
            p, r = upload(c)
            run = c.post("/runs", json=body(p, r, completion_length=16, max_steps=1, num_generations=2,
                                            prompts_per_step=2, hf_name="alice/tiny-rl", hf_token=secret)).json()
            run = wait_status(c, run["data"]["id"], {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300)
            assert run["status"] == "COMPLETED", run["error_message"]
            assert run["hf_name"] is None
            push = run["hf_push"]
            assert push["status"] == "failed" and push["repo_id"] == "alice/tiny-rl" and push["url"] is None
            assert push["endpoint"] == endpoint and "ConnectError" in push["error"] and push["at"]
            assert "not pushed to the Hugging Face Hub" in run["error_message"] and endpoint in run["error_message"]
            history = c.get(f"/runs/{run['id']}/history").json()["data"]["history"]
            assert [h["status"] for h in history][-2:] == ["RUNNING", "COMPLETED"]
            assert history[-2]["message"] == run["error_message"]
            logs = "\n".join(c.get(f"/runs/{run['id']}/logs", params={"limit": 1000}).json()["data"]["lines"])
            assert f"could not push to the Hugging Face Hub at {endpoint}" in logs
            model = c.get(f"/runs/{run['id']}/model")
            assert model.status_code == 200 and model.content[:2] == b"\x1f\x8b"  # the local model, a .tar.gz
            assert [x["hf_push"]["status"] for x in c.get("/runs").json()["data"]["items"]] == ["failed"]
            record = (live.settings.runs_dir / str(run["id"]) / "hf_push.json").read_text()
            assert secret not in record and secret not in str(run)
    finally:
        live.stop()


# ---- reward validation without sample rows ------------------------------------------------------------------------

def test_reward_validation_without_rows_reports_static_checks_not_a_missing_field(live):
    code = "def reward_fn(completion, **kwargs):\n    return float(kwargs['expected'] in completion)\n"
    sdk = runrl.RunRLClient(api_key=live.key(), base_url=live.url)
    report = sdk.validation.reward_function(code=code)
    assert report.valid is True and report.error is None
    assert report.details["exercised_on_rows"] is False and "not exercised on your rows" in report.details["note"]
    assert any("KeyError: 'expected'" in w for w in report.details["warnings"])
    with live.client(live.key()) as c:
        raw = c.post("/validation/reward-function", json={"functionCode": code}).json()
        assert "not run on your rows" in raw["message"] and raw["data"]["valid"] is True
        p, _ = upload(c)  # rows with `expected`: the call is exercised, and passes
        lacking = c.post("/files", files={"file": ("q.jsonl", b'{"prompt": [{"role": "user", "content": "x"}]}\n')},
                         data={"type": "prompt"}).json()["data"]["id"]
    on_rows = sdk.validation.reward_function(code=code, prompt_file_id=p)
    assert on_rows.valid and on_rows.details["exercised_on_rows"] is True and on_rows.details["samples_tested"] == 3
    missing = sdk.validation.reward_function(code=code, prompt_file_id=lacking)  # rows without it: a real defect
    assert missing.valid is False and "KeyError: 'expected'" in missing.error
    static = sdk.validation.reward_function(code="def reward_fn(completion, **kwargs)\n    return 1\n")
    assert static.valid is False and static.details["stage"] == "static"  # static checks still decide alone
    sdk.close()
