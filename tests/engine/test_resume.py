"""Resume is safe and exact (issue 13, findings 1 and 2), on the builtin tiny model.

A finished run resumed changes nothing; a larger `max_steps` continues from the last step and ends where an
uninterrupted run of that length ends; `save_every: 0` still leaves the one checkpoint at the end; the CLI
remembers the run's `--set` overrides, applies (and logs) the allowed ones given again, and refuses a change
that cannot happen mid-run, naming the key, before anything is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from runrl_engine import train
from runrl_engine.errors import ConfigError
from tests.engine.test_trainer import cfg

ROOT = Path(__file__).resolve().parents[2]
QS = ROOT / "configs" / "data" / "quickstart"
# per-step numbers that measure the machine, not the run
MACHINE_KEYS = ("step_time_s", "tokens_per_s", "peak_rss_mb", "peak_vram_mb")


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time: equal snapshots mean nothing was rewritten."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_numbers(run_dir: Path) -> list[dict]:
    """The records' results: without the machine's numbers, and without `total_steps`, the run length each record
    was planned under (an extended run's first records carry the shorter plan)."""
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k not in MACHINE_KEYS + ("total_steps",)}
            for r in records(run_dir)]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_resuming_a_finished_run_changes_nothing(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    first = train(cfg(), output_dir=out)
    final, metrics = snapshot(out / "final"), (out / "metrics.jsonl").read_bytes()
    assert checkpoints(out) == ["step-2"]  # save_every: 0 = one checkpoint, at the end

    again = train(cfg(), output_dir=out, resume=True)
    assert snapshot(out / "final") == final and (out / "metrics.jsonl").read_bytes() == metrics
    assert "run already complete at step 2; nothing to do" in (out / "logs.txt").read_text()
    assert again.steps == 2 and again.history == [] and again.final_dir == out / "final"
    assert again.metrics["reward_mean"] == first.metrics["reward_mean"]  # the summary is the run's last step

    fewer = train(cfg(max_steps=1), output_dir=out, resume=True)  # asks for fewer steps than are done
    assert snapshot(out / "final") == final and (out / "metrics.jsonl").read_bytes() == metrics
    assert fewer.steps == 2 and "nothing to do" in (out / "logs.txt").read_text().splitlines()[-1]


def test_save_every_checkpoints_the_last_step_too(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    train(cfg(max_steps=3, save_every=2, keep_checkpoints=5), output_dir=out)
    assert checkpoints(out) == ["step-2", "step-3"]


@pytest.mark.parametrize("extra", [{}, {"algorithm": "ppo", "ppo_epochs": 2}], ids=["grpo", "ppo"])
def test_more_steps_continue_to_the_uninterrupted_result(tmp_path, tiny_model_dir, extra):
    straight = train(cfg(max_steps=4, **extra), output_dir=tmp_path / "straight")
    out = tmp_path / "resumed"
    train(cfg(max_steps=2, **extra), output_dir=out)
    resumed = train(cfg(max_steps=4, **extra), output_dir=out, resume=True)
    assert [h["step"] for h in resumed.history] == [3, 4] and resumed.steps == 4
    assert run_numbers(out) == run_numbers(tmp_path / "straight")
    assert [r["total_steps"] for r in records(out)] == [2, 2, 4, 4]
    ws, wr = load_file(str(tmp_path / "straight" / "final" / "model.safetensors")), \
        load_file(str(out / "final" / "model.safetensors"))
    assert ws.keys() == wr.keys() and all(torch.equal(wr[k], ws[k]) for k in ws)
    assert checkpoints(out) == ["step-2", "step-4"]  # keep_checkpoints (2) still bounds the disk
    assert "max_steps: 2 -> 4" in (out / "logs.txt").read_text()
    assert straight.metrics["reward_mean"] == resumed.metrics["reward_mean"]


def test_changed_inputs_are_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    reward = tmp_path / "reward.py"
    reward.write_text((QS / "reward.py").read_text())
    out = tmp_path / "run"
    train(cfg(reward_file=str(reward), max_steps=1), output_dir=out)
    before = snapshot(out)
    with pytest.raises(ConfigError) as err:
        train(cfg(reward_file=str(reward), max_steps=2, learning_rate=1e-3), output_dir=out, resume=True)
    assert "learning_rate" in err.value.render() and "--output" in err.value.render()
    reward.write_text(reward.read_text() + "\n# edited\n")
    with pytest.raises(ConfigError) as err:
        train(cfg(reward_file=str(reward), max_steps=2), output_dir=out, resume=True)
    assert "reward_file" in err.value.render() and "changed" in err.value.render()
    assert snapshot(out) == before


def test_resumable_keys_are_config_keys():
    from runrl_engine.config import RESUMABLE_KEYS, field_help

    assert RESUMABLE_KEYS <= set(field_help())
    assert not {"model", "num_generations", "prompts_per_step", "seed", "lora_rank", "algorithm", "critic",
                "prompt_file", "reward_file", "learning_rate"} & RESUMABLE_KEYS


def runrl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runrl_engine.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_resume_remembers_the_set_overrides(tmp_path, tiny_model_dir):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg(max_steps=1, completion_length=4, prompts_per_step=1)))
    start = runrl("train", str(config), "--output", "out", "--set", "max_steps=2", "--set", "seed=3", cwd=tmp_path)
    assert start.returncode == 0, start.stderr[-2000:]
    out = tmp_path / "out"
    final, metrics = snapshot(out / "final"), (out / "metrics.jsonl").read_bytes()
    last = records(out)[-1]

    # no --set: the run's own max_steps=2 and seed=3, not the YAML's 1 and 0
    done = runrl("train", str(config), "--output", "out", "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run already complete at step 2; nothing to do" in done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["reward_mean"] == last["reward_mean"]
    assert snapshot(out / "final") == final and (out / "metrics.jsonl").read_bytes() == metrics

    more = runrl("train", str(config), "--output", "out", "--resume", "--set", "max_steps=3", cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-2000:]
    assert json.loads(more.stdout.strip().splitlines()[-1])["steps"] == 3
    assert [r["step"] for r in records(out)] == [1, 2, 3]
    log = (out / "logs.txt").read_text()
    assert "resumed from" in log and "at step 2" in log and "max_steps: 2 -> 3" in log
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["max_steps"] == 3 and stored["seed"] == 3

    before = snapshot(out)
    refused = runrl("train", str(config), "--output", "out", "--resume", "--set", "num_generations=2", cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "num_generations" in refused.stderr and "--output" in refused.stderr
    assert snapshot(out) == before


def test_a_killed_run_resumes_with_each_step_logged_once(tmp_path, tiny_model_dir):
    """What `runrl serve` resumes after a kill -9 / OOM kill of the trainer. Killed after step 3's records but
    before its checkpoint, mid-write of a record: `--resume` continues from step 2 and logs step 3 once. Killed
    before any checkpoint: `--resume` starts at step 0 and drops every record of the lost attempt. Either way
    metrics.jsonl and completions.jsonl are those of an uninterrupted run."""
    import shutil

    straight = tmp_path / "straight"
    train(cfg(max_steps=3), output_dir=straight)
    out = tmp_path / "killed"
    run = cfg(max_steps=3, save_every=2, keep_checkpoints=5)
    train(run, output_dir=out)

    def kill_after(*checkpoints: str) -> None:
        shutil.rmtree(out / "final")
        for name in checkpoints:
            shutil.rmtree(out / "checkpoints" / name)
        for name in ("metrics.jsonl", "completions.jsonl"):  # a torn record after step 3's
            with open(out / name, "a") as fh:
                fh.write('{"step": 4, "reward_me')

    kill_after("step-3")
    assert [json.loads(x)["step"] for x in (out / "completions.jsonl").read_text().splitlines()[:-1]].count(3)
    resumed = train(run, output_dir=out, resume=True)
    assert [h["step"] for h in resumed.history] == [3]
    assert run_numbers(out) == run_numbers(straight)
    assert (out / "completions.jsonl").read_text() == (straight / "completions.jsonl").read_text()

    kill_after("step-2", "step-3")  # no checkpoint left
    resumed = train(run, output_dir=out, resume=True)
    assert [h["step"] for h in resumed.history] == [1, 2, 3]
    assert run_numbers(out) == run_numbers(straight)
    assert (out / "completions.jsonl").read_text() == (straight / "completions.jsonl").read_text()
    assert "--resume: no checkpoint found, starting from step 0" in (out / "logs.txt").read_text()
