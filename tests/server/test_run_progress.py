"""A run's step count: the server estimates it from the prompt file's lines before the run starts, the trainer
knows it exactly (prompts skipped for length, the held-out split), and progress follows the trainer's number as
soon as a step record carries it."""

from __future__ import annotations

import json
from pathlib import Path

from runrl_engine import train
from runrl_engine.config import RunConfig
from server.routes.run_outputs import read_progress
from server.routes.runs import _estimate_steps

QS = Path(__file__).resolve().parents[2] / "configs" / "data" / "quickstart"


def test_progress_uses_the_trainers_step_count_once_written(tmp_path, tiny_model_dir):
    short = QS.joinpath("prompts.jsonl").read_text().splitlines()[:4]
    too_long = json.dumps({"prompt": [{"role": "user", "content": " ".join(f"w{i}" for i in range(1500))}]})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(short + [too_long] * 4) + "\n")
    config = dict(model="builtin:tiny", prompt_file=str(prompts), reward_file=str(QS / "reward.py"),
                  completion_length=4, prompts_per_step=2, num_generations=2, micro_batch_size=4, eval_fraction=0.0,
                  eval_every=0, save_every=0, seed=0, max_prompt_length=1024)
    estimate = _estimate_steps(str(prompts), RunConfig.from_dict(config))
    assert estimate == 4  # 8 lines / 2 per step: the server cannot know 4 of them are too long

    run = tmp_path / "runs" / "7"
    result = train(config, output_dir=run)
    assert result.steps == 2 and "skipped 4 prompt(s)" in (run / "logs.txt").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["total_steps"] for r in records] == [2, 2]
    assert read_progress(tmp_path / "runs", 7, "RUNNING", estimate) == (2, 0.99)  # not 2 of 4
    (run / "metrics.jsonl").write_text(json.dumps({k: v for k, v in records[0].items() if k != "total_steps"}) + "\n")
    assert read_progress(tmp_path / "runs", 7, "RUNNING", estimate) == (1, 0.25)  # no count written: the estimate
