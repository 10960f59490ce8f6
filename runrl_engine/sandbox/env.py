"""Multi-turn environments (`CustomEnv`) living in sandbox workers, one instance per rollout.

`EnvSandbox.create(rows)` makes one environment per row (repeat a row G times for G rollouts) with
`setup(**row)`, or the older `__init__(**row)`; `step(env_ids, actions)` calls `step(action)` on each and
accepts the documented dict `{observation, reward, done, reward_info_dict?}` or a 4-tuple
`(observation, reward, done, info)`. An exception, a timeout or a malformed return ends that episode:
reward 0, `done=True`, `error` set. Requests to different workers run in parallel; each worker runs its own
environments one call at a time (`reward_concurrency` does not apply: replies are matched to requests by order,
and the replay below relies on each environment's calls running in sequence). An `async def step` is awaited on
the worker's one event loop, kept for the worker's life, so a client the environment keeps stays usable.

When a worker dies or times out, the call that was running fails; every other environment that lived in it
is rebuilt on the replacement by replaying its row and past actions. Replay assumes the environment is
deterministic given its row and actions; one that is not (randomness, LLM judges) continues from a replayed
state that may differ from the lost one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from runrl_engine.sandbox.pool import MAX_ABS_REWARD, WorkerPool, _Worker, usable_reward


@dataclass(frozen=True)
class EnvStart:
    env_id: int
    observation: str | None  # the first observation, when setup() returns a string (MCP-tutorial form)
    error: str | None = None


@dataclass(frozen=True)
class EnvStep:
    observation: str
    reward: float
    done: bool
    info: dict[str, float | str] = field(default_factory=dict)
    error: str | None = None


@dataclass
class _Env:
    env_id: int
    row: dict
    worker: _Worker | None
    actions: list[str] = field(default_factory=list)
    failed: str | None = None


@dataclass
class _Op:
    kind: str  # create | step | close | replay_create | replay_step
    env_id: int
    action: str = ""
    result: Any = None
    done: bool = False


class EnvSandbox(WorkerPool):
    """Environments from `code_path` in `num_workers` processes; same options as `RewardSandbox`."""

    kind = "environment"

    def _init_state(self) -> None:
        self._envs: dict[int, _Env] = {}
        self._next_id = 0
        self._waiting = 0  # ops sent and not yet answered
        self._inflight: list[_Op] = []  # every op of the current call, to settle them if all workers are gone

    # ---- public ------------------------------------------------------------------------------------------

    def create(self, rows: list[dict]) -> list[EnvStart]:
        """One environment per row, spread over the workers."""
        self._ensure_workers()
        ops = []
        for row in rows:
            env = _Env(self._next_id, dict(row), self._least_loaded())
            self._next_id += 1
            self._envs[env.env_id] = env
            ops.append(self._submit(env, _Op("create", env.env_id)))
        self._drain()
        starts = []
        for op in ops:
            error, observation = op.result
            if error:
                self._envs[op.env_id].failed = error
            starts.append(EnvStart(op.env_id, observation, error))
        return starts

    def step(self, env_ids: list[int], actions: list[str]) -> list[EnvStep]:
        """`step(action)` on each environment; results in input order."""
        if len(env_ids) != len(actions):
            raise ValueError(f"{len(env_ids)} environments but {len(actions)} actions")
        self._ensure_workers()
        ops: list[_Op | EnvStep] = []
        for env_id, action in zip(env_ids, actions):
            env = self._envs.get(env_id)
            if env is None or env.failed:
                reason = env.failed if env else f"environment {env_id} does not exist (closed?)"
                ops.append(EnvStep("", 0.0, True, {}, f"episode already ended: {reason}"))
                continue
            ops.append(self._submit(env, _Op("step", env_id, str(action))))
        self._drain()
        steps = [op if isinstance(op, EnvStep) else op.result for op in ops]
        self.stats.items += len(steps)
        self.stats.errors += sum(s.error is not None for s in steps)
        return steps

    def close_envs(self, env_ids: list[int]) -> None:
        """Call each environment's `close()` if it has one, and forget it."""
        for env_id in env_ids:
            env = self._envs.get(env_id)
            if env is not None and not env.failed and env.worker is not None and env.worker.state != "dead":
                self._submit(env, _Op("close", env_id))
        self._drain()
        for env_id in env_ids:
            self._envs.pop(env_id, None)

    # ---- scheduling --------------------------------------------------------------------------------------

    def _least_loaded(self) -> _Worker | None:
        live = self._live_workers()
        if not live:
            return None
        counts = {id(w): 0 for w in live}
        for env in self._envs.values():
            if env.worker is not None and id(env.worker) in counts and not env.failed:
                counts[id(env.worker)] += 1
        return min(live, key=lambda w: counts[id(w)])

    def _submit(self, env: _Env, op: _Op) -> _Op:
        w = env.worker
        if w is None or w.state == "dead":
            self._finish(op, f"no sandbox worker is running: {self._load_error or 'all workers failed'}")
            return op
        msg: dict[str, Any] = {"op": "env_create" if op.kind.endswith("create") else f"env_{op.kind.split('_')[-1]}",
                               "idx": env.env_id}
        if op.kind.endswith("create"):
            msg["row"] = env.row
        elif op.kind.endswith("step"):
            msg["action"] = op.action
        if not w.outstanding and w.state == "idle":
            w.state, w.deadline = "busy", time.monotonic() + self.timeout_s
            w.err_mark = w.err_dropped + len(w.err)
        w.outstanding.append(op)
        self._waiting += 1
        self._inflight.append(op)
        self._send(w, msg)
        return op

    def _drain(self) -> None:
        while self._waiting:
            if not self._live_workers():
                for op in self._inflight:
                    self._finish(op, f"no sandbox worker is running: {self._load_error or 'all workers failed'}")
                self._waiting = 0
                break
            self._pump()
        self._inflight = []

    def _finish(self, op: _Op, error: str | None, reply: dict[str, Any] | None = None) -> None:
        """Record an op's outcome; an error ends the environment's episode."""
        if op.done:
            return
        op.done = True
        env = self._envs.get(op.env_id)
        reply = reply or {}
        if error and env is not None and not env.failed and op.kind != "close":
            env.failed = error if not op.kind.startswith("replay") else \
                f"environment lost with its worker and could not be rebuilt: {error}"
        if op.kind == "create":
            op.result = (error, reply.get("observation"))
        elif op.kind == "step":
            if error:
                op.result = EnvStep("", 0.0, True, {}, env.failed if env is not None and env.failed else error)
            else:
                op.result = EnvStep(reply.get("observation", ""), float(reply.get("reward", 0.0)),
                                    bool(reply.get("done")), reply.get("info") or {}, None)
        if op.kind.endswith("step") and not error and env is not None:
            env.actions.append(op.action)  # the history a replacement worker replays

    def _on_message(self, w: _Worker, msg: dict[str, Any]) -> bool:
        if msg.get("op") != "env_result" or not w.outstanding or w.outstanding[0].env_id != msg.get("idx"):
            return False
        op = w.outstanding.pop(0)
        self._waiting -= 1
        reward = msg.get("reward", 0.0)
        if op.kind.endswith("step") and not msg.get("error") and not usable_reward(reward):
            numeric = isinstance(reward, (int, float)) and not isinstance(reward, bool)
            msg = {"error": f"the step reward {reward:g} is not a finite number within ±{MAX_ABS_REWARD:g}" if numeric
                   else "the worker sent a malformed step result"}
        if isinstance(msg.get("info"), dict):
            msg = {**msg, "info": self._scrub_info(msg["info"])}
        self._finish(op, self._clean_error(msg.get("error")), msg)
        w.err_mark = w.err_dropped + len(w.err)
        if w.outstanding:
            w.deadline = time.monotonic() + self.timeout_s
        else:
            w.state, w.deadline = "idle", math.inf
        return True

    def _on_lost(self, w: _Worker, kind: str, description: str) -> None:
        rest: list[_Op] = list(w.outstanding)
        self._waiting -= len(rest)
        if kind != "retired":  # a planned restart (CPU budget) blames nobody; otherwise the running call failed
            culprit = rest.pop(0)
            if kind == "timeout":
                self.stats.timeouts += 1
            self._finish(culprit, description)
            if culprit.kind == "close":
                self._envs.pop(culprit.env_id, None)
        for op in rest:
            env = self._envs.get(op.env_id)
            if env is None or env.failed:
                self._finish(op, env.failed if env is not None and env.failed else description)
        # Every other environment that lived in `w` moves to a live worker: replay its history, then its
        # pending calls, in order.
        for env in [e for e in self._envs.values() if e.worker is w and not e.failed]:
            env.worker = self._least_loaded()
            pending = [op for op in rest if op.env_id == env.env_id and not op.done]
            for op in pending:
                op.done = op.done or op.kind.startswith("replay")  # an interrupted replay is redone below
            history = env.actions + [op.action for op in pending if op.kind == "replay_step"]
            pending = [op for op in pending if not op.kind.startswith("replay")]
            env.actions = []
            if not any(op.kind == "create" for op in pending):
                self._submit(env, _Op("replay_create", env.env_id))
                for action in history:
                    self._submit(env, _Op("replay_step", env.env_id, action))
            for op in pending:
                self._submit(env, op)
