"""PPO with a critic in the real loop (builtin tiny model): it learns, its batches are reused for real (the ratio
moves and clipping engages), gradient accumulation does not change the update, the critic trains under LoRA
and as a separate model, the KL can go into the rewards, and environment step rewards land on turn ends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runrl_engine import train
from runrl_engine.data import PromptRow
from runrl_engine.rollout.episodes import Episode
from runrl_engine.update import reward_positions

ROOT = Path(__file__).resolve().parents[2]
QS = ROOT / "configs" / "data" / "quickstart"
PPO_KEYS = ("value_loss", "explained_variance", "clip_fraction", "approx_kl", "entropy")


def cfg(**over):
    base = dict(model="builtin:tiny", prompt_file=str(QS / "prompts.jsonl"), reward_file=str(QS / "reward.py"),
                algorithm="ppo", completion_length=8, max_steps=2, prompts_per_step=2, num_generations=4,
                micro_batch_size=8, learning_rate=3e-3, eval_every=0, save_every=0, seed=0, log_completions=0)
    base.update(over)
    return base


def test_ppo_raises_the_reward_and_logs_its_metrics(tmp_path, tiny_model_dir):
    result = train(cfg(max_steps=25, completion_length=16, prompts_per_step=4, num_generations=8,
                       micro_batch_size=32, ppo_epochs=2, num_minibatches=2, entropy_coef=0.01), output_dir=tmp_path)
    r = [h["reward_mean"] for h in result.history]
    assert sum(r[-5:]) / 5 > sum(r[:5]) / 5 + 0.2, r
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in PPO_KEYS + ("value_mean", "returns_mean", "value_grad_norm", "time/old_logprobs_s"):
        assert all(key in m for m in metrics), key
    # batches are reused: the second and later minibatches see a moved policy, so the ratio leaves 1 and clips
    assert max(m["clip_fraction"] for m in metrics) > 0 and max(m["approx_kl"] for m in metrics) > 0
    assert metrics[0]["value_mean"] == 0.0 and metrics[-1]["value_mean"] != 0.0  # the zero-initialised head learns
    assert (tmp_path / "final" / "model.safetensors").is_file()
    config = (tmp_path / "config.yaml").read_text()
    assert "advantage_estimator: gae" in config


@pytest.mark.parametrize("critic", ["head", "separate"])
def test_one_pass_over_the_batch_keeps_the_ratio_at_one(tmp_path, tiny_model_dir, critic):
    from runrl_engine.config import RunConfig
    from runrl_engine.setup import build_run
    from runrl_engine.trainer import Trainer

    trainer = Trainer(build_run(RunConfig.from_dict(cfg(critic=critic)), tmp_path))
    up, policy_forwards = trainer.updater, []
    forward = up.forward
    up.forward = lambda model, mb, **kw: (policy_forwards.append(model is up.model), forward(model, mb, **kw))[1]
    try:
        result = trainer.run()
    finally:
        trainer.close()
    for h in result.history:
        assert h["clip_fraction"] == 0.0 and h["approx_kl"] == pytest.approx(0.0, abs=1e-6)
        assert h["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    # one micro-batch per step; the value head's values need the policy's forward before the update, a separate
    # critic's do not (the update's own detached log-probs are the old ones)
    assert sum(policy_forwards) == (4 if critic == "head" else 2)


def test_gradient_accumulation_does_not_change_the_update(tmp_path, tiny_model_dir):
    """8 rollouts in one micro-batch == 8 micro-batches of 1 (value loss, entropy and GAE included)."""
    over = dict(max_steps=1, entropy_coef=0.05, vf_coef=0.5)
    whole = train(cfg(micro_batch_size=8, **over), output_dir=tmp_path / "whole")
    split = train(cfg(micro_batch_size=1, **over), output_dir=tmp_path / "split")
    for key in ("loss", "value_loss", "entropy", "pg_loss", "explained_variance"):
        assert split.history[0][key] == pytest.approx(whole.history[0][key], rel=1e-4, abs=1e-6), key
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    a, b = load_file(str(whole.final_dir / "model.safetensors")), load_file(str(split.final_dir / "model.safetensors"))
    moved = 0
    for k in base:
        step = (a[k] - base[k]).abs().max().item()
        moved += step > 0
        torch.testing.assert_close(b[k], a[k], atol=max(step * 0.02, 1e-7), rtol=0)
    assert moved > 0


def test_lora_trains_the_value_head_with_the_adapter(tmp_path, tiny_model_dir):
    from runrl_engine.config import RunConfig
    from runrl_engine.setup import build_run
    from runrl_engine.trainer import Trainer

    trainer = Trainer(build_run(RunConfig.from_dict(cfg(use_lora=True, lora_rank=4, lora_alpha=8, learning_rate=1e-2)),
                                tmp_path))
    try:
        head = trainer.acc.unwrap_model(trainer.updater.model).value_head.linear
        before = head.weight.detach().clone()
        assert head.weight.requires_grad and any("lora_" in n for n, p in trainer.updater.model.named_parameters()
                                                 if p.requires_grad)
        trainer.run()
        assert not torch.equal(head.weight.detach(), before)
    finally:
        trainer.close()


def test_separate_critic_and_kl_in_reward(tmp_path, tiny_model_dir):
    from runrl_engine.config import RunConfig
    from runrl_engine.setup import build_run
    from runrl_engine.trainer import Trainer

    trainer = Trainer(build_run(RunConfig.from_dict(cfg(critic="separate", beta=0.5, kl_in_reward=True, max_steps=3,
                                                        critic_learning_rate=1e-2)), tmp_path))
    try:
        up = trainer.updater
        assert up.critic is not None and up.ref_model is not None
        critic_before = {n: p.detach().clone() for n, p in up.critic.named_parameters() if p.requires_grad}
        result = trainer.run()
        moved = [n for n, p in up.critic.named_parameters() if p.requires_grad
                 and not torch.equal(p.detach(), critic_before[n])]
        assert "value_head.linear.weight" in moved and any(n.startswith("lm.model.layers") for n in moved)
    finally:
        trainer.close()
    history = result.history
    assert all("kl_penalty_mean" in h for h in history)
    assert history[0]["kl_penalty_mean"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert history[-1]["kl"] > 0


def _episode(tokens_mask: list[int], *, reward: float, step_rewards=(), ends=(), error=None) -> Episode:
    return Episode(row=PromptRow(messages=[{"role": "user", "content": "x"}], fields={}, line=1), prompt_index=0,
                   sample_index=0, prompt_ids=[1], tokens=[5] * len(tokens_mask), mask=list(tokens_mask),
                   reward=reward, step_rewards=list(step_rewards), step_reward_ends=list(ends), error=error)


def test_environment_step_rewards_sit_on_the_judged_turn_ends():
    # two judged assistant turns separated by an observation; a one-turn episode; an episode whose first turn
    # called a tool (answered by the tool, not judged) so its one step reward belongs to the second turn; an
    # episode that errored (its reward goes to its last sampled token); one with nothing sampled
    eps = [_episode([1, 1, 0, 0, 1, 1, 1, 0], reward=3.0, step_rewards=[1.0, 2.0], ends=[1, 6]),
           _episode([1, 1, 1], reward=0.5, step_rewards=[0.5], ends=[2]),
           _episode([1, 1, 0, 0, 1, 1], reward=4.0, step_rewards=[4.0], ends=[5]),
           _episode([1, 0, 1], reward=0.0, step_rewards=[4.0], ends=[0], error="env crashed"),
           _episode([], reward=1.0)]
    width = 8
    mask = torch.tensor([e.mask + [0] * (width - len(e.mask)) for e in eps], dtype=torch.float32)
    assert reward_positions(eps, mask, step_rewards=True) == [(0, 1, 1.0), (0, 6, 2.0), (1, 2, 0.5), (2, 5, 4.0),
                                                              (3, 2, 0.0)]
    # reward-function runs (tools included) credit the final token only
    assert reward_positions(eps, mask, step_rewards=False) == [(0, 6, 3.0), (1, 2, 0.5), (2, 5, 4.0), (3, 2, 0.0)]


def test_rollouts_record_which_turn_each_step_reward_judged(tiny_model_and_tokenizer):
    """A real multi-turn rollout: every step reward's position is the last sampled token of a judged turn."""
    from runrl_engine.rollout.episodes import ChatRenderer, EpisodeSettings, run_episodes
    from runrl_engine.rollout.types import SamplingParams
    from runrl_engine.sandbox import EnvSandbox

    model, tok = tiny_model_and_tokenizer
    env_file = ROOT / "configs" / "data" / "guess_number" / "env.py"
    rows = [json.loads(line) for line in (env_file.parent / "prompts.jsonl").read_text().splitlines()[:2]]
    renderer = ChatRenderer(tok)
    episodes = [Episode(row=PromptRow(messages=r["prompt"], fields=r, line=i + 1), prompt_index=i, sample_index=0,
                        prompt_ids=renderer.prompt_ids(r["prompt"])) for i, r in enumerate(rows)]
    settings = EpisodeSettings(sampling=SamplingParams(max_new_tokens=6), stop_ids={tok.eos_token_id},
                               pad_id=tok.pad_token_id, end_of_turn_id=tok.eos_token_id, max_turns=3)
    with EnvSandbox(env_file, num_workers=1) as env:
        run_episodes(model, renderer, episodes, settings, lambda ep, turn: 1000 * ep.prompt_index + turn,
                     group_size=1, env=env)
    for ep in episodes:
        assert ep.error is None and len(ep.step_reward_ends) == len(ep.step_rewards) >= 1
        for end in ep.step_reward_ends:
            assert ep.mask[end] == 1 and (end + 1 == len(ep.mask) or ep.mask[end + 1] == 0)


def test_turns_answered_by_a_tool_get_no_step_reward(tiny_model_and_tokenizer):
    """Environment + tools: the environment judges only turns without a tool call, so its step rewards must sit on
    those turns, not on the i-th sampled run (scripted policy, environment and tool server: bookkeeping only)."""
    from types import SimpleNamespace as NS

    from runrl_engine.rollout.episodes import ChatRenderer, EpisodeSettings, run_episodes
    from runrl_engine.rollout.types import SamplingParams

    _, tok = tiny_model_and_tokenizer
    tools = [{"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}]
    renderer = ChatRenderer(tok, tools)
    script = ['<tool_call>\n{"name": "add", "arguments": {"a": 5, "b": 2}}\n</tool_call>', "7", "8"]

    class Policy:
        def generate(self, model, prompts, num_samples, seeds, params, stop_ids, pad_id):
            return [NS(tokens=renderer.encode(script.pop(0)) + [tok.eos_token_id], finished=True)]

    class Env:
        def create(self, fields):
            return [NS(env_id=0, error=None, observation=None)]

        def step(self, ids, texts):
            return [NS(error=None, reward={"7": 1.0, "8": 5.0}[texts[0]], info={}, done=texts[0] == "8",
                       observation="again")]

        def close_envs(self, ids):
            pass

    class Tools:
        def open_sessions(self, n, urls, call_timeout_s, max_calls):
            return [NS(close=lambda: None) for _ in range(n)]

        def call_many(self, batch):
            return [NS(is_error=False, text="7") for _ in batch]

    prompt = [{"role": "user", "content": "q"}]
    ep = Episode(row=PromptRow(prompt, {}, 1), prompt_index=0, sample_index=0, prompt_ids=renderer.prompt_ids(prompt))
    settings = EpisodeSettings(sampling=SamplingParams(max_new_tokens=40), stop_ids={tok.eos_token_id},
                               pad_id=tok.pad_token_id, end_of_turn_id=tok.eos_token_id, max_turns=4, backend=Policy())
    run_episodes(None, renderer, [ep], settings, lambda e, t: t, env=Env(), tools=Tools(), tool_urls=["http://x"])
    assert ep.turns == 3 and ep.tool_calls == 1 and ep.step_rewards == [1.0, 5.0]
    mask = torch.tensor([ep.mask], dtype=torch.float32)
    ends = [i for i, m in enumerate(ep.mask) if m and (i + 1 == len(ep.mask) or not ep.mask[i + 1])]
    assert len(ends) == 3  # the tool-call turn, "7", "8"
    assert reward_positions([ep], mask, step_rewards=True) == [(0, ends[1], 1.0), (0, ends[2], 5.0)]


def test_multi_turn_environment_under_ppo(tmp_path, tiny_model_dir):
    """The guess-number environment (step rewards per turn) runs under PPO; observations are not trained on."""
    env_cfg = ROOT / "configs" / "env_quickstart.yaml"
    result = train(env_cfg, output_dir=tmp_path, overrides=["algorithm=ppo", "max_steps=2", "eval_every=0",
                                                             "save_every=0", "prompts_per_step=2",
                                                             "num_generations=2", "completion_length=8"])
    assert result.steps == 2 and all(h["env_errors"] == 0 for h in result.history)
    assert all(h["turns_per_episode"] > 1 for h in result.history)
    assert all(k in result.history[-1] for k in PPO_KEYS)


def test_gspo_and_a_critic_free_estimator_with_reused_batches(tmp_path, tiny_model_dir):
    """`importance_sampling_level: sequence` and `ppo_epochs` > 1 also work without a critic (GRPO family)."""
    result = train(cfg(algorithm="grpo", advantage_estimator="rloo", importance_sampling_level="sequence",
                       ppo_epochs=3, max_steps=2, learning_rate=1e-2), output_dir=tmp_path)
    assert "value_loss" not in result.history[-1] and "time/old_logprobs_s" in result.history[-1]
    assert max(h["approx_kl"] for h in result.history) > 0  # later epochs see a moved policy
