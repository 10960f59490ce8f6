"""The operator's destination policy for user code's network (issue 16 finding 1, network half), on a real server.

Whatever a request body says, a run's config gets `reward_network: filtered` with the operator's
`allow_private_destinations` / `allowed_destinations`: in the stored config and in the run.yaml the worker
hands to `runrl train`. What the filter then enforces is tested against real sandboxes in
tests/engine/test_egress.py.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import yaml

from tests.server.conftest import PROMPTS, REWARD, wait_status


def _body(c, **extra) -> dict:
    p = c.post("/files", json={"type": "prompt", "name": "p.jsonl", "content": PROMPTS}).json()["data"]
    r = c.post("/files", json={"type": "reward_function", "name": "r.py", "content": REWARD}).json()["data"]
    return {"model": "builtin:tiny", "type": "reward_function", "prompt_file_id": p["id"], "reward_file_id": r["id"],
            "completion_length": 128, **extra}


ATTEMPT = {"reward_network": "host", "reward_allow_private_destinations": True,
           "reward_allowed_destinations": ["0.0.0.0/0", "::/0"]}


@pytest.mark.parametrize("allow_private", [False, True])
def test_runs_get_the_operators_filtered_network_whatever_the_body_says(make_live, settings, allow_private):
    live = make_live(replace(settings, allow_user_network=True, allow_private_destinations=allow_private,
                             allowed_destinations=("127.0.0.1:8765", "llm.internal")))
    with live.client(live.key()) as c:
        created = c.post("/runs", json=_body(c, reward_allow_network=True, run_name="sleep=3,code=0", **ATTEMPT))
        assert created.status_code in (200, 201), created.text
        run_id = created.json()["data"]["id"]
        wait_status(c, run_id, {"RUNNING"})
        run_yaml = live.settings.runs_dir / str(run_id) / "run.yaml"
        deadline = time.time() + 20
        while not run_yaml.exists() and time.time() < deadline:
            time.sleep(0.05)
        handed = yaml.safe_load(run_yaml.read_text())  # what `runrl train` was started with
        wait_status(c, run_id, {"COMPLETED"})
    stored = live.app.state.services.store.run(run_id)["config"]
    for config in (stored, handed):
        assert config["reward_allow_network"] is True
        assert config["reward_network"] == "filtered"
        assert config["reward_allow_private_destinations"] is allow_private
        assert config["reward_allowed_destinations"] == ["127.0.0.1:8765", "llm.internal"]


def test_without_user_network_the_keys_are_forced_all_the_same(live):
    with live.client(live.key()) as c:
        run_id = c.post("/runs", json=_body(c, run_name="sleep=0,code=0", **ATTEMPT)).json()["data"]["id"]
        wait_status(c, run_id, {"COMPLETED"})
    config = live.app.state.services.store.run(run_id)["config"]
    assert config["reward_allow_network"] is False and config["reward_network"] == "filtered"
    assert config["reward_allow_private_destinations"] is False and config["reward_allowed_destinations"] == []
