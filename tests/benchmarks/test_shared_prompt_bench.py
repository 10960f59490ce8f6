"""Smoke test of benchmarks/shared_prompt.py: the quick W1 batch under a system prompt, both settings timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "shared_prompt.py"


def test_shared_and_plain_updates_are_timed():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--calls", "1", "--system-words", "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["workload"] == "W1" and out["system_words"] == 5 and out["prompt_tokens_mean"] > 5
    assert len(out["shared_all_s"]) == len(out["plain_all_s"]) == 1
    assert out["shared_s"] > 0 and out["plain_s"] > 0 and out["ratio"] == out["shared_s"] / out["plain_s"]
