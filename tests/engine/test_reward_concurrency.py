"""Concurrent rewards (`reward_concurrency`, `reward_sync_threads`) and the `reward_secrets` channel, in real
sandbox workers (bubblewrap where it works here, else plain subprocesses).

Concurrency is asserted by overlap, not by wall time: every call records its (start, end) on the shared
CLOCK_MONOTONIC and the id of the worker it ran in; the test counts how many calls of one worker were in flight
at once. The contrasts (concurrency 1, sync code without threads) must show exactly 1, so the counting itself
is checked to be able to fail.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from runrl_engine.config import RunConfig
from runrl_engine.errors import ConfigError
from runrl_engine.sandbox import EnvSandbox, RewardSandbox

# Each call: (start, end, worker id) in its info; the reward is the item's position, to check the order.
ASYNC_SLEEP = """
import asyncio, time, uuid
WORKER = uuid.uuid4().hex
async def reward_fn(completion, **kw):
    start = time.monotonic()
    await asyncio.sleep(0.5)
    return float(completion), {"start": start, "end": time.monotonic(), "worker": WORKER}
"""
SYNC_SLEEP = ASYNC_SLEEP.replace("async def", "def").replace("await asyncio.sleep", "time.sleep")


def write(tmp_path: Path, source: str, name: str = "reward.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def max_in_flight_per_worker(results) -> dict[str, int]:
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        assert r.error is None, r.error
        by_worker.setdefault(r.info["worker"], []).append((r.info["start"], r.info["end"]))
    out = {}
    for worker, spans in by_worker.items():
        events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])  # an end sorts before a start
        level = peak = 0
        for _, step in events:
            level += step
            peak = max(peak, level)
        out[worker] = peak
    return out


def score_32(path: Path, **kw):
    with RewardSandbox(path, num_workers=2, timeout_s=20, **kw) as sb:
        results = sb.score([str(i) for i in range(32)], [{}] * 32)
        return results, sb.stats


def test_async_calls_overlap_up_to_reward_concurrency_in_each_worker(tmp_path):
    results, stats = score_32(write(tmp_path, ASYNC_SLEEP), concurrency=8)
    assert [r.reward for r in results] == [float(i) for i in range(32)]  # input order, whatever finished first
    peaks = max_in_flight_per_worker(results)
    assert len(peaks) == 2 and all(p == 8 for p in peaks.values()), peaks
    assert stats.errors == stats.timeouts == stats.restarts == 0


def test_concurrency_1_runs_one_call_at_a_time(tmp_path):
    results, _ = score_32(write(tmp_path, ASYNC_SLEEP.replace("0.5", "0.05")), concurrency=1)
    assert [r.reward for r in results] == [float(i) for i in range(32)]
    assert set(max_in_flight_per_worker(results).values()) == {1}


def test_sync_calls_overlap_only_with_reward_sync_threads(tmp_path):
    path = write(tmp_path, SYNC_SLEEP)
    results, _ = score_32(path, concurrency=8, sync_threads=True)
    assert [r.reward for r in results] == [float(i) for i in range(32)]
    peaks = max_in_flight_per_worker(results)
    assert len(peaks) == 2 and all(p == 8 for p in peaks.values()), peaks
    quick = write(tmp_path, SYNC_SLEEP.replace("0.5", "0.05"), "quick.py")
    results, _ = score_32(quick, concurrency=8)  # not opted in: plain def stays one at a time
    assert set(max_in_flight_per_worker(results).values()) == {1}


def test_a_late_async_call_times_out_alone_and_its_worker_lives_on(tmp_path):
    src = """
        import asyncio
        async def reward_fn(completion, **kw):
            await asyncio.sleep(60 if completion == "hang" else 0.2)
            return float(len(completion))
    """
    with RewardSandbox(write(tmp_path, src), num_workers=1, timeout_s=1.5, concurrency=8) as sb:
        items = ["a" * i for i in range(12)]
        items[3] = "hang"
        results = sb.score(items, [{}] * 12)
        assert results[3].reward == 0.0
        assert results[3].error.startswith("timed out after 1.5 s (the call was cancelled)")
        assert "await asyncio.sleep(60" in results[3].error  # where it was: the user's line
        assert [r.reward for i, r in enumerate(results) if i != 3] == [float(i) for i in range(12) if i != 3]
        assert sb.stats.timeouts == 1 and sb.stats.restarts == 0 and sb.stats.crashes == 0


def test_code_that_raises_cancelled_error_itself_scores_an_error_without_a_crash(tmp_path):
    src = """
        import asyncio
        async def reward_fn(completion, **kw):
            if completion == "c":
                raise asyncio.CancelledError()
            return 1.0
    """
    with RewardSandbox(write(tmp_path, src), num_workers=1, timeout_s=5, concurrency=8) as sb:
        results = sb.score(["a", "c", "b"], [{}] * 3)
        assert [(r.reward, r.error) for r in results] == [(1.0, None), (0.0, "reward_fn raised CancelledError"),
                                                          (1.0, None)]
        assert sb.stats.crashes == sb.stats.restarts == 0


def test_a_late_thread_times_out_and_its_worker_is_replaced(tmp_path):
    src = """
        import time
        def reward_fn(completion, **kw):
            time.sleep(60 if completion == "hang" else 0.2)
            return float(len(completion))
    """
    with RewardSandbox(write(tmp_path, src), num_workers=1, timeout_s=1.5, concurrency=4, sync_threads=True) as sb:
        items = ["a" * i for i in range(12)]
        items[2] = "hang"
        results = sb.score(items, [{}] * 12)
        assert results[2].error.startswith("timed out after 1.5 s (the thread cannot be stopped")
        assert "time.sleep(60" in results[2].error
        assert [r.reward for i, r in enumerate(results) if i != 2] == [float(i) for i in range(12) if i != 2]
        assert all(r.error is None for i, r in enumerate(results) if i != 2)
        assert sb.stats.timeouts == 1 and sb.stats.restarts == 1  # the stuck worker retired; the rest went on
        assert sb.score(["abc"], [{}])[0].reward == 3.0


def test_async_code_that_blocks_its_loop_is_still_killed_at_the_timeout(tmp_path):
    src = """
        import time
        async def reward_fn(completion, **kw):
            if completion == "block":
                time.sleep(60)  # a sync call inside async def: the worker's loop cannot time it out
            return 1.0
    """
    with RewardSandbox(write(tmp_path, src), num_workers=1, timeout_s=1, concurrency=8) as sb:
        results = sb.score(["x", "block", "y"], [{}] * 3)
        assert "timed out after 1 s (worker killed and replaced)" in results[1].error
        assert results[0].reward == results[2].reward == 1.0
        assert sb.stats.timeouts == 1


def test_one_event_loop_per_worker_for_rewards_and_environments(tmp_path):
    # Every call sees the same loop (the loops are kept alive, so their ids cannot be reused), so what user code
    # binds to it at its first call (an httpx.AsyncClient's connection pool) stays usable.
    reward = """
        import asyncio
        LOOPS = set()
        async def reward_fn(completion, **kw):
            LOOPS.add(asyncio.get_running_loop())
            return float(len(LOOPS))
    """
    for concurrency in (1, 8):
        with RewardSandbox(write(tmp_path, reward), num_workers=1, timeout_s=10, concurrency=concurrency) as sb:
            results = sb.score(["a", "b"], [{}, {}]) + sb.score(["c"], [{}])
            assert [(r.reward, r.error) for r in results] == [(1.0, None)] * 3
    env = """
        import asyncio
        class CustomEnv:
            loops = set()
            def setup(self, **kw):
                pass
            async def step(self, action):
                self.loops.add(asyncio.get_running_loop())
                return {"observation": "", "reward": float(len(self.loops)), "done": False}
    """
    with EnvSandbox(write(tmp_path, env, "env.py"), num_workers=1, timeout_s=10) as sb:
        ids = [s.env_id for s in sb.create([{}, {}])]
        for _ in range(3):
            steps = sb.step(ids, ["a", "b"])
            assert [s.error for s in steps] == [None, None] and [s.reward for s in steps] == [1.0, 1.0]


@pytest.mark.parametrize("isolation", ["auto", "subprocess"])
def test_reward_secrets_reach_the_code_only_through_its_environment(tmp_path, isolation):
    src = """
        import os
        def reward_fn(completion, **kw):
            with open("/proc/self/environ", "rb") as fh:
                initial = fh.read()
            return 1.0, {"key": os.environ.get("JUDGE_API_KEY", ""), "in_initial_env": float(b"JUDGE" in initial),
                         "argv": " ".join(__import__("sys").argv)}
    """
    secret = "sk-judge-0123456789abcdef"
    with RewardSandbox(write(tmp_path, src), num_workers=1, timeout_s=10, isolation=isolation,
                       secret_env={"JUDGE_API_KEY": secret}) as sb:
        result = sb.score(["x"], [{}])[0]
    assert result.error is None
    assert result.info["key"] == "[REDACTED]"  # it was there (the info text is redacted on its way out)
    assert result.info["in_initial_env"] == 0.0 and secret not in result.info["argv"]
    with RewardSandbox(write(tmp_path, src, "plain.py"), num_workers=1, timeout_s=10, isolation=isolation) as sb:
        assert sb.score(["x"], [{}])[0].info["key"] == ""  # not set: nothing leaks from the trainer


def test_the_judge_example_without_its_secret_says_how_to_pass_it(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "llm_judge_reward.py"
    with RewardSandbox(example, num_workers=1, timeout_s=10, concurrency=8) as sb:
        result = sb.score(["4"], [{"prompt": [{"role": "user", "content": "2+2?"}]}])[0]
    assert result.reward == 0.0 and "JUDGE_API_KEY is not set: pass it in the run's reward_secrets" in result.error


def test_reward_secrets_config_is_checked_and_redacted(tmp_path):
    base = {"model": "builtin:tiny", "prompt_file": "p.jsonl", "reward_file": "r.py"}
    cfg = RunConfig.from_dict({**base, "reward_secrets": {"JUDGE_API_KEY": "sk-abcdef123456"}})
    assert cfg.to_dict(redact=True)["reward_secrets"] == {"JUDGE_API_KEY": "***"}
    assert "sk-abcdef123456" not in cfg.to_yaml() and "sk-abcdef123456" in cfg.secrets()
    for bad, needle in (({"PATH": "abcdef"}, "'PATH' cannot be a secret's name"),
                        ({"HTTPS_PROXY": "abcdef"}, "cannot be a secret's name"),
                        ({"RUNRL_X": "abcdef"}, "cannot be a secret's name"),
                        ({"1X": "abcdef"}, "cannot be a secret's name"),
                        ({"K": "abc"}, "must be 4 to 8192 characters"),
                        ({"K": 5}, "the entry 'K' is not"),
                        ("sk-abcdef", "expected a mapping of str to str, got str")):
        with pytest.raises(ConfigError) as err:
            RunConfig.from_dict({**base, "reward_secrets": bad})
        assert needle in str(err.value) and "reward_secrets" in str(err.value), err.value
        assert "abcdef" not in str(err.value)  # a secret's value is never echoed
    for value in (0, 257):
        with pytest.raises(ConfigError, match="reward_concurrency"):
            RunConfig.from_dict({**base, "reward_concurrency": value})
