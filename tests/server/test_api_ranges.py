"""Issue 13 finding 6: a self-hosted server accepts what the engine accepts (`completion_length: 16`, as
configs/quickstart.yaml uses), RunRL's hosted ranges are an operator setting (`hosted_ranges`,
`runrl serve --hosted-ranges`), and every 4xx `message` carries the first reason (`<summary>: <field>:
<reason>`), which is what the official SDK's exception shows. Real uvicorn servers on loopback (a thread, or
`runrl serve` as a subprocess for the flag); runs are not trained here (the worker is off or never reached)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace

import httpx
import pytest
import runrl
from runrl.exceptions import ValidationError as SdkValidationError

from server.cli import create_key
from tests.server.conftest import PROMPTS, REWARD, free_port


def upload(c: httpx.Client) -> tuple[str, str]:
    p = c.post("/files", files={"file": ("p.jsonl", PROMPTS.encode())}, data={"type": "prompt"}).json()["data"]
    r = c.post("/files", json={"type": "reward_function", "name": "r", "content": REWARD}).json()["data"]
    return p["id"], r["id"]


def body(p: str, r: str, **extra) -> dict:
    return {"model": "builtin:tiny", "type": "reward_function", "prompt_file_id": p, "reward_file_id": r, **extra}


def test_engine_ranges_by_default(make_live, settings):
    live = make_live(replace(settings, start_worker=False))
    with live.client(live.key()) as c:
        p, r = upload(c)
        made = c.post("/runs", json=body(p, r, completion_length=16, learning_rate=0.003, max_steps=60))
        assert made.status_code == 201, made.text
        assert made.json()["data"]["parameters"]["completion_length"] == 16
        assert live.app.state.services.store.run(made.json()["data"]["id"])["config"]["completion_length"] == 16
        # defaults in `parameters` are still RunRL's
        assert c.post("/runs", json=body(p, r)).json()["data"]["parameters"]["completion_length"] == 1024
        # the engine's own bounds: completion_length >= 1, epochs 1..100, learning_rate_multiplier 0.1..10
        for key, value in (("completion_length", 0), ("completion_length", 32769), ("epochs", 0),
                           ("learning_rate_multiplier", 0.05), ("completion_length", 16.5)):
            res = c.post("/runs", json=body(p, r, **{key: value}))
            assert res.status_code == 422 and set(res.json()["details"]) == {key}, res.text
            reason = res.json()["details"][key]
            assert res.json()["message"] == f"Validation failed: {key}: {reason}", res.json()
        assert "between 1 and 32768" in c.post("/runs", json=body(p, r, completion_length=0)).json()["message"]


def test_hosted_ranges_setting(make_live, settings):
    live = make_live(replace(settings, start_worker=False, hosted_ranges=True))
    with live.client(live.key()) as c:
        p, r = upload(c)
        res = c.post("/runs", json=body(p, r, completion_length=16))
        assert res.status_code == 422
        assert res.json()["message"] == "Validation failed: completion_length: must be a number between 128 and 8192"
        assert c.post("/runs", json=body(p, r, learning_rate_multiplier=0.05)).status_code == 422
        assert c.post("/runs", json=body(p, r, completion_length=128)).status_code == 201


def test_message_carries_first_reason(live):
    with live.client(live.key()) as c:
        res = c.post("/runs", json={}).json()  # four fields missing: the first named, the count of the others
        assert res["message"].startswith("Validation failed: model: is required")
        assert res["message"].endswith("(and 3 more in details)") and len(res["details"]) == 4
        res = c.post("/files", json={"type": "nope", "name": "x", "content": "y"}).json()
        assert res["message"] == f"Validation failed: type: {res['details']['type']}"
        res = c.get("/runs", params={"per_page": "x"}).json()
        assert res["message"] == "Invalid query parameter per_page: per_page: must be an integer"
        # a message that already says why is left alone
        res = c.post("/runs/999/cancel").json()
        assert res["error"] == "not_found" and "details" not in res


def test_sdk_exception_shows_the_reason(make_live, settings):
    live = make_live(replace(settings, start_worker=False))
    token = live.key()
    sdk = runrl.RunRLClient(api_key=token, base_url=live.url)
    with live.client(token) as c:
        p, r = upload(c)
    with pytest.raises(SdkValidationError) as err:
        sdk.runs.create(model="builtin:tiny", type="reward_function", prompt_file_id=p, reward_file_id=r,
                        completion_length=0)
    assert "completion_length" in str(err.value) and "between 1 and 32768" in str(err.value), str(err.value)
    assert err.value.payload["details"]["completion_length"]


def test_serve_flag_hosted_ranges(tmp_path):
    data, port = tmp_path / "data", free_port()
    token = create_key(name="t", scopes=["read", "write"], data_dir=data)
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--hosted-ranges", "--port",
                             str(port), "--data-dir", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/api/v1"
        deadline = time.time() + 30
        while True:
            try:
                httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
                time.sleep(0.2)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            p, r = upload(c)
            res = c.post("/runs", json=body(p, r, completion_length=16)).json()
        assert res["details"] == {"completion_length": "must be a number between 128 and 8192"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
