"""What a run writes as it goes: logs.txt, metrics.jsonl, completions.jsonl, the progress bar and W&B.

Only the main process writes (`RunOutputs(enabled=False)` on other ranks is a no-op). Every record is one
complete JSON line, flushed as written, so a reader (the API's log/metric endpoints) never sees half a
record. Secrets (the run's `hf_token`, tokens in the environment) are redacted from every log line.
W&B runs offline unless `WANDB_API_KEY` is set, so it never blocks on the network.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from runrl_engine.sandbox.isolation import env_secret_values, redact

def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def peak_rss_mb() -> float:
    import resource

    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def step_peak_memory() -> dict[str, float]:
    """Peak memory of this process since the previous call, in MiB, then the peaks are reset: `peak_rss_mb` (Linux
    VmHWM, reset through /proc/self/clear_refs; where that is unavailable, the process-lifetime `ru_maxrss`) and,
    when CUDA is initialised, `peak_vram_mb` (torch's `max_memory_allocated` on the current device: tensors torch
    allocated, not the caching allocator's reserve or other libraries' memory)."""
    out = {"peak_rss_mb": peak_rss_mb()}
    try:
        with open("/proc/self/status") as f:
            hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS (Linux >= 4.0)
        out["peak_rss_mb"] = hwm_kib / 1024.0
    except (OSError, StopIteration, ValueError):
        pass
    torch = sys.modules.get("torch")  # never import torch here: the server imports this module
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    return out


class RunOutputs:
    """The run directory's log, metric and completion streams (main process only)."""

    def __init__(self, out_dir: Path, *, enabled: bool, secrets: Iterable[str] = (), total_steps: int = 0,
                 config: dict[str, Any] | None = None, report_to: Iterable[str] = (), wandb_project: str = "",
                 run_name: str = "", resume: bool = False):
        self.out_dir = out_dir
        self.enabled = enabled
        self.secrets = [s for s in secrets if s] + env_secret_values()
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        mode = "a" if resume else "w"
        self._log = open(out_dir / "logs.txt", mode, encoding="utf-8", buffering=1)
        self._metrics = open(out_dir / "metrics.jsonl", mode, encoding="utf-8", buffering=1)
        self._completions = open(out_dir / "completions.jsonl", mode, encoding="utf-8", buffering=1)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
        if "wandb" in report_to:
            self._wandb = _start_wandb(out_dir, wandb_project, run_name, config or {})

    # ---- streams ---------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if not self.enabled:
            return
        line = redact(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}", self.secrets)
        self._log.write(line + "\n")
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps(_jsonable(record)) + "\n")
        if self._wandb is not None:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            if "step" in record:
                self._wandb.log(numbers, step=record["step"])
            else:  # SFT warm-start records come before RL step 1
                self._wandb.log(numbers)

    def completions(self, records: list[dict[str, Any]]) -> None:
        if not self.enabled or not records:
            return
        self._completions.write("".join(json.dumps(_jsonable(r), ensure_ascii=False) + "\n" for r in records))

    def progress(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        summary = (f"step {step}: reward {record['reward_mean']:.3f} ± {record['reward_std']:.3f}  "
                   f"loss {record['loss']:.4f}  len {record['completion_length_mean']:.1f}  "
                   f"{record['tokens_per_s']:.0f} tok/s  {record['step_time_s']:.2f}s")
        if self._bar is not None:
            self._bar.set_postfix_str(f"reward={record['reward_mean']:.3f} tok/s={record['tokens_per_s']:.0f}")
            self._bar.n = step
            self._bar.refresh()
            self._log.write(redact(summary, self.secrets) + "\n")
        else:
            self.log(summary)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        for f in (self._log, self._metrics, self._completions):
            f.close()
        self.enabled = False


def _start_wandb(out_dir: Path, project: str, name: str, config: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError:
        from runrl_engine.errors import ConfigError

        raise ConfigError("report_to includes 'wandb' but the wandb package is not installed", where="report_to",
                          fix="pip install 'runrl-engine[wandb]' (or wandb), or remove wandb from report_to") from None
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project=project, name=name, config=config, dir=str(out_dir), mode=mode,
                      settings=wandb.Settings(silent=True))
