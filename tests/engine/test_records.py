"""A step record's episode statistics: the same whether the episodes sat on one process or were split across
several (`episode_summary` per process, `merged_stats` over the gathered summaries), and the batch built from
the same episodes (`RolloutBatch.from_episodes`)."""

from __future__ import annotations

import math

import pytest
import torch

from runrl_engine.batch import RolloutBatch
from runrl_engine.data import PromptRow
from runrl_engine.records import episode_summary, merged_stats
from runrl_engine.rollout.episodes import Episode


def episode(i: int, reward: float, n_tokens: int, *, finished: bool = True, error: str | None = None,
            info: dict | None = None) -> Episode:
    row = PromptRow(messages=[{"role": "user", "content": f"q{i}"}], fields={}, line=i + 1)
    return Episode(row=row, prompt_index=i // 2, sample_index=i % 2, prompt_ids=[5] * (2 + i % 3),
                   tokens=list(range(1, n_tokens + 1)), mask=[1] * n_tokens, sampler_logprobs=[math.nan] * n_tokens,
                   finished=finished, reward=reward, error=error, info=info or {}, turns=1)


EPISODES = [episode(0, 1.0, 3, info={"acc": 1.0, "note": "x"}), episode(1, 0.0, 5, finished=False),
            episode(2, 0.5, 2, error="boom", info={"acc": 0.0}), episode(3, 0.25, 4, info={"acc": 1.0, "bad": math.inf})]


def test_split_across_processes_equals_one_process():
    whole = merged_stats([episode_summary(EPISODES)], env_mode=False, tools=False, step_time=2.0)
    split = merged_stats([episode_summary(EPISODES[:1]), episode_summary(EPISODES[1:])], env_mode=False,
                         tools=False, step_time=2.0)
    assert split == pytest.approx(whole)
    rewards = [1.0, 0.0, 0.5, 0.25]
    mean = sum(rewards) / 4
    assert whole["reward_mean"] == pytest.approx(mean)
    assert whole["reward_std"] == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in rewards) / 3))
    assert (whole["reward_min"], whole["reward_max"], whole["reward_errors"]) == (0.0, 1.0, 1)
    assert (whole["completion_length_min"], whole["completion_length_max"]) == (2, 5)
    assert whole["truncated_fraction"] == 0.25 and whole["tokens_per_s"] == 7.0
    # numeric, finite info values only, averaged over the episodes that reported them
    assert whole["reward_info/acc"] == pytest.approx(2 / 3) and "reward_info/note" not in whole
    assert "reward_info/bad" not in whole and "turns_per_episode" not in whole


def test_environment_and_tool_keys():
    stats = merged_stats([episode_summary(EPISODES)], env_mode=True, tools=True, step_time=0.0)
    assert stats["env_errors"] == 1 and "reward_errors" not in stats
    assert stats["turns_per_episode"] == 1.0 and stats["tool_calls_per_episode"] == 0.0
    assert stats["tokens_per_s"] == 0.0


def test_batch_from_episodes():
    batch = RolloutBatch.from_episodes(EPISODES, pad_id=0, device="cpu")
    assert batch.prompt_ids.shape == (4, 4) and batch.completion_ids.shape == (4, 5)
    assert batch.prompt_mask[0].tolist() == [0, 0, 1, 1]  # left-padded prompts
    assert batch.completion_mask[1].tolist() == [1] * 5 and batch.completion_mask[2].tolist() == [1, 1, 0, 0, 0]
    assert batch.truncated.tolist() == [False, True, False, False]
    assert batch.rewards.tolist() == [1.0, 0.0, 0.5, 0.25] and not batch.advantages.any()
    assert batch.sampler_logp is None  # the engine reported no log-probs
    reported = [episode(0, 1.0, 2)]
    reported[0].sampler_logprobs = [-0.5, -1.0]
    assert torch.equal(RolloutBatch.from_episodes(reported, 0, "cpu").sampler_logp, torch.tensor([[-0.5, -1.0]]))
