"""The DAPO keys through the REST API (real uvicorn on loopback, worker off): `scale_rewards` takes TRL's
choices and its old bools with their old meaning, and a DAPO key's mistake is a 422 naming that key."""

from __future__ import annotations

from dataclasses import replace

from runrl_engine.config import RunConfig

from tests.server.test_api_ranges import body, upload


def test_dapo_keys_over_the_api(make_live, settings):
    live = make_live(replace(settings, start_worker=False))
    store = live.app.state.services.store
    with live.client(live.key()) as c:
        p, r = upload(c)
        for given, stored in ((True, "group"), (False, "none"), ("batch", "batch")):
            made = c.post("/runs", json=body(p, r, scale_rewards=given, dynamic_sampling=True, overlong_penalty=True,
                                             completion_length=16, overlong_buffer_length=4))
            assert made.status_code == 201, made.text
            config = store.run(made.json()["data"]["id"])["config"]
            assert config["scale_rewards"] is given or config["scale_rewards"] == given  # kept as sent
            cfg = RunConfig.from_dict(config, source="run")  # what `runrl train` will read from it
            assert (cfg.scale_rewards, cfg.dynamic_sampling, cfg.overlong_buffer) == (stored, True, 4)
        for key, extra in (("scale_rewards", {"scale_rewards": "yes"}),
                           ("dynamic_sampling", {"dynamic_sampling": True, "algorithm": "ppo"}),
                           ("overlong_buffer_length", {"overlong_penalty": True, "completion_length": 16,
                                                       "overlong_buffer_length": 17})):
            res = c.post("/runs", json=body(p, r, **extra))
            assert res.status_code == 422 and set(res.json()["details"]) == {key}, res.text
