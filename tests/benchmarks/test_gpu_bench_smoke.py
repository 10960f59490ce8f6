"""Smoke test of benchmarks/gpu_bench.py so it cannot rot on machines without a GPU: `--smoke` builds a toy model
through the same random-init path as the Qwen configs and runs every side (ours with the hf and paged backends,
TRL) for 2 steps on CPU, in-process; the last line must be the JSON summary with each side's figures and ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_smoke_runs_every_side(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--smoke", "--work-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])["gpu_bench"]
    assert summary["info"]["device"] == "cpu" and summary["workload"]["steps"] == 2
    res = summary["results"]["smoke"]
    assert set(res) == {"ours-hf", "ours-paged", "trl", "ratios"}  # no vllm here: skipped, not failed
    for side in ("ours-hf", "ours-paged", "trl"):
        r = res[side]
        assert "error" not in r, r
        assert r["step_s"] > 0 and r["gen_tok_s"] > 0 and r["train_tok_s"] > 0
        assert 0 < r["completion_tokens"] <= 2 * 4 * 8  # prompts x generations x completion_length
    ratios = res["ratios"]
    for backend in ("hf", "paged"):
        assert ratios[f"{backend}/trl_step"] == pytest.approx(res[f"ours-{backend}"]["step_s"] / res["trl"]["step_s"])
        assert {f"{backend}/trl_gen_tok_s", f"{backend}/trl_train_tok_s"} <= set(ratios)
    assert "skipping ours-vllm" in proc.stdout
    built = json.loads((tmp_path / "smoke" / "bench_model.json").read_text())
    assert built["vocab_size"] == 512 and built["params"] > 0


def test_model_configs_have_the_real_sizes():
    """Parameter counts of the random-init models match the published ones (tied embeddings): 0.49 B, 1.72 B."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    expected = {"qwen2.5-0.5b": 494_032_768, "qwen3-1.7b": 1_720_574_976}
    for name, n in expected.items():
        config, model_cls = bench.make_config(name, eos_id=507, pad_id=505)
        with torch.device("meta"):
            model = model_cls(config)
        assert sum(p.numel() for p in model.parameters()) == n, name
        assert model.config.vocab_size == 151936 and model.config.tie_word_embeddings
