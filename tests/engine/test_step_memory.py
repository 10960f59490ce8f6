"""Per-step peak memory in metrics.jsonl: each record's `peak_rss_mb` covers the time since the previous one."""

from __future__ import annotations

import sys

import pytest

from runrl_engine.metrics import step_peak_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM / clear_refs are Linux")
def test_peak_rss_is_reset_between_steps():
    step_peak_memory()
    block = bytearray(256 * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page so it is resident
    del block
    big = step_peak_memory()["peak_rss_mb"]
    small = step_peak_memory()["peak_rss_mb"]
    assert big - small > 200, (big, small)  # the 256 MiB burst is in the first window only
