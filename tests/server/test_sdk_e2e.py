"""End to end with the real `runrl train` on `builtin:tiny`, driven by the official SDK (`runrl==0.2.2`)
against a real uvicorn server on loopback: upload, validate, run to COMPLETED through the SDK future,
history/logs/metrics/completions/SSE, and a second run cancelled while it trains."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import runrl
from runrl.exceptions import RunFailedError
from runrl.exceptions import TimeoutError as SdkTimeout

from server.settings import Settings
from tests.server.conftest import PROMPTS, REWARD, start_server

pytestmark = pytest.mark.slow
SECRET = "hf_e2eSECRETvalue123"
TRAIN = {"model": "builtin:tiny", "type": "reward_function", "completion_length": 128, "max_steps": 2,
         "num_generations": 2, "prompts_per_step": 2, "epochs": 1, "learning_rate_multiplier": 1.0}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> Iterator[dict[str, Any]]:
    data = tmp_path_factory.mktemp("e2e") / "data"
    live = start_server(Settings(data_dir=data, poll_interval_s=0.2, cancel_grace_s=3.0))
    sdk = runrl.RunRLClient(api_key=live.key(), base_url=live.url, poll_interval=0.5)
    path = data.parent / "prompts.jsonl"
    path.write_text(PROMPTS)
    prompt = sdk.files.upload_path(str(path), file_type="prompt", name="Say words")
    reward = sdk.files.create_from_content(name="contains", content=REWARD, file_type="reward_function",
                                           original_filename="reward.py")
    future = sdk.runs.create(prompt_file_id=prompt.id, reward_file_id=reward.id, hf_token=SECRET, **TRAIN)
    try:
        run = future.result(timeout=300)
    except RunFailedError as exc:
        pytest.fail(f"run failed: {exc.run.error_message}")
    state = {"live": live, "sdk": sdk, "run": run, "prompt": prompt, "reward": reward, "future": future}
    yield state
    state["live"].stop()


def test_run_completes_through_the_sdk(e2e):
    sdk, run = e2e["sdk"], e2e["run"]
    assert run.status == "COMPLETED" and run.progress == 1.0 and run.error_message is None
    assert run.parameters["hf_token"] == "***" and run.parameters["max_steps"] == 2
    assert run.prompt_file["id"] == e2e["prompt"].id and run.reward_file["name"] == "contains"
    assert [r.id for r in sdk.runs.list(status="COMPLETED").items] == [run.id]
    history = sdk.runs.history(run.id)
    assert [h["status"] for h in history] == ["PENDING", "SETTING_UP", "RUNNING", "COMPLETED"]
    final = e2e["live"].settings.runs_dir / str(run.id) / "final"
    assert (final / "config.json").exists()


def test_outputs_through_the_sdk(e2e):
    sdk, run = e2e["sdk"], e2e["run"]
    logs = sdk.runs.logs(run.id, last_line=0, limit=1000)
    text = "\n".join(logs["lines"])
    assert "step 2" in text and SECRET not in text and logs["total_lines"] == len(logs["lines"])
    metrics = sdk.runs.metrics(run.id)
    assert [h["step"] for h in metrics["history"]] == [1, 2]
    for key in ("reward_mean", "reward_std", "loss", "kl", "completion_length_mean", "tokens_per_s"):
        assert all(isinstance(h[key], (int, float)) for h in metrics["history"]), key
    completions = sdk.runs.completions(run.id)
    assert [s["step"] for s in completions["steps"]] == [1, 2]
    sample = completions["steps"][0]["samples"][0]
    assert isinstance(sample["completion"], str) and isinstance(sample["reward"], (int, float))
    streamed = list(sdk.runs.stream_logs(run.id))
    assert streamed[-2:] == ["event: end", 'data: {"status": "COMPLETED"}']
    assert any("step 1" in line for line in streamed)
    for f in Path(e2e["live"].settings.runs_dir / str(run.id)).rglob("*"):
        if f.is_file() and f.suffix in (".txt", ".log", ".jsonl", ".yaml"):
            assert SECRET not in f.read_text(errors="replace"), f


def test_second_run_cancelled_while_training(e2e):
    sdk = e2e["sdk"]
    future = sdk.runs.create(prompt_file_id=e2e["prompt"].id, reward_file_id=e2e["reward"].id,
                             **{**TRAIN, "max_steps": 50})
    deadline = time.time() + 60
    while future.status().status != "RUNNING":
        assert time.time() < deadline
        time.sleep(0.2)
    with pytest.raises(SdkTimeout):
        future.cancel()  # the SDK calls POST /runs/{id}/cancel, then ends its future
        future.result()
    deadline = time.time() + 30
    while (run := sdk.runs.get(future.initial.id)).status not in ("CANCELLED", "FAILED", "COMPLETED"):
        assert time.time() < deadline
        time.sleep(0.2)
    assert run.status == "CANCELLED" and run.completed_at
    assert sdk.runs.history(run.id)[-1]["message"].startswith("Cancelled by user")


def test_deployment_serves_chat_completions(e2e):
    import httpx

    sdk, run, live = e2e["sdk"], e2e["run"], e2e["live"]
    check = sdk.deployments.check(run.id)
    assert check["deployable"] is True and check["reasons"] == []
    future = sdk.deployments.create(run.id, poll_interval=0.5)
    assert future.initial.status == "pending" and future.initial.api_url == ""
    dep = future.result(timeout=180)
    assert dep.status == "active" and dep.api_url.endswith(f"/api/v1/deployments/{dep.id}")
    assert dep.base_model == "builtin:tiny" and dep.run["id"] == run.id
    assert sdk.deployments.check(run.id)["deployable"] is False  # already deployed
    assert [d.id for d in sdk.deployments.list().items] == [dep.id]
    token = sdk._session._client.headers["Authorization"]
    messages = [{"role": "user", "content": "Say hi"}]
    with httpx.Client(headers={"Authorization": token}, timeout=120) as c:
        r = c.post(f"{dep.api_url}/v1/chat/completions", json={"messages": messages, "max_tokens": 8})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(body["choices"][0]["message"]["content"], str)
        assert 1 <= body["usage"]["completion_tokens"] <= 8
        with c.stream("POST", f"{dep.api_url}/v1/chat/completions",
                      json={"messages": messages, "max_tokens": 8, "stream": True}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [__import__("json").loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        # sampled: the end of turn (stop) or the 8th token (length), said on the last chunk only
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        assert c.post(f"{dep.api_url}/v1/chat/completions", json={"messages": "hi"}).status_code == 400
        assert c.get(f"{dep.api_url}/v1/models").json()["data"][0]["id"] == f"run-{run.id}"
        other = live.key("stranger")
        r = c.post(f"{dep.api_url}/v1/chat/completions", json={"messages": messages},
                   headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 404
    # a restarted server starts its live deployments again
    live.stop()
    live = e2e["live"] = start_server(live.settings)
    sdk = e2e["sdk"] = runrl.RunRLClient(api_key=token[7:], base_url=live.url, poll_interval=0.5)
    deadline = time.time() + 120
    while (again := sdk.deployments.get(dep.id)).status != "active":
        assert again.status == "pending" and time.time() < deadline, again
        time.sleep(0.5)
    with httpx.Client(headers={"Authorization": token}, timeout=120) as c:
        r = c.post(f"{again.api_url}/v1/chat/completions", json={"messages": messages, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    assert sdk.runs.get(run.id).status == "COMPLETED"
    pid = live.app.state.services.store.one("SELECT pid FROM deployments WHERE id = ?", (dep.id,))["pid"]
    sdk.deployments.delete(dep.id)
    assert sdk.deployments.get(dep.id).status == "deleted"
    deadline = time.time() + 10
    while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]:
        assert time.time() < deadline, "model server still running"
        time.sleep(0.1)
    # a model that cannot load ends `failed` with the reason
    (live.settings.runs_dir / str(run.id) / "final" / "model.safetensors").write_bytes(b"not a model")
    failing = sdk.deployments.create(run.id, poll_interval=0.5)
    with pytest.raises(RunFailedError):
        failing.result(timeout=120)
    with httpx.Client(headers={"Authorization": token}) as c:
        data = c.get(f"{live.url}/deployments/{failing.initial.id}").json()["data"]
    assert data["status"] == "failed" and "model server stopped" in data["error_message"]
