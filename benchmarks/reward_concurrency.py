"""32 reward calls that each wait 0.5 s (an LLM judge's latency, `await asyncio.sleep(0.5)`), scored by the reward
sandbox with 2 workers: wall time and the most calls one worker had in flight, per `reward_concurrency`.

    python benchmarks/reward_concurrency.py                  # concurrency 1 and 8, async and sync-with-threads
    PYTHONPATH=/tmp/old python benchmarks/reward_concurrency.py --old   # a checkout without reward_concurrency

The last line is one JSON object: {"<form>@<concurrency>": {"wall_s", "max_in_flight"}}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from runrl_engine.sandbox import RewardSandbox

SOURCE = """
import asyncio, time, uuid
WORKER = uuid.uuid4().hex
async def reward_fn(completion, **kw):
    start = time.monotonic()
    await asyncio.sleep(0.5)
    return 1.0, {"start": start, "end": time.monotonic(), "worker": WORKER}
"""


def peak(results) -> int:
    best = 0
    for worker in {r.info["worker"] for r in results}:
        spans = [(r.info["start"], r.info["end"]) for r in results if r.info["worker"] == worker]
        events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
        level = 0
        for _, step in events:
            level += step
            best = max(best, level)
    return best


def run(path: Path, **kw) -> dict:
    with RewardSandbox(path, num_workers=2, timeout_s=30, **kw) as sb:
        sb.score(["warm-up"] * 2, [{}] * 2)
        start = time.monotonic()
        results = sb.score(["x"] * 32, [{}] * 32)
        wall = time.monotonic() - start
    assert all(r.error is None for r in results), [r.error for r in results if r.error][:1]
    return {"wall_s": round(wall, 3), "max_in_flight": peak(results)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", action="store_true", help="the sandbox before reward_concurrency (no options)")
    args = parser.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        async_path = Path(tmp) / "judge.py"
        async_path.write_text(SOURCE)
        sync_path = Path(tmp) / "judge_sync.py"
        sync_path.write_text(SOURCE.replace("async def", "def").replace("await asyncio.sleep", "time.sleep"))
        if args.old:
            out["async@old"] = run(async_path)
        else:
            for concurrency in (1, 8):
                out[f"async@{concurrency}"] = run(async_path, concurrency=concurrency)
            out["sync_threads@8"] = run(sync_path, concurrency=8, sync_threads=True)
    for key, value in out.items():
        print(f"{key}: {value['wall_s']:.2f} s, at most {value['max_in_flight']} in flight per worker")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
