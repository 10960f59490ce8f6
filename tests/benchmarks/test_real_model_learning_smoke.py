"""Smoke test of benchmarks/real_model_learning.py so it cannot rot: `--quick` runs both sides (ours and TRL's
GRPOTrainer) for 2 steps on the real SmolLM2 with the shared held-out evaluator, in two subprocesses at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "real_model_learning.py"


def test_quick_run_prints_both_curves(smollm2_dir, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--parallel", "--json", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final held-out accuracy over seeds [0]" in proc.stdout
    data = json.loads(out.read_text())
    res = data["results"]["0"]
    for side in ("ours", "trl"):
        assert sorted(int(k) for k in res[side]["eval"]) == [0, 1, 2], res[side]["eval"]
        assert all(0.0 <= v <= 1.0 for v in res[side]["eval"].values())
        assert len(res[side]["reward"]) == 2
    # the same weights scored by the same greedy evaluator: both sides agree before training, and the base model
    # answers some of the 8 questions
    assert res["ours"]["eval"]["0"] == res["trl"]["eval"]["0"] > 0
    # our trainer's own greedy eval scores the same held-out questions as transformers' generate
    assert res["ours"]["ours_own_eval"]["0"] == res["ours"]["eval"]["0"]
