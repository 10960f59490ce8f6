"""A real-model run end to end through the service: `builtin:smollm2-135m-instruct` trained over the REST API with
the official SDK, its `final/` deployed, and the deployment asked an easy question through the official `openai`
client. The model is the real pretrained SmolLM2-135M-Instruct, so the answer is checked, not just its shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import runrl
from runrl.exceptions import RunFailedError

from server.settings import Settings
from tests.server.conftest import start_server

pytestmark = pytest.mark.slow
ARITH = Path(__file__).resolve().parents[2] / "configs" / "data" / "arithmetic"


def test_real_model_run_deploys_and_answers_an_openai_client(smollm2_dir, tmp_path):
    from openai import OpenAI

    live = start_server(Settings(data_dir=tmp_path / "data", poll_interval_s=0.2, cancel_grace_s=3.0))
    try:
        key = live.key()
        sdk = runrl.RunRLClient(api_key=key, base_url=live.url, poll_interval=0.5)
        prompts = sdk.files.upload_path(str(ARITH / "eval.jsonl"), file_type="prompt", name="sums")
        reward = sdk.files.create_from_content(name="exact-sum", content=(ARITH / "reward.py").read_text(),
                                               file_type="reward_function", original_filename="reward.py")
        future = sdk.runs.create(model="builtin:smollm2-135m-instruct", type="reward_function",
                                 prompt_file_id=prompts.id, reward_file_id=reward.id, completion_length=128,
                                 max_steps=2, prompts_per_step=1, num_generations=2, eval_every=0, save_every=0,
                                 temperature=0.8, epochs=1, learning_rate_multiplier=1.0)
        try:
            run = future.result(timeout=900)
        except RunFailedError as exc:
            pytest.fail(f"run failed: {exc.run.error_message}")
        assert run.status == "COMPLETED"
        history = sdk.runs.metrics(run.id)["history"]
        assert [h["step"] for h in history] == [1, 2]
        assert all(h["reward_errors"] == 0 for h in history)

        dep = sdk.deployments.create(run.id, poll_interval=0.5).result(timeout=600)
        assert dep.status == "active" and dep.base_model == "builtin:smollm2-135m-instruct"
        client = OpenAI(base_url=f"{dep.api_url}/v1", api_key=key, timeout=300, max_retries=0)
        reply = client.chat.completions.create(
            model=f"run-{run.id}", temperature=0, max_tokens=16,
            messages=[{"role": "user", "content": "What is 7 + 5? Answer with the number only."}])
        text = reply.choices[0].message.content
        assert reply.choices[0].message.role == "assistant" and "12" in text, text
        assert reply.usage.completion_tokens <= 16
        sdk.deployments.delete(dep.id)
    finally:
        live.stop()
