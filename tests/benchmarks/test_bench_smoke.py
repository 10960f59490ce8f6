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
                              peak_fn=lambda _threads: 100.0)
    final = json.loads(json.dumps(out["final"]))
    w1 = final["W1"]
    assert set(w1) >= {"ours_step_s", "trl_step_s", "ratio_step", "ours_tok_s", "trl_tok_s", "ours_peak_rss_mb",
                       "trl_peak_rss_mb"}
    assert math.isclose(w1["ratio_step"], w1["ours_step_s"] / w1["trl_step_s"])
    assert w1["ours_train_peak_fraction"] == pytest.approx(w1["ours_train_gflops"] / 100.0)
    assert set(final["learn"]) >= {"ours_last5", "trl_last5", "held", "paired_diff_mean", "paired_diff_se"}
    assert "ratio ours/TRL" in capsys.readouterr().out


def test_paired_difference(bench):
    out = bench.paired_difference({"ours": [0.5, 0.3], "trl": [0.4, 0.4]})  # differences +0.1, -0.1
    assert out["paired_diff_mean"] == pytest.approx(0.0, abs=1e-12)
    assert out["paired_diff_se"] == pytest.approx(0.1)  # stdev 0.1414 / sqrt(2)
    assert bench.paired_difference({"ours": [None], "trl": [0.4]}) == {"paired_diff_mean": None, "paired_diff_se": None}
