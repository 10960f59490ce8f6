"""An LLM-judge reward: an OpenAI-compatible chat endpoint (`POST {base}/chat/completions`) scores each completion.

Use it as `reward_file: examples/llm_judge_reward.py`. It reads its settings from its environment, which the
sandbox builds from an allowlist: the trainer's own variables never reach it, so pass them as the run's
`reward_secrets` (set in each sandbox worker's `os.environ` before this file loads; redacted from config.yaml,
logs and the API's run object):

    runrl train run.yaml --secrets-stdin <<< '{"reward_secrets": {"JUDGE_API_KEY": "sk-...",
        "JUDGE_BASE_URL": "https://api.openai.com/v1", "JUDGE_MODEL": "gpt-4o-mini"}}'

or, with `runrl serve`, `"reward_secrets": {...}` in the create-run body. JUDGE_BASE_URL defaults to OpenAI's
and JUDGE_MODEL to gpt-4o-mini. The judge must be reachable: `reward_allow_network: true` (the `runrl train`
default); under `runrl serve` the operator must pass --allow-user-network, and the judge must be a public address
or one of the server's allowed destinations (`reward_network: filtered`).

`reward_fn` is `async def`: each sandbox worker has up to `reward_concurrency` (default 8) judge calls in flight,
each bounded by `reward_timeout_s`. The client is made once per worker and reused across calls (each worker runs
one event loop for its whole life). An HTTP error (a wrong key: 401) raises, so the item scores 0 with the
judge's answer in its error, and a run whose rewards all fail stops after `max_failed_reward_steps`.
`runrl validate reward` runs without the run's secrets, so there it reports "JUDGE_API_KEY is not set".
"""

from __future__ import annotations

import os
import re

import httpx

BASE_URL = os.environ.get("JUDGE_BASE_URL", "https://api.openai.com/v1").rstrip("/")
MODEL = os.environ.get("JUDGE_MODEL", "gpt-4o-mini")
API_KEY = os.environ.get("JUDGE_API_KEY")

PROMPT = """You are grading an answer. Reply with one integer from 0 (useless) to 10 (perfect), nothing else.

Question: {question}

Answer: {answer}"""

_client: httpx.AsyncClient | None = None


def _question(prompt) -> str:
    if isinstance(prompt, list):  # the message list of the prompt row: grade against the last user turn
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return str(prompt or "")


async def reward_fn(completion, prompt=None, **kwargs):
    global _client
    if not API_KEY:
        raise RuntimeError("JUDGE_API_KEY is not set: pass it in the run's reward_secrets")
    if _client is None:  # one client (and connection pool) per worker, on the worker's one event loop
        _client = httpx.AsyncClient(base_url=BASE_URL, headers={"Authorization": f"Bearer {API_KEY}"},
                                    timeout=httpx.Timeout(20.0, connect=5.0))
    body = {"model": MODEL, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": PROMPT.format(question=_question(prompt), answer=completion)}]}
    response = await _client.post("/chat/completions", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"the judge answered HTTP {response.status_code}: {response.text[:300]}")
    data = response.json()
    reply = data["choices"][0]["message"]["content"] or ""
    match = re.search(r"\d+(?:\.\d+)?", reply)
    score = min(10.0, float(match.group())) / 10 if match else 0.0
    return score, {"judge_parsed": 1.0 if match else 0.0, "judge_model": str(data.get("model", "")),
                   "judge_reply": reply[:200]}
