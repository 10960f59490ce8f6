"""Rollout episodes: single-turn completions, and multi-turn conversations with an environment and tools.

Token-in/token-out: an episode is the prompt's token ids followed by everything generated or inserted after
it. Sampled tokens (assistant turns, their end-of-turn token included) have mask 1; observation and tool
turns are inserted as the chat template renders them and have mask 0. Inserted text is the *difference*
between the template's render of the conversation before and after the new messages, so the final sequence
is exactly the template's render of the whole conversation (for templates whose renders of a conversation
are prefixes of the renders of its continuations — checked, with a clear error otherwise). Assistant text is
never re-tokenised.

A turn whose text holds `<tool_call>` blocks is answered by the tools (one MCP session per episode) and the
model continues; a turn without tool calls goes to the environment's `step` (type `environment`) or ends the
episode (type `reward_function`, whose reward then sees that final text). Episodes end at `done`, after
`max_turns` assistant turns, or when the next turn could exceed `max_episode_tokens` (truncated). A turn cut
at `completion_length` still goes to the environment, closed with the end-of-turn token as context.

Not covered: KV-cache reuse across turns (each turn re-reads the episode's context), streaming tool output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from runrl_engine.data import PromptRow
from runrl_engine.errors import UserError
from runrl_engine.rollout.backends import HFBackend
from runrl_engine.rollout.types import Completion, RolloutBackend, SamplingParams
from runrl_engine.sandbox.pool import MAX_ABS_REWARD


@dataclass
class Episode:
    """One rollout: a prompt and what followed it. The fields describe the episode (what was sampled, inserted and
    rewarded, how it ended); what `run_episodes` needs only while it runs (its environment, its tool session,
    whether it takes another turn) is kept apart, in `_Running`."""

    row: PromptRow
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)  # everything after the prompt
    mask: list[int] = field(default_factory=list)  # 1 = sampled by the policy (trained on), 0 = inserted
    # the rollout engine's log-prob of each of `tokens` where it sampled them (NaN: not reported), 0.0 where inserted
    sampler_logprobs: list[float] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)  # the conversation, prompt included
    final_text: str = ""  # the last assistant turn's text
    finished: bool = False  # ended by the model/environment (False: cut by a length or turn limit, or an error)
    reward: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    dropped: str | None = None  # why the update did not use it (dynamic sampling: "zero_variance", "surplus")
    step_rewards: list[float] = field(default_factory=list)
    step_reward_ends: list[int] = field(default_factory=list)  # index in `tokens` of the judged turn's last sampled token
    last_turn_end: int = -1  # index in `tokens` of the latest assistant turn's last sampled token
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0

    @property
    def multi_turn(self) -> bool:
        return len(self.messages) > len(self.row.messages) + 1


class ChatRenderer:
    """Prompt ids and inserted-turn ids from the tokenizer's chat template (optionally with tool schemas)."""

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]] | None = None):
        self.tokenizer = tokenizer
        self.tools = tools or None

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        kwargs = {"tools": self.tools} if self.tools else {}
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt=True))

    def continuation_ids(self, history: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[int]:
        """Ids of the text the template puts after `history` to add `new` and open the next assistant turn.

        When `history` ends with an assistant turn, the episode's tokens stop at the sampled end-of-turn token;
        whatever the template writes after that token (ChatML's newline) is part of the insertion."""
        before = self.render(history, add_generation_prompt=False)
        after = self.render(history + new, add_generation_prompt=True)
        tail = ""
        eot = self.tokenizer.eos_token
        if history and history[-1]["role"] == "assistant" and eot and eot in before:
            tail = before[before.rindex(eot) + len(eot):]
        if not after.startswith(before):
            raise UserError("the model's chat template renders earlier turns differently once a new turn is added, "
                            "so multi-turn token sequences would not match the template", where="model",
                            fix="use a model whose chat template keeps earlier turns unchanged (e.g. Qwen2.5 "
                                "instruct, or Qwen3 with thinking off), or single-turn `type: reward_function`")
        return self.encode(tail + after[len(before):])


@dataclass
class EpisodeSettings:
    sampling: SamplingParams
    stop_ids: set[int]
    pad_id: int
    max_turns: int = 1
    max_episode_tokens: int = 1 << 30
    max_tool_calls: int = 8
    tool_timeout_s: float = 30.0
    end_of_turn_id: int = 0  # appended (mask 0) to a turn cut at max_new_tokens when the episode goes on
    backend: RolloutBackend = field(default_factory=HFBackend)  # what samples each turn (rollout/backends.py)


@dataclass
class _Running:
    """One episode's run state while `run_episodes` runs it (its results are on the `Episode`)."""

    ep: Episode
    env_id: int | None = None  # its environment in the sandbox (type environment)
    session: Any = None  # its ToolSession (runs with tools)
    stopped: bool = False  # takes no further turn: it finished, errored, or ran out of room


def run_episodes(model: torch.nn.Module, renderer: ChatRenderer, episodes: list[Episode], settings: EpisodeSettings,
                 seed_of: Callable[[Episode, int], int], *, group_size: int = 1, env: Any = None, tools: Any = None,
                 tool_urls: Sequence[str] = ()) -> list[Episode]:
    """Run every episode to its end. `episodes` arrive with prompt ids set, `group_size` consecutive per prompt
    (their first turn then shares one prefill).

    `env` is an `EnvSandbox` (type environment) or None; `tools` a `ToolRuntime` when `tool_urls` are set.
    `seed_of(episode, turn)` seeds each sampled turn. Each turn: the episodes with room for it sample it together,
    then each sampled turn goes to the tools, to the environment, or ends its episode.
    """
    runs = _start(renderer, episodes, settings, env=env, tools=tools, tool_urls=tool_urls)
    try:
        for turn in range(settings.max_turns):
            live = _with_room(runs, settings)
            if not live:
                break
            # only a first turn of every episode, nothing inserted yet, has G identical contexts per prompt
            shared = turn == 0 and len(live) == len(runs) and not any(run.ep.tokens for run in live)
            completions = _sample_turn(model, live, settings, seed_of, turn, group=group_size if shared else 1)
            last_turn = turn == settings.max_turns - 1  # nothing inserted after it would ever be read
            to_tools, to_env = _route_turns(renderer.tokenizer, live, completions, settings, env=env,
                                            answer_tools=bool(tool_urls) and not last_turn)
            _answer_tools(renderer, tools, to_tools, settings)
            if to_env:
                _step_env(renderer, env, to_env, insert_observation=not last_turn)
    finally:
        _close(runs, env)
    return episodes


def _start(renderer: ChatRenderer, episodes: list[Episode], settings: EpisodeSettings, *, env: Any, tools: Any,
           tool_urls: Sequence[str]) -> list[_Running]:
    """Each episode's conversation begun from its prompt row, its environment created (a failed start ends the
    episode; a first observation is inserted) and its tool session opened."""
    runs = [_Running(ep) for ep in episodes]
    for ep in episodes:
        ep.messages = [dict(m) for m in ep.row.messages]
    if env is not None:
        starts = env.create([ep.row.fields for ep in episodes])
        for run, start in zip(runs, starts):
            run.env_id = start.env_id
            if start.error:
                _end_with_error(run, start.error)
            elif start.observation:  # setup() returned the first observation (the MCP-tutorial form)
                _insert(renderer, run.ep, [{"role": "user", "content": start.observation}])
    if tool_urls:
        sessions = tools.open_sessions(len(episodes), list(tool_urls), call_timeout_s=settings.tool_timeout_s,
                                       max_calls=settings.max_tool_calls)
        for run, session in zip(runs, sessions):
            run.session = session
    return runs


def _with_room(runs: list[_Running], settings: EpisodeSettings) -> list[_Running]:
    """The episodes that take another turn: still running, with room for a full one. The rest stop (truncated)."""
    live = []
    for run in runs:
        if run.stopped:
            continue
        length = len(run.ep.prompt_ids) + len(run.ep.tokens)
        if length + settings.sampling.max_new_tokens > settings.max_episode_tokens:
            run.stopped = True
        else:
            live.append(run)
    return live


def _sample_turn(model: torch.nn.Module, live: list[_Running], settings: EpisodeSettings,
                 seed_of: Callable[[Episode, int], int], turn: int, *, group: int) -> list[Completion]:
    """One completion per live episode; `group` consecutive episodes share a context, sent once."""
    return settings.backend.generate(
        model, [run.ep.prompt_ids + run.ep.tokens for run in live[::group]], num_samples=group,
        seeds=[seed_of(run.ep, turn) for run in live], params=settings.sampling, stop_ids=settings.stop_ids,
        pad_id=settings.pad_id)


def _route_turns(tok: Any, live: list[_Running], completions: list[Completion], settings: EpisodeSettings, *,
                 env: Any, answer_tools: bool) -> tuple[list[tuple[_Running, Any]], list[_Running]]:
    """Each sampled turn appended to its episode, then sent on: (episodes with tool calls to answer, their calls),
    and the episodes whose turn the environment judges. The others end here."""
    to_tools, to_env = [], []
    for run, comp in zip(live, completions):
        ep = run.ep
        _append_sampled(tok, ep, comp)
        calls = _tool_calls(ep) if answer_tools and comp.finished else None
        if not comp.finished:
            if env is None:  # hit completion_length: this was the final answer, cut short
                run.stopped = True
                continue
            # the environment still judges the cut-short turn; close it with the end-of-turn token the
            # template expects, as context (mask 0: the policy did not sample it)
            ep.tokens.append(settings.end_of_turn_id)
            ep.mask.append(0)
            ep.sampler_logprobs.append(0.0)
        if calls:
            to_tools.append((run, calls))
        elif env is not None:
            to_env.append(run)
        else:
            run.stopped = ep.finished = True
    return to_tools, to_env


def _append_sampled(tok: Any, ep: Episode, comp: Completion) -> None:
    """A sampled turn's tokens (mask 1), its log-probs, and its text as the conversation's next assistant turn."""
    ep.tokens += comp.tokens
    ep.mask += [1] * len(comp.tokens)
    # a backend's log-probs of what it sampled (one that reports none, e.g. a registered backend returning its
    # own completion objects: NaN, no correction)
    logprobs = getattr(comp, "logprobs", None)
    ep.sampler_logprobs += (logprobs if logprobs is not None and len(logprobs) == len(comp.tokens)
                            else [math.nan] * len(comp.tokens))
    ep.last_turn_end = len(ep.tokens) - 1
    ep.turns += 1
    ep.final_text = _turn_text(tok, comp.tokens, comp.finished)
    ep.messages.append({"role": "assistant", "content": ep.final_text})


def _close(runs: list[_Running], env: Any) -> None:
    """Every environment and tool session of the batch closed, however the run ended."""
    if env is not None:
        env.close_envs([run.env_id for run in runs if run.env_id is not None])
    for run in runs:
        if run.session is not None:
            run.session.close()
            run.session = None


def _turn_text(tok: Any, tokens: list[int], finished: bool) -> str:
    return tok.decode(tokens[:-1] if finished else tokens, skip_special_tokens=True)


def _insert(renderer: ChatRenderer, ep: Episode, new: list[dict[str, Any]]) -> None:
    ids = renderer.continuation_ids(ep.messages, new)
    ep.messages += new
    ep.tokens += ids
    ep.mask += [0] * len(ids)
    ep.sampler_logprobs += [0.0] * len(ids)


def _end_with_error(run: _Running, error: str) -> None:
    run.ep.error, run.ep.reward, run.stopped = error, 0.0, True


def _tool_calls(ep: Episode) -> Any:
    from runrl_engine.tools.parsing import parse_tool_calls

    parsed = parse_tool_calls(ep.final_text)
    return parsed if (parsed.calls or parsed.errors) else None


def _answer_tools(renderer: ChatRenderer, tools: Any, pending: list[tuple[_Running, Any]],
                  settings: EpisodeSettings) -> None:
    """Run every pending call of every episode concurrently, then insert the results as tool turns."""
    if not pending:
        return
    from runrl_engine.tools.parsing import format_parse_error, tool_message

    batch = [(run.session, call.name, call.arguments) for run, parsed in pending for call in parsed.calls]
    results = iter(tools.call_many(batch) if batch else [])
    for run, parsed in pending:
        ep = run.ep
        messages = []
        for call in parsed.calls:
            result = next(results)
            ep.tool_calls += 1
            ep.tool_errors += int(result.is_error)
            messages.append(tool_message(result.text, name=call.name))
        for err in parsed.errors:
            ep.tool_calls += 1
            ep.tool_errors += 1
            messages.append(tool_message(format_parse_error(err)))
        _insert(renderer, ep, messages)


def _step_env(renderer: ChatRenderer, env: Any, runs: list[_Running], *, insert_observation: bool) -> None:
    steps = env.step([run.env_id for run in runs], [run.ep.final_text for run in runs])
    for run, step in zip(runs, steps):
        ep = run.ep
        if step.error:
            _end_with_error(run, step.error)
            continue
        total = sum(ep.step_rewards) + step.reward
        if abs(total) > MAX_ABS_REWARD:  # each step reward is in range; their sum must be too
            _end_with_error(run, f"the environment's step rewards sum to {total:g}, beyond ±{MAX_ABS_REWARD:g}")
            continue
        ep.step_rewards.append(step.reward)
        ep.step_reward_ends.append(ep.last_turn_end)  # the turn it judged (tool-answered turns are not judged)
        ep.reward = total
        ep.info.update(step.info)
        if step.done:
            run.stopped = ep.finished = True
        elif insert_observation:
            _insert(renderer, ep, [{"role": "user", "content": step.observation}])
