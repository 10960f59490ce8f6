"""The run's length and step prompts (`runrl_engine.schedule`), shared by the trainer and the server."""

from __future__ import annotations

import subprocess
import sys

from runrl_engine.schedule import PromptSchedule, held_out_count, plan_steps, steps_per_epoch


def test_plan_steps():
    assert steps_per_epoch(10, 4) == 3 and steps_per_epoch(1, 8) == 1 and steps_per_epoch(8, 8) == 1
    assert plan_steps(10, 4, epochs=3, max_steps=None) == 9
    assert plan_steps(10, 4, epochs=3, max_steps=5) == 5


def test_held_out_count():
    assert held_out_count(100, 0.05, 50) == 5
    assert held_out_count(100, 0.5, 3) == 3  # capped
    assert held_out_count(2, 0.5, 50) == 1
    assert held_out_count(1, 1.0, 50) == 0  # holding out the only prompt would leave none to train on


def test_schedule_covers_each_epoch_once():
    s = PromptSchedule(5, 2, seed=3)
    first_epoch = s.indices(1) + s.indices(2) + s.indices(3)[:1]
    assert sorted(first_epoch) == list(range(5)) and s.epoch_of(5) == 2.0


def test_importing_it_does_not_import_torch():
    code = "import sys, runrl_engine.schedule; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
