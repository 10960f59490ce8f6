"""Smoke test of benchmarks/grpo_vs_trl.py so it cannot rot: both sides run 2 steps of the quick W1 workload
in-process (the real worker functions), then the parent's aggregation and JSON summary run on those results."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "grpo_vs_trl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("grpo_vs_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_inputs_are_deterministic(bench, tmp_path):
    prompts = bench.make_prompts()
    assert prompts == bench.make_prompts() and len(prompts) == bench.NUM_PROMPTS
    assert all(p.startswith("Count the letters: ") and 2 <= len(p.split()) - 3 <= 5 for p in prompts)
    _, reward_file = bench.write_inputs(tmp_path)
    reward_fn = bench.load_reward_fn(reward_file)
    assert reward_fn("aab") == pytest.approx(2 / 3) and reward_fn("") == 0.0


def test_both_sides_run_and_summarise(bench, tmp_path, capsys):
    w = bench.quick(bench.WORKLOADS["W1"])
    runs = {side: bench.run_side(side, w, tmp_path / side, threads=1) for side in bench.SIDES}
    for side, r in runs.items():
        assert r["side"] == side and len(r["step_s"]) == w.steps, r
        assert all(t > 0 for t in r["step_s"])
        assert len(r["completion_tokens"]) == w.steps
        assert all(0 < c <= w.prompts_per_step * w.num_generations * w.completion_length for c in r["completion_tokens"])
        assert all(0.0 <= x <= 1.0 for x in r["reward"]) and r["peak_rss_mb"] > 0
        assert all(len(v) == w.steps for v in r["phases"].values())
    assert runs["ours"]["linear_params"] == runs["trl"]["linear_params"]  # the same model on both sides

    learn = bench.quick(bench.WORKLOADS["learn"])
    out = bench.run_benchmark([w, learn], rounds=1, threads=1, timeout_s=60,
                              spawn_fn=lambda side, wl, *_: {**runs[side], "workload": wl.name},
                              peak_fn=lambda _threads: 100.0, bandwidth_fn=lambda _threads: 10.0)
    final = json.loads(json.dumps(out["final"]))
    w1 = final["W1"]
    assert set(w1) >= {"ours_step_s", "trl_step_s", "ratio_step", "ours_tok_s", "trl_tok_s", "ours_peak_rss_mb",
                       "trl_peak_rss_mb"}
    assert math.isclose(w1["ratio_step"], w1["ours_step_s"] / w1["trl_step_s"])
    assert w1["ours_train_peak_fraction"] == pytest.approx(w1["ours_train_gflops"] / 100.0)
    # the decode floor: the model's projection bytes read once per step at the measured copy bandwidth
    assert w1["decode_floor_ms"] == pytest.approx(w1["decode_weight_mb"] / 10.0)
    assert w1["ratio_decode_floor"] == pytest.approx(w1["ours_decode_step_ms"] / w1["decode_floor_ms"])
    assert w1["trl_decode_step_ms"] > 0 and w1["ratio_per_token"] > 0
    assert set(final["learn"]) >= {"ours_last5", "trl_last5", "held", "paired_diff_mean", "paired_diff_se"}
    assert "ratio ours/TRL" in capsys.readouterr().out


def test_paired_difference(bench):
    out = bench.paired_difference({"ours": [0.5, 0.3], "trl": [0.4, 0.4]})  # differences +0.1, -0.1
    assert out["paired_diff_mean"] == pytest.approx(0.0, abs=1e-12)
    assert out["paired_diff_se"] == pytest.approx(0.1)  # stdev 0.1414 / sqrt(2)
    assert bench.paired_difference({"ours": [None], "trl": [0.4]}) == {"paired_diff_mean": None, "paired_diff_se": None}


def test_system_prompt_workload_runs_on_both_sides(bench, tmp_path):
    """W4's shape (4 prompts x 8, beta > 0, LoRA, a long system prompt on every prompt) on the tiny model."""
    w = bench.quick(bench.WORKLOADS["W4"])
    assert w.system_prompt and w.lora_rank and w.beta > 0
    prompt_file, _ = bench.write_inputs(tmp_path, system_prompt=True)
    first = json.loads(prompt_file.read_text().splitlines()[0])["prompt"]
    assert first[0] == {"role": "system", "content": bench.SYSTEM_PROMPT} and first[1]["role"] == "user"
    for side in bench.SIDES:
        r = bench.run_side(side, w, tmp_path / side, threads=1)
        assert len(r["step_s"]) == w.steps and all(n > 0 for n in r["decode_steps"]), r
    assert r["side"] == "trl" and all(x > 0 for x in r["phases"]["scoring_other"])  # TRL's reference pass
