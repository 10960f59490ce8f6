"""Per-step peak memory in metrics.jsonl: each record's `peak_rss_mb` covers the time since the previous one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM / clear_refs are Linux")
def test_peak_rss_is_reset_between_steps():
    # In a fresh interpreter: in a long-lived test process the allocator may serve the burst from pages that
    # earlier tests freed but kept resident, so RSS (and its peak) would not grow at all.
    code = """
from runrl_engine.metrics import step_peak_memory
step_peak_memory()
block = bytearray(256 * 2**20)
block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page so it is resident
del block
print(step_peak_memory()["peak_rss_mb"], step_peak_memory()["peak_rss_mb"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    big, small = map(float, out.stdout.split())
    assert big - small > 200, (big, small)  # the 256 MiB burst is in the first window only
