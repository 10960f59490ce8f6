"""Multi-turn episodes: token sequences agree with the chat template, masks cover exactly the sampled
tokens, and environment failures end only their own episode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from runrl_engine.data import PromptRow
from runrl_engine.errors import UserError
from runrl_engine.rollout.episodes import ChatRenderer, Episode, EpisodeSettings, _insert, run_episodes
from runrl_engine.rollout.types import SamplingParams
from runrl_engine.sandbox import EnvSandbox

ROOT = Path(__file__).resolve().parents[2]

# A ChatML template written for this test (not the builtin one): default system prompt, tools in the system
# turn, tool results as user turns wrapped in <tool_response>.
OTHER_CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|im_start|>system\n{{ m['content'] }}"
    "{% if tools %}\nTools: {% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}<|im_end|>\n"
    "{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}]


def assistant_turn(renderer: ChatRenderer, ep: Episode, text: str) -> None:
    """What the rollout does with a sampled turn, for a turn whose tokens are the canonical encoding."""
    ids = renderer.encode(text) + [renderer.tokenizer.eos_token_id]
    ep.tokens += ids
    ep.mask += [1] * len(ids)
    ep.messages.append({"role": "assistant", "content": text})


@pytest.mark.parametrize("template", ["builtin", "other"])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_episode_tokens_equal_the_template_render(tiny_model_and_tokenizer, template, tools):
    _, tok = tiny_model_and_tokenizer
    tok = tok.__class__.from_pretrained(tok.name_or_path)  # a private copy we may change
    if template == "other":
        tok.chat_template = OTHER_CHATML
    renderer = ChatRenderer(tok, tools)
    prompt = [{"role": "system", "content": "Play."}, {"role": "user", "content": "Guess a digit."}]
    ep = Episode(row=PromptRow(prompt, {"prompt": prompt}, 1), prompt_index=0, sample_index=0,
                 prompt_ids=renderer.prompt_ids(prompt), messages=[dict(m) for m in prompt])
    assistant_turn(renderer, ep, "5")
    _insert(renderer, ep, [{"role": "user", "content": "No, higher."}])
    assistant_turn(renderer, ep, '<tool_call>\n{"name": "add", "arguments": {"a": 5, "b": 2}}\n</tool_call>')
    _insert(renderer, ep, [{"role": "tool", "content": "7.0"}, {"role": "tool", "content": "ok"}])
    assistant_turn(renderer, ep, "7")

    whole = renderer.render(ep.messages, add_generation_prompt=False)
    expected = renderer.encode(whole)
    assert whole.endswith("<|im_end|>\n") and renderer.encode("\n") == expected[-1:]
    assert ep.prompt_ids + ep.tokens == expected[:-1]  # the sequence stops at the last sampled <|im_end|>
    # mask 1 exactly on the three assistant turns (content + <|im_end|>)
    sampled = [t for t, m in zip(ep.tokens, ep.mask) if m]
    turns = ["5", '<tool_call>\n{"name": "add", "arguments": {"a": 5, "b": 2}}\n</tool_call>', "7"]
    assert sampled == [i for t in turns for i in renderer.encode(t) + [tok.eos_token_id]]
    inserted = tok.decode([t for t, m in zip(ep.tokens, ep.mask) if not m])
    assert "No, higher." in inserted and "7.0" in inserted and "<|im_start|>assistant" in inserted
    assert "Guess a digit" not in inserted  # the prompt is not part of the episode's tokens


def test_template_that_rewrites_history_is_refused(tiny_model_and_tokenizer):
    _, tok = tiny_model_and_tokenizer
    tok = tok.__class__.from_pretrained(tok.name_or_path)
    # drops earlier assistant turns once a later user turn exists (as thinking-stripping templates do)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    renderer = ChatRenderer(tok)
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(UserError, match="renders earlier turns differently"):
        renderer.continuation_ids(history, [{"role": "user", "content": "more"}])


ENV_FORMS = {
    "never_done": (
        "class CustomEnv:\n"
        "    def setup(self, **row):\n        self.n = 0\n        self.word = row['word']\n"
        "    def step(self, action):\n        self.n += 1\n"
        "        return {'observation': f'{self.word} {self.n}', 'reward': 0.5, 'done': False,\n"
        "                'reward_info_dict': {'turn': float(self.n)}}\n"),
    "init_and_tuple": (
        "class GuessEnv:\n"
        "    def __init__(self, **row):\n        self.word = row['word']\n"
        "    def step(self, action):\n        return (f'{self.word}!', 1.0, True, {'seen': len(action)})\n"),
    "raises": (
        "class CustomEnv:\n    def setup(self, **row):\n        pass\n"
        "    def step(self, action):\n        raise RuntimeError('env exploded')\n"),
    "hangs": (
        "import time\nclass CustomEnv:\n    def setup(self, **row):\n        pass\n"
        "    def step(self, action):\n        time.sleep(60)\n"),
}


def run_env(tmp_path, tiny_model_and_tokenizer, form, *, max_turns=3, timeout_s=5.0):
    model, tok = tiny_model_and_tokenizer
    code = tmp_path / f"{form}.py"
    code.write_text(ENV_FORMS[form])
    renderer = ChatRenderer(tok)
    prompt = [{"role": "user", "content": "Say something."}]
    row = PromptRow(prompt, {"prompt": prompt, "word": "zebra"}, 1)
    episodes = [Episode(row=row, prompt_index=0, sample_index=g, prompt_ids=renderer.prompt_ids(prompt))
                for g in range(2)]
    settings = EpisodeSettings(sampling=SamplingParams(max_new_tokens=6), stop_ids={tok.eos_token_id},
                               pad_id=tok.pad_token_id, max_turns=max_turns, end_of_turn_id=tok.eos_token_id)
    with EnvSandbox(code, num_workers=1, timeout_s=timeout_s, work_dir=tmp_path / "sb") as env:
        run_episodes(model, renderer, episodes, settings, lambda ep, turn: 100 * ep.sample_index + turn,
                     group_size=2, env=env)
    return episodes, tok


def mask_runs(mask):
    return sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))


def test_never_done_env_is_capped_by_max_turns(tmp_path, tiny_model_and_tokenizer):
    episodes, tok = run_env(tmp_path, tiny_model_and_tokenizer, "never_done", max_turns=3)
    for ep in episodes:
        assert ep.turns == 3 and not ep.finished and ep.error is None
        assert ep.step_rewards == [0.5, 0.5, 0.5] and ep.reward == pytest.approx(1.5)
        assert ep.info["turn"] == 3.0
        assert mask_runs(ep.mask) == 3 and len(ep.mask) == len(ep.tokens)
        inserted = tok.decode([t for t, m in zip(ep.tokens, ep.mask) if not m])
        assert "zebra 1" in inserted and "zebra 2" in inserted
        assert [m["role"] for m in ep.messages][-5:] == ["assistant", "user", "assistant", "user", "assistant"]


def test_init_form_and_tuple_return(tmp_path, tiny_model_and_tokenizer):
    episodes, _ = run_env(tmp_path, tiny_model_and_tokenizer, "init_and_tuple")
    for ep in episodes:
        assert ep.turns == 1 and ep.finished and ep.reward == 1.0 and "seen" in ep.info


@pytest.mark.parametrize("form,needle", [("raises", "env exploded"), ("hangs", "time")])
def test_env_failures_end_the_episode_with_reward_zero(tmp_path, tiny_model_and_tokenizer, form, needle):
    episodes, _ = run_env(tmp_path, tiny_model_and_tokenizer, form, timeout_s=1.0)
    for ep in episodes:
        assert ep.error and needle in ep.error.lower() and ep.reward == 0.0 and not ep.finished and ep.turns == 1


def test_environment_run_end_to_end(tmp_path, tiny_model_dir):
    from runrl_engine import train

    data = ROOT / "configs" / "data" / "guess_number"
    result = train({"model": "builtin:tiny", "type": "environment", "prompt_file": str(data / "prompts.jsonl"),
                    "reward_file": str(data / "env.py"), "max_turns": 3, "completion_length": 6, "max_steps": 2,
                    "prompts_per_step": 2, "num_generations": 4, "eval_every": 0, "save_every": 0},
                   output_dir=tmp_path)
    last = result.history[-1]
    assert {"env_errors", "turns_per_episode", "reward_info/valid_guess"} <= set(last)
    assert 1 <= last["turns_per_episode"] <= 3
    records = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    multi = [r for r in records if r.get("turns", 1) > 1]
    assert multi and all(r["messages"][-1]["role"] == "assistant" for r in multi)
    assert all(r["reward"] == pytest.approx(sum(r["step_rewards"])) for r in multi)


# ---- run_episodes' bookkeeping with a scripted policy and environment (no model, no sandbox) ------------------

class ScriptedPolicy:
    """A backend that answers each call with the next scripted turns, one (text, finished, logprobs) per
    completion, and records what it was asked."""

    def __init__(self, renderer, turns):
        self.renderer, self.turns, self.calls = renderer, list(turns), []

    def generate(self, model, prompts, *, num_samples, seeds, params, stop_ids, pad_id):
        from types import SimpleNamespace as NS

        self.calls.append({"prompts": [list(p) for p in prompts], "num_samples": num_samples, "seeds": list(seeds)})
        out = []
        for _ in range(len(prompts) * num_samples):
            text, finished, logprobs = self.turns.pop(0)
            tokens = self.renderer.encode(text) + ([self.renderer.tokenizer.eos_token_id] if finished else [])
            out.append(NS(tokens=tokens, finished=finished,
                          logprobs=None if logprobs is None else [logprobs] * len(tokens)))
        return out


class ScriptedEnv:
    """Never done, 0.5 per step; `fail` names the episodes (by position) whose start fails."""

    def __init__(self, fail=()):
        self.fail, self.steps, self.closed = set(fail), [], None

    def create(self, fields):
        from types import SimpleNamespace as NS

        return [NS(env_id=10 + i, error="setup failed" if i in self.fail else None, observation=None)
                for i in range(len(fields))]

    def step(self, ids, texts):
        from types import SimpleNamespace as NS

        self.steps.append((list(ids), list(texts)))
        return [NS(error=None, reward=0.5, info={}, done=False, observation="again") for _ in ids]

    def close_envs(self, ids):
        self.closed = list(ids)


def _scripted_run(tok, turns, *, n, group_size=1, env=None, **settings_kw):
    renderer = ChatRenderer(tok)
    prompt = [{"role": "user", "content": "q"}]
    episodes = [Episode(row=PromptRow(prompt, {}, 1), prompt_index=g // group_size, sample_index=g % group_size,
                        prompt_ids=renderer.prompt_ids(prompt)) for g in range(n)]
    policy = ScriptedPolicy(renderer, turns)
    settings = EpisodeSettings(sampling=SamplingParams(max_new_tokens=8), stop_ids={tok.eos_token_id},
                               pad_id=tok.pad_token_id, end_of_turn_id=tok.eos_token_id, backend=policy,
                               **settings_kw)
    run_episodes(None, renderer, episodes, settings, lambda ep, turn: 100 * turn + 10 * ep.prompt_index
                 + ep.sample_index, group_size=group_size, env=env)
    return episodes, policy, renderer


def test_single_turn_episodes_end_finished_or_cut_short(tiny_model_and_tokenizer):
    _, tok = tiny_model_and_tokenizer
    turns = [("a", True, -0.5), ("bb", False, None), ("c", True, None), ("dd", False, -1.0)]
    episodes, policy, renderer = _scripted_run(tok, turns, n=4, group_size=2)
    # one call, one prompt per group of 2 (the shared prefill), one seed per completion
    assert [(len(c["prompts"]), c["num_samples"], c["seeds"]) for c in policy.calls] == [(2, 2, [0, 1, 10, 11])]
    assert [ep.finished for ep in episodes] == [True, False, True, False]
    assert [ep.final_text for ep in episodes] == ["a", "bb", "c", "dd"]
    for ep, (text, finished, logprobs) in zip(episodes, turns):
        ids = renderer.encode(text) + ([tok.eos_token_id] if finished else [])
        assert ep.tokens == ids and ep.mask == [1] * len(ids) and ep.turns == 1 and ep.last_turn_end == len(ids) - 1
        if logprobs is None:
            assert all(math.isnan(x) for x in ep.sampler_logprobs) and len(ep.sampler_logprobs) == len(ids)
        else:
            assert ep.sampler_logprobs == [logprobs] * len(ids)
        assert ep.messages[-1] == {"role": "assistant", "content": text} and ep.error is None


def test_an_episode_without_room_for_a_full_turn_stops_truncated(tiny_model_and_tokenizer):
    _, tok = tiny_model_and_tokenizer
    prompt_len = len(ChatRenderer(tok).prompt_ids([{"role": "user", "content": "q"}]))
    env = ScriptedEnv()
    # room for exactly one turn of max_new_tokens (8) after the prompt
    episodes, policy, _ = _scripted_run(tok, [("a", True, None)], n=1, env=env, max_turns=5,
                                        max_episode_tokens=prompt_len + 8)
    (ep,) = episodes
    assert len(policy.calls) == 1 and ep.turns == 1 and not ep.finished and ep.error is None
    assert ep.step_rewards == [0.5] and env.steps == [([10], ["a"])] and env.closed == [10]
    assert ep.messages[-1] == {"role": "user", "content": "again"}  # the observation went in before it stopped


def test_a_failed_environment_start_ends_only_its_episode(tiny_model_and_tokenizer):
    _, tok = tiny_model_and_tokenizer
    env = ScriptedEnv(fail={1})
    # the second turn of episode 0 is cut at max_new_tokens: closed with the end-of-turn token (mask 0) and judged
    turns = [("a", True, None), ("c", True, None), ("bb", False, None), ("d", True, None)]
    episodes, policy, renderer = _scripted_run(tok, turns, n=3, group_size=3, env=env, max_turns=2)
    assert episodes[1].error == "setup failed" and episodes[1].reward == 0.0 and episodes[1].turns == 0
    assert episodes[1].tokens == [] and not episodes[1].finished
    # not every episode is live, so no shared prefill: one prompt per completion, each with its own seed
    assert [(len(c["prompts"]), c["num_samples"], c["seeds"]) for c in policy.calls] == [(2, 1, [0, 2]),
                                                                                         (2, 1, [100, 102])]
    ep = episodes[0]
    assert ep.turns == 2 and ep.tokens[-1] == tok.eos_token_id and ep.mask[-1] == 0 and ep.sampler_logprobs[-1] == 0.0
    assert ep.step_rewards == [0.5, 0.5] and ep.reward == 1.0 and not ep.finished
    assert env.steps == [([10, 12], ["a", "c"]), ([10, 12], ["bb", "d"])] and env.closed == [10, 11, 12]
    # the last turn's observation is never inserted (nothing would read it)
    assert [m["role"] for m in ep.messages][1:] == ["assistant", "user", "assistant"]
