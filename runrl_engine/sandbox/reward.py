"""Scoring completions with a user's reward function in sandbox workers.

`RewardSandbox.score(completions, rows)` splits the batch into chunks, hands them to idle workers and collects
one result per item. Each item has its own `timeout_s` (the batch `reward_func` form: each call). When a worker
times out or dies, the item it was running scores 0 with the reason, and the rest of its chunk is retried on
the other workers and on its replacement; a failing batch call is retried item by item, so only the offending
items score 0.

Concurrency (`concurrency`, RunConfig `reward_concurrency`): an `async def reward_fn` has up to that many calls in
flight in each worker, on the worker's one event loop; a sync `reward_fn` too, in as many threads, when
`sync_threads` (`reward_sync_threads`) is set. The worker then times each call from its own start and answers a
late one "timed out" itself (a coroutine is cancelled; a thread cannot be, so that worker retires after the calls
it has running and is replaced); results still arrive in item order, and the parent's kill stays as a backstop
(`call_timeout_s`): the unanswered items of a concurrent worker that is killed or dies are retried one by one, as
a failed batch call's are, so only the culprit scores 0. The batch `reward_func` form and environments run one
call at a time per worker.

Not covered: environments (`env.py`), the static checks (`static.py`), installing packages (`requirements.py`).
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from runrl_engine.sandbox.pool import MAX_ABS_REWARD, WorkerPool, _Worker, usable_reward


@dataclass(frozen=True)
class RewardResult:
    """One item's reward. On any failure: reward 0.0 and `error` (short reason + traceback, secrets redacted)."""

    reward: float
    info: dict[str, float | str] = field(default_factory=dict)
    error: str | None = None


@dataclass
class _Chunk:
    idxs: list[int]
    batch: bool  # one reward_func call for the whole chunk (batch contract) rather than one call per item


class RewardSandbox(WorkerPool):
    """Runs `reward_fn(completion, **row)` (or the older forms) from `code_path` in `num_workers` processes.

    `memory_mb` caps each worker's data segment (RLIMIT_DATA), `timeout_s` each call; `allow_network=False`
    (the default) cuts the network where bubblewrap is usable; with `allow_network=True`, `egress` (a
    `netpolicy.DestinationPolicy`) filters it: user code then reaches only what the policy allows, through the
    egress proxy (bubblewrap only; `EgressUnavailable` otherwise), and None shares the host's network.
    `secrets` are redacted from error texts, as are this process's secret-looking environment values.
    `isolation`: "auto" | "bwrap" | "subprocess". Use as a context manager or call `close()`.
    """

    kind = "function"

    def _init_state(self) -> None:
        # Per-call state of score(); empty between calls.
        self._results: list[RewardResult | None] = []
        self._encoded: list[str] = []
        self._queue: deque[_Chunk] = deque()
        self._remaining = 0

    def score(self, completions: list[str], rows: list[dict]) -> list[RewardResult]:
        """Rewards in input order; never raises for user-code failures (those become errors on items)."""
        if len(completions) != len(rows):
            raise ValueError(f"{len(completions)} completions but {len(rows)} rows")
        if self._closed:
            raise RuntimeError("the sandbox is closed")
        n = len(completions)
        if n == 0:
            return []
        self._results = [None] * n
        self._encoded = [json.dumps({"idx": i, "completion": str(c), "row": row}, separators=(",", ":"),
                                    default=str) for i, (c, row) in enumerate(zip(completions, rows))]
        self._ensure_workers()
        batch = self.contract == "batch"
        # a concurrent worker gets at least as many items as it may run at once
        per_chunk = math.ceil(n / self.num_workers) if batch else \
            max(self.concurrency, math.ceil(n / (self.num_workers * 4)))
        self._queue = deque(_Chunk(list(range(i, min(n, i + per_chunk))), batch) for i in range(0, n, per_chunk))
        self._remaining = n
        while self._remaining:
            for w in self._idle_workers():
                if not self._queue:
                    break
                self._dispatch(w, self._queue.popleft())
            if not self._live_workers():
                self._fail_queue()
                break
            self._pump()
        results = [r if r is not None else RewardResult(0.0, {}, "not scored") for r in self._results]
        self.stats.items += n
        self.stats.errors += sum(r.error is not None for r in results)
        self._results, self._encoded = [], []
        return results

    def _dispatch(self, w: _Worker, chunk: _Chunk) -> None:
        items = ",".join(self._encoded[i] for i in chunk.idxs)
        line = f'{{"op":"score","batch":{"true" if chunk.batch else "false"},"items":[{items}]}}\n'
        w.state, w.outstanding, w.batch = "busy", list(chunk.idxs), chunk.batch
        w.deadline = time.monotonic() + self.call_timeout_s
        w.err_mark = w.err_dropped + len(w.err)
        self._send(w, line.encode())

    def _settle(self, idx: int, result: RewardResult) -> None:
        if self._results[idx] is None:
            self._results[idx] = result
            self._remaining -= 1

    def _on_message(self, w: _Worker, msg: dict[str, Any]) -> bool:
        if msg.get("op") != "result" or msg.get("idx") not in w.outstanding:
            return False
        idx = msg["idx"]
        w.outstanding.remove(idx)
        reward = msg.get("reward")
        info = msg.get("info")
        ok = usable_reward(reward) and isinstance(info, dict)
        if ok:
            error = self._clean_error(msg.get("error"))
        elif isinstance(reward, (int, float)) and not isinstance(reward, bool):
            error = f"the reward {reward:g} is not a finite number within ±{MAX_ABS_REWARD:g}"
        else:
            error = "the worker sent a malformed result"
        self._settle(idx, RewardResult(float(reward) if ok and error is None else 0.0,
                                       self._scrub_info(info) if ok and error is None else {}, error))
        if msg.get("timeout") is True:  # a concurrent worker timed this call out itself (and lives on)
            self.stats.timeouts += 1
        now = time.monotonic()
        w.err_mark = w.err_dropped + len(w.err)
        if w.outstanding:
            if not w.batch:
                w.deadline = now + self.call_timeout_s  # each item gets the full timeout from the previous answer
        else:
            w.state, w.deadline = "idle", math.inf
        return True

    def _on_lost(self, w: _Worker, kind: str, description: str) -> None:
        pending = [i for i in w.outstanding if self._results[i] is None]
        if not pending:
            return
        if kind == "retired":  # a planned restart (CPU budget): nothing to blame
            self._queue.appendleft(_Chunk(pending, w.batch))
            return
        if (w.batch or self.concurrency > 1) and len(pending) > 1:
            # A batch call failed as a whole, or a worker running several calls at once died or stopped answering
            # (code that blocks its event loop): retry item by item so only the culprit scores 0.
            self._queue.extendleft(_Chunk([i], False) for i in reversed(pending))
            return
        culprit, rest = pending[0], pending[1:]
        if kind == "timeout":
            self.stats.timeouts += 1
        self._settle(culprit, RewardResult(0.0, {}, description))
        if rest:
            self._queue.appendleft(_Chunk(rest, False))

    def _fail_queue(self) -> None:
        reason = self._load_error or "no sandbox worker is running"
        for i, result in enumerate(self._results):
            if result is None:
                self._settle(i, RewardResult(0.0, {}, f"the reward worker could not be restarted: {reason}"))
        self._queue.clear()
