"""Timing TRL's GRPOTrainer from outside, the same way in every benchmark: per-step times and per-phase times.

`time_trl_training(trainer, phases, ...)` wraps the named trainer methods (instance attributes shadow the class's)
so their time accumulates per phase, runs `trainer.train()` with a callback that stamps each optimizer-step end
and keeps the log records, and returns the step intervals, each step's share of every phase and the logs.
A step's time is the interval between consecutive step ends (the first from the start of training), the same
definition the benchmarks use for our trainer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def intervals(start: float, ends: list[float]) -> list[float]:
    """Durations between consecutive timestamps, the first measured from `start`."""
    return [b - a for a, b in zip([start] + ends[:-1], ends)]


def time_trl_training(trainer: Any, phases: dict[str, str], *, log_key: str,
                      on_begin: Callable[[], None] | None = None,
                      sync: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train and time. `phases`: phase name -> trainer method name; `log_key`: keep the log records holding it;
    `on_begin`: called when training starts; `sync`: called before each phase timer stops (e.g. CUDA sync).

    Returns {"step_s": [...], "phases": {name: [seconds per step]}, "logs": [records]}.
    """
    from transformers import TrainerCallback

    totals = dict.fromkeys(phases, 0.0)

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if sync is not None:
                    sync()
                totals[name] += time.perf_counter() - t0
        return wrapper

    for name, method in phases.items():
        setattr(trainer, method, timed(name, getattr(trainer, method)))

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.start, self.ends, self.snaps, self.logs = 0.0, [], [], []

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            if on_begin is not None:
                on_begin()
            self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.ends.append(time.perf_counter())
            self.snaps.append(dict(totals))

        def on_log(self, _args: Any, _state: Any, _control: Any, logs: dict | None = None, **__: Any) -> None:
            if logs and log_key in logs:
                self.logs.append(dict(logs))

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    previous = [dict.fromkeys(phases, 0.0)] + clock.snaps[:-1]
    per_step = [{k: snap[k] - prev[k] for k in phases} for prev, snap in zip(previous, clock.snaps)]
    return {"step_s": intervals(clock.start, clock.ends),
            "phases": {k: [d[k] for d in per_step] for k in phases}, "logs": clock.logs}
