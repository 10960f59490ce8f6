"""DAPO's reward/sampling set: `scale_rewards: group|batch|none` (and the old bools), the soft overlong penalty,
the zero-variance filter, dynamic sampling in real runs on the builtin tiny model.

Expected numbers are worked out by hand in the comments next to them, never by calling the code under test.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml

from runrl_engine import train
from runrl_engine.algorithms.advantages import get_advantage_estimator
from runrl_engine.algorithms.dapo import refill_prompts, soft_overlong_penalty, varied_groups
from runrl_engine.config import RunConfig, load_config, resume_config
from runrl_engine.errors import ConfigError

BASE = dict(model="builtin:tiny", prompt_file="p.jsonl", reward_file="r.py")


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- scale_rewards
def test_scale_rewards_batch_divides_by_the_std_of_the_whole_batch():
    grpo = get_advantage_estimator("grpo")
    rewards = torch.tensor([0.0, 2.0, 1.0, 1.0])  # groups of 2: [0, 2] and [1, 1]
    # group means 1 and 1; centred [-1, 1, 0, 0]. Batch: mean 1, squares 1+1+0+0 = 2, unbiased var 2/3.
    std = (2 / 3) ** 0.5
    adv, _ = grpo(rewards, 2, scale_rewards="batch")
    close(adv, [-1 / (std + 1e-4), 1 / (std + 1e-4), 0.0, 0.0])
    # "group": group 1's std is sqrt(2) (unbiased, (1+1)/1); the flat group stays 0
    adv, _ = grpo(rewards, 2, scale_rewards="group")
    close(adv, [-1 / (2 ** 0.5 + 1e-4), 1 / (2 ** 0.5 + 1e-4), 0.0, 0.0])
    close(grpo(rewards, 2, scale_rewards="none")[0], [-1.0, 1.0, 0.0, 0.0])
    # the old bools: True = group, False = none
    close(grpo(rewards, 2, scale_rewards=True)[0], grpo(rewards, 2, scale_rewards="group")[0])
    close(grpo(rewards, 2, scale_rewards=False)[0], [-1.0, 1.0, 0.0, 0.0])
    # another process's share: the caller's batch std (here 4) replaces this share's own
    close(grpo(rewards, 2, scale_rewards="batch", batch_std=4.0)[0], [-1 / 4.0001, 1 / 4.0001, 0.0, 0.0])
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo(rewards, 2, scale_rewards="batches")


def test_scale_rewards_batch_differs_from_group_when_groups_spread_differently():
    rewards = torch.tensor([0.0, 1.0, 0.0, 3.0])  # centred [-.5, .5, -1.5, 1.5]
    # batch: mean 1, squares 1+0+1+4 = 6, var 2, std sqrt 2, the same divisor for both groups
    adv, _ = get_advantage_estimator("grpo")(rewards, 2, scale_rewards="batch")
    d = 2 ** 0.5 + 1e-4
    close(adv, [-0.5 / d, 0.5 / d, -1.5 / d, 1.5 / d])


@pytest.mark.parametrize("old, new", [(True, "group"), (False, "none")])
def test_old_bool_scale_rewards_is_accepted_everywhere(tmp_path, old, new):
    assert RunConfig.from_dict({**BASE, "scale_rewards": old}).scale_rewards == new  # the API's path
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "scale_rewards": old}))
    assert load_config(path).scale_rewards == new  # a config file
    path.write_text(yaml.safe_dump(BASE))
    assert load_config(path, [f"scale_rewards={str(old).lower()}"]).scale_rewards == new  # --set
    assert load_config(path, ["scale_rewards=batch"]).scale_rewards == "batch"
    # --resume of a run whose config.yaml was written when the key was a bool: same meaning, no change refused
    stored = tmp_path / "config.yaml"
    stored.write_text(yaml.safe_dump({**BASE, "scale_rewards": old}))
    cfg, notes = resume_config(stored, load_config(path, [f"scale_rewards={new}"]), [], source=str(path))
    assert cfg.scale_rewards == new and notes == []
    with pytest.raises(ConfigError, match="scale_rewards") as err:
        RunConfig.from_dict({**BASE, "scale_rewards": "yes"})
    assert "'group', 'batch', 'none'" in err.value.render()
    with pytest.raises(ConfigError, match="scale_rewards"):
        RunConfig.from_dict({**BASE, "scale_rewards": 1})  # only real bools are the old spelling


# ----------------------------------------------------------------------------------------------- overlong penalty
def test_soft_overlong_penalty_at_the_boundaries():
    # L_max 100, L_cache 20: 0 up to 80, then (80 - n) / 20, -1 at 100, -1 beyond (TRL's docstring: 90 -> -0.5)
    got = soft_overlong_penalty([0, 79, 80, 81, 90, 99, 100, 101, 500], 100, 20)
    assert got == pytest.approx([0, 0, 0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0])
    assert soft_overlong_penalty([90, 100], 100, 20, factor=0.5) == pytest.approx([-0.25, -0.5])
    assert soft_overlong_penalty([100, 101], 100, 0) == [0.0, -1.0]  # no buffer: a hard cut past L_max
    assert soft_overlong_penalty([0, 5, 10], 10, 10) == pytest.approx([0.0, -0.5, -1.0])  # buffer = L_max
    with pytest.raises(ValueError):
        soft_overlong_penalty([1], 10, 11)


def test_soft_overlong_penalty_matches_trl():
    trl_rewards = pytest.importorskip("trl.rewards")
    lengths = [0, 10, 15, 16, 17, 20, 23, 24, 30]
    trl = trl_rewards.get_soft_overlong_punishment(max_completion_len=24, soft_punish_cache=8)
    assert soft_overlong_penalty(lengths, 24, 8) == pytest.approx(trl([[1] * n for n in lengths]))


def test_overlong_config_keys():
    cfg = RunConfig.from_dict({**BASE, "overlong_penalty": True, "completion_length": 24})
    assert (cfg.overlong_max, cfg.overlong_buffer) == (24, 4)  # unset: completion_length, a fifth of it
    cfg = RunConfig.from_dict({**BASE, "overlong_penalty": True, "overlong_max_length": 50,
                               "overlong_buffer_length": 10})
    assert (cfg.overlong_max, cfg.overlong_buffer) == (50, 10)
    with pytest.raises(ConfigError, match="overlong_buffer_length"):
        RunConfig.from_dict({**BASE, "overlong_penalty": True, "completion_length": 8, "overlong_buffer_length": 9})
    with pytest.raises(ConfigError, match="overlong_buffer_length"):
        RunConfig.from_dict({**BASE, "overlong_buffer_length": -1})
    with pytest.raises(ConfigError, match="overlong_penalty"):
        RunConfig.from_dict({**BASE, "overlong_penalty": True, "algorithm": "ppo", "type": "environment"})


# ----------------------------------------------------------------------------------------------- dynamic sampling
def test_varied_groups_and_refill_size():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 2.0, 2.0, 2.0])
    assert varied_groups(rewards, 3).tolist() == [False, True, False]
    assert varied_groups(torch.tensor([0.3, 0.3 + 1e-6]), 2).tolist() == [True]  # any difference is a signal
    assert varied_groups(torch.tensor([5.0]), 1).tolist() == [False]  # a group of one never varies
    with pytest.raises(ValueError):
        varied_groups(rewards, 2)
    assert refill_prompts(0, 3, 8, 8) == 0
    assert refill_prompts(4, 0, 8, 8) == 8  # nothing kept yet: a whole step's worth
    assert refill_prompts(4, 4, 8, 8) == 8  # half kept: 4 / 0.5
    assert refill_prompts(1, 3, 4, 8) == 2  # 1 / 0.75 = 1.33 -> 2
    assert refill_prompts(6, 2, 8, 8) == 8  # 6 / 0.25 = 24, capped at the step's 8


def test_dynamic_sampling_config_keys():
    assert RunConfig.from_dict({**BASE, "dynamic_sampling": True}).dynamic_sampling_max_rounds == 3
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        RunConfig.from_dict({**BASE, "dynamic_sampling": True, "algorithm": "ppo"})
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        RunConfig.from_dict({**BASE, "dynamic_sampling": True, "num_generations": 1})
    with pytest.raises(ConfigError, match="dynamic_sampling"):  # refused at load (a 422 from the API), not at start
        RunConfig.from_dict({**BASE, "dynamic_sampling": True, "n_gpus": 2})
    with pytest.raises(ConfigError, match="dynamic_sampling_max_rounds"):
        RunConfig.from_dict({**BASE, "dynamic_sampling_max_rounds": 101})


REWARD = '''
def reward_fn(completion, **row):
    if row["flat"]:
        return 1.0  # the same for every completion of this prompt: a zero-variance group
    return (sum(map(ord, completion)) % 97) / 97.0
'''


def _task(tmp_path: Path, flat: list[bool]) -> dict:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Say something about {i}."}],
                                           "flat": f}) + "\n" for i, f in enumerate(flat)))
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD)
    return dict(model="builtin:tiny", prompt_file=str(prompts), reward_file=str(reward), completion_length=6,
                prompts_per_step=4, num_generations=4, micro_batch_size=16, learning_rate=1e-3, eval_fraction=0,
                eval_every=0, save_every=0, seed=0, log_completions=1000, dynamic_sampling=True)


def _groups(run: Path) -> dict[tuple[int, str], list[dict]]:
    out: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for line in (run / "completions.jsonl").read_text().splitlines():
        c = json.loads(line)
        out[(c["step"], c["prompt"][-1]["content"])].append(c)
    return out


def test_dynamic_sampling_trains_only_on_groups_whose_rewards_differ(tmp_path, tiny_model_dir):
    """Half the prompts give every completion the same reward. Each step drops those groups and refills from the
    other prompts until it has 4 groups with differing rewards; no trained group is flat."""
    flat = [i % 2 == 0 for i in range(16)]
    result = train({**_task(tmp_path, flat), "max_steps": 2}, output_dir=tmp_path / "run")
    groups = _groups(tmp_path / "run")
    for step, record in enumerate(result.history, 1):
        trained = [g for (s, _), g in groups.items() if s == step and "dropped" not in g[0]]
        flat_dropped = [g for (s, _), g in groups.items() if s == step and g[0].get("dropped") == "zero_variance"]
        assert len(trained) == 4 == record["dynamic_sampling/kept_groups"]
        assert all(len({c["reward"] for c in g}) > 1 for g in trained)  # every trained group has variance
        assert all(len({c["reward"] for c in g}) == 1 for g in flat_dropped)
        assert len(flat_dropped) == record["dynamic_sampling/dropped_groups"] >= 1
        assert 1 <= record["dynamic_sampling/rounds"] <= 3
        # the step's first round dropped as many groups as the refills then supplied; refill rounds may drop more
        assert 1 <= record["dynamic_sampling/refilled_groups"] <= record["dynamic_sampling/dropped_groups"]
        assert record["advantage/frac_zero_std_groups"] == 0.0  # over the batch the update used
        # every completion of a group is marked alike (whole groups are kept or dropped)
        assert all(len({c.get("dropped") for c in g}) == 1 for (s, _), g in groups.items() if s == step)
    assert sum(r["dynamic_sampling/refill_prompts"] for r in result.history) > 0


def test_dynamic_sampling_stops_at_its_cap_and_skips_a_step_with_nothing_to_train(tmp_path, tiny_model_dir):
    """Every prompt flat: each step runs exactly `dynamic_sampling_max_rounds` extra rounds, keeps nothing and
    makes no update (the weights stay the base model's)."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    result = train({**_task(tmp_path, [True] * 16), "dynamic_sampling_max_rounds": 2, "max_steps": 2},
                   output_dir=run)
    for record in result.history:
        assert record["dynamic_sampling/rounds"] == 2
        assert record["dynamic_sampling/kept_groups"] == 0 and record["dynamic_sampling/skipped_update"] == 1
        # 4 prompts, then 4 + 4 refills (nothing kept: a whole step's worth each round), all dropped
        assert record["dynamic_sampling/refill_prompts"] == 8 and record["dynamic_sampling/dropped_groups"] == 12
        assert "grad_norm" not in record
    assert all(c["dropped"] == "zero_variance" for g in _groups(run).values() for c in g)
    assert "no update this step" in (run / "logs.txt").read_text()
    base, final = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(base[k], final[k]) for k in base)


def test_dynamic_sampling_short_step_trains_on_what_it_has(tmp_path, tiny_model_dir):
    """2 of 16 prompts vary and the cap is 1 round: a step that cannot fill its 4 groups trains on fewer."""
    flat = [i not in (3, 11) for i in range(16)]
    result = train({**_task(tmp_path, flat), "dynamic_sampling_max_rounds": 1, "max_steps": 2},
                   output_dir=tmp_path / "run")
    kept = [r["dynamic_sampling/kept_groups"] for r in result.history]
    assert all(k < 4 for k in kept) and all(r["dynamic_sampling/rounds"] <= 1 for r in result.history)
    for r in result.history:
        assert ("grad_norm" in r) == (r["dynamic_sampling/kept_groups"] > 0)


def test_overlong_penalty_reaches_the_training_reward(tmp_path, tiny_model_dir):
    """completion_length 6, buffer 4: a completion of n sampled tokens loses (2 - n) / 4 past 2 tokens, shown in
    completions.jsonl's reward and the overlong metrics."""
    task = {**_task(tmp_path, [True] * 8), "dynamic_sampling": False, "overlong_penalty": True,
            "overlong_buffer_length": 4, "max_steps": 1}
    result = train(task, output_dir=tmp_path / "run")
    records = [c for g in _groups(tmp_path / "run").values() for c in g]
    assert len(records) == 16
    penalties = [c["reward"] - 1.0 for c in records]  # flat prompts: the reward function's 1.0 plus the penalty
    assert all(-1.0 <= p <= 0.0 for p in penalties) and min(penalties) < 0
    # a truncated completion has exactly completion_length = L_max sampled tokens: -1
    assert all(p == pytest.approx(-1.0) for c, p in zip(records, penalties) if not c["finished"])
    record = result.history[0]
    assert record["overlong/penalty_mean"] == pytest.approx(sum(penalties) / 16)
    assert record["overlong/penalised_fraction"] == pytest.approx(sum(p < 0 for p in penalties) / 16)


def test_dynamic_sampling_resumes_exactly(tmp_path, tiny_model_dir):
    """Refill prompts depend only on (seed, step, round): a run resumed from step 2 draws step 3's refills, and
    trains on them, as the uninterrupted run did."""
    import shutil

    from safetensors.torch import load_file

    task = {**_task(tmp_path, [i % 2 == 0 for i in range(16)]), "max_steps": 3, "overlong_penalty": True}
    straight = train(task, output_dir=tmp_path / "straight")
    out = tmp_path / "resumed"
    train({**task, "save_every": 1}, output_dir=out)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-3")
    resumed = train({**task, "save_every": 1}, output_dir=out, resume=True)
    assert [h["step"] for h in resumed.history] == [3]
    keys = [k for k in straight.history[-1] if k.startswith(("dynamic_sampling/", "overlong/"))] + ["reward_mean"]
    assert straight.history[-1]["dynamic_sampling/refill_prompts"] > 0
    assert {k: resumed.history[-1][k] for k in keys} == {k: straight.history[-1][k] for k in keys}
    ws, wr = load_file(str(tmp_path / "straight" / "final" / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    for k in ws:
        torch.testing.assert_close(wr[k], ws[k], atol=1e-6, rtol=1e-5)
