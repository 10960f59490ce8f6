"""Each step's metrics record carries the sandbox's counts since the previous record (`sandbox/timeouts`,
`sandbox/crashes`, `sandbox/restarts`, from `SandboxStats`), not running totals."""

from __future__ import annotations

import json

from runrl_engine import train
from tests.engine.test_trainer import cfg


def test_reward_timeouts_and_worker_restarts_are_in_each_step_record(tmp_path, tiny_model_dir):
    slow = tmp_path / "slow.py"
    slow.write_text("import time\n\ndef reward_fn(completion, **row):\n    time.sleep(60)\n    return 1.0\n")
    result = train(cfg(reward_file=str(slow), max_steps=2, prompts_per_step=1, num_generations=2, micro_batch_size=2,
                       reward_workers=1, reward_timeout_s=0.5, max_failed_reward_steps=5), output_dir=tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["sandbox/timeouts"] for r in records] == [2, 2]  # per step: both completions of each step timed out
    assert all(r["sandbox/restarts"] >= 1 for r in records) and all(r["sandbox/crashes"] == 0 for r in records)
    assert [r["reward_errors"] for r in result.history] == [2, 2]
