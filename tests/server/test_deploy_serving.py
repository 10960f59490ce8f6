"""Deployments that serve (issue 14 item 3), through the real API and a real model server on loopback: a run whose
`final/` is only a LoRA adapter (saved by the engine's `export_final` with `merge_lora=False`, on `builtin:tiny`)
deploys and answers the official `openai` client with what base + adapter compute; concurrent requests are decoded
in one batch (the model server's own counters, not wall-clock); `max_tokens`, `stop`, `temperature`, `top_p`, `n`
and `seed` are honoured; bad values are 400s naming the field. The slow test trains the adapter with `runrl train`
through the SDK (`use_lora: true`, `merge_lora: false`) and deploys that."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import torch

from runrl_engine.checkpoint import export_final
from runrl_engine.rollout.hf import generate
from runrl_engine.rollout.types import SamplingParams
from runrl_engine.serving import load_for_serving
from server.settings import Settings
from tests.server.conftest import PROMPTS, REWARD, completed_run, start_server
from tests.server.test_deploy_auth import _deploy

ASK = [{"role": "user", "content": "Say hi"}]


def _adapter_run(store: Any, runs_dir: Path, tiny_model_dir: Path, user: str = "alice") -> int:
    """A COMPLETED run whose final/ is a LoRA adapter on builtin:tiny (random A and B, so it changes the answers)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_id = completed_run(store, user)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    export_final(lora, AutoTokenizer.from_pretrained(tiny_model_dir), runs_dir / str(run_id), merge_lora=False)
    return run_id


def _greedy(final: Path, messages: list[dict[str, str]], max_tokens: int) -> str:
    """base + adapter computed here, with the rollout loop alone (the reference the deployment must equal)."""
    loaded = load_for_serving(final)
    tok = loaded.tokenizer
    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    out = generate(loaded.model, [prompt], num_samples=1, seeds=[0], stop_ids=loaded.stop_ids,
                   params=SamplingParams(max_new_tokens=max_tokens, temperature=0), pad_id=tok.pad_token_id)
    return tok.decode([t for t in out[0].tokens if t not in loaded.stop_ids], skip_special_tokens=True)


@pytest.fixture(scope="module")
def dep(tmp_path_factory, tiny_model_dir) -> Iterator[dict[str, Any]]:
    data = tmp_path_factory.mktemp("serving") / "data"
    live = start_server(Settings(data_dir=data, poll_interval_s=0.2, start_worker=False))
    try:
        key = live.key("alice")
        store = live.app.state.services.store
        run_id = _adapter_run(store, live.settings.runs_dir, tiny_model_dir)
        with live.client(key) as c:
            check = c.post("/deployments/check", json={"run_id": run_id}).json()["data"]
            assert check["deployable"] and check["model_path_exists"], check
            deployment = _deploy(c, run_id)
        row = store.one("SELECT port FROM deployments WHERE id = ?", (deployment["id"],))
        token = live.app.state.services.deployments.token(deployment["id"])
        yield {"live": live, "key": key, "dep": deployment, "run_id": run_id,
               "final": live.settings.runs_dir / str(run_id) / "final",
               "url": f"{live.url}/deployments/{deployment['id']}",
               "health": lambda: httpx.get(f"http://127.0.0.1:{row['port']}/health", timeout=30,
                                           headers={"Authorization": f"Bearer {token}"}).json()}
    finally:
        live.stop()


def _openai(dep: dict[str, Any]) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{dep['url']}/v1", api_key=dep["key"], timeout=120, max_retries=0)


def _chat(dep: dict[str, Any], **body: Any) -> httpx.Response:
    return httpx.post(f"{dep['url']}/v1/chat/completions", json={"messages": ASK, **body}, timeout=120,
                      headers={"Authorization": f"Bearer {dep['key']}"})


def _stream(dep: dict[str, Any], **body: Any) -> list[Any]:
    with httpx.stream("POST", f"{dep['url']}/v1/chat/completions", json={"messages": ASK, "stream": True, **body},
                      headers={"Authorization": f"Bearer {dep['key']}"}, timeout=120) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_an_adapter_only_run_deploys_and_answers_the_openai_client(dep):
    final = dep["final"]
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").exists()
    reply = _openai(dep).chat.completions.create(model=f"run-{dep['run_id']}", messages=ASK, temperature=0,
                                                 max_tokens=12)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == _greedy(final, ASK, 12)
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 12
    health = dep["health"]()
    assert health["adapter_base_model"] and Path(health["adapter_base_model"]).is_dir()  # builtin:tiny's directory
    assert health["device"] == "cpu" and health["dtype"] == "float32"


def test_concurrent_requests_are_decoded_in_one_batch(dep):
    before = dep["health"]()["batching"]
    start, replies, errors = threading.Barrier(4), [None] * 4, []

    def ask(k: int) -> None:
        try:
            start.wait(timeout=30)
            replies[k] = _openai(dep).chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"Request {k}"}], temperature=0, max_tokens=256)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert all(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 256 for r in replies)
    after = dep["health"]()["batching"]
    assert after["requests"] - before["requests"] == 4 and after["peak_batch_size"] == 4
    # most of the 4 x 256 tokens were decoded with all four requests in the batch, not one request at a time
    assert after["batch_steps"].get("4", 0) - before["batch_steps"].get("4", 0) >= 128, after
    assert after["steps"] - before["steps"] < 2 * 256


def test_max_tokens_stop_temperature_top_p_n_and_seed_are_honoured(dep):
    def text(r: httpx.Response) -> str:
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    greedy = _chat(dep, temperature=0, max_tokens=24)
    assert text(greedy) == text(_chat(dep, temperature=0, max_tokens=24))  # greedy twice: the same
    short = _chat(dep, temperature=0, max_tokens=3).json()
    assert short["usage"]["completion_tokens"] == 3 and short["choices"][0]["finish_reason"] == "length"
    full = text(greedy)
    stop = full[6:9]
    cut = _chat(dep, temperature=0, max_tokens=24, stop=[stop, "not in it"]).json()
    assert cut["choices"][0]["message"]["content"] == full[:full.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop" and cut["usage"]["completion_tokens"] < 24
    # streamed: the same text in pieces, no piece past the cut, then finish_reason stop and [DONE]
    chunks = _stream(dep, temperature=0, max_tokens=24, stop=stop, stream_options={"include_usage": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == full[:full.find(stop)]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == cut["usage"]["completion_tokens"]
    # sampling: a seed repeats; n choices draw from consecutive seeds; top_p 0 is greedy at any temperature
    five = _chat(dep, temperature=1.0, seed=5, max_tokens=24)
    seeded = text(five)
    assert seeded == text(_chat(dep, temperature=1.0, seed=5, max_tokens=24)) != full
    two = _chat(dep, temperature=1.0, seed=5, max_tokens=24, n=2).json()
    six = _chat(dep, temperature=1.0, seed=6, max_tokens=24)
    assert [c["index"] for c in two["choices"]] == [0, 1] and two["choices"][0]["message"]["content"] == seeded
    assert two["choices"][1]["message"]["content"] == text(six)
    assert two["usage"]["completion_tokens"] == (five.json()["usage"]["completion_tokens"]
                                                 + six.json()["usage"]["completion_tokens"])
    assert text(_chat(dep, temperature=1.5, top_p=0, max_tokens=24)) == full


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "8"}, "max_tokens"), ({"max_tokens": 10**6}, "max_tokens"),
    ({"max_completion_tokens": 2.5}, "max_completion_tokens"), ({"temperature": 2.5}, "temperature"),
    ({"temperature": True}, "temperature"), ({"top_p": -0.1}, "top_p"), ({"stop": ""}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": 3}, "stop"), ({"n": 0}, "n"), ({"n": 99}, "n"),
    ({"seed": "x"}, "seed"), ({"stream": "yes"}, "stream"), ({"stream_options": {"include_usage": True}},
                                                             "stream_options"),
    ({"logprobs": True}, "logprobs"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"top_k": 5}, "top_k"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
])
def test_bad_values_are_400s_naming_the_field(dep, body, param):
    r = _chat(dep, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]


def test_a_client_that_goes_away_stops_its_generation(dep):
    before = dep["health"]()["batching"]
    body = {"messages": [{"role": "user", "content": "Request 0"}], "max_tokens": 1500, "temperature": 0.0}
    headers = {"Authorization": f"Bearer {dep['key']}"}  # greedy "Request 0" has no end of turn (see above)
    with pytest.raises(httpx.ReadTimeout):  # plain: the client gives up after 1 s of a 1500-token answer
        httpx.post(f"{dep['url']}/v1/chat/completions", json=body, headers=headers,
                   timeout=httpx.Timeout(1.0, connect=10))
    with httpx.stream("POST", f"{dep['url']}/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                      timeout=30) as s:  # streamed: the client hangs up after 3 chunks
        for k, _ in enumerate(s.iter_lines()):
            if k == 6:
                break
    deadline = time.time() + 30
    while (now := dep["health"]()["batching"])["running"]:
        assert time.time() < deadline, now
        time.sleep(0.1)
    assert now["requests"] == before["requests"]  # neither finished
    assert now["completion_tokens"] == before["completion_tokens"] and now["steps"] - before["steps"] < 1500


def test_the_openai_client_sees_a_bad_request(dep):
    import openai

    with pytest.raises(openai.BadRequestError, match="temperature"):
        _openai(dep).chat.completions.create(model="m", messages=ASK, temperature=9)


def test_a_run_without_any_final_model_is_not_deployable(dep):
    live = dep["live"]
    store = live.app.state.services.store
    run_id = completed_run(store)
    (live.settings.runs_dir / str(run_id) / "final").mkdir(parents=True)
    with live.client(dep["key"]) as c:
        r = c.post("/deployments", json={"run_id": run_id})
    assert r.status_code == 422 and "neither config.json nor adapter_config.json" in r.json()["message"]


@pytest.mark.slow
def test_a_lora_run_trained_without_merging_deploys(tmp_path):
    """`runrl train` through the SDK with use_lora and merge_lora false: final/ is the adapter; it deploys."""
    import runrl
    from openai import OpenAI

    live = start_server(Settings(data_dir=tmp_path / "data", poll_interval_s=0.2, cancel_grace_s=3.0))
    try:
        key = live.key()
        sdk = runrl.RunRLClient(api_key=key, base_url=live.url, poll_interval=0.5)
        path = tmp_path / "prompts.jsonl"
        path.write_text(PROMPTS)
        prompt = sdk.files.upload_path(str(path), file_type="prompt", name="Say words")
        reward = sdk.files.create_from_content(name="contains", content=REWARD, file_type="reward_function",
                                               original_filename="reward.py")
        run = sdk.runs.create(prompt_file_id=prompt.id, reward_file_id=reward.id, model="builtin:tiny",
                              type="reward_function", completion_length=16, max_steps=1, num_generations=2,
                              prompts_per_step=1, epochs=1, learning_rate_multiplier=1.0, use_lora=True, lora_rank=4,
                              merge_lora=False).result(timeout=300)
        assert run.status == "COMPLETED", run.error_message
        final = live.settings.runs_dir / str(run.id) / "final"
        assert (final / "adapter_config.json").is_file() and not (final / "config.json").exists()
        deployment = sdk.deployments.create(run.id, poll_interval=0.5).result(timeout=180)
        client = OpenAI(base_url=f"{deployment.api_url}/v1", api_key=key, timeout=120, max_retries=0)
        reply = client.chat.completions.create(model=f"run-{run.id}", messages=ASK, temperature=0, max_tokens=8)
        assert reply.choices[0].message.content == _greedy(final, ASK, 8)
        sdk.deployments.delete(deployment.id)
    finally:
        live.stop()
