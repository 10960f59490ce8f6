"""What a run writes as it goes: logs.txt, metrics.jsonl, completions.jsonl, the progress bar and W&B.

Only the main process writes (`RunOutputs(enabled=False)` on other ranks is a no-op). Every record is one
complete JSON line, flushed as written, so a reader (the API's log/metric endpoints) never sees half a
record. Secrets (the run's `hf_token`, tokens in the environment) are redacted from every log line.

W&B (`report_to: [wandb]`) runs offline unless `WANDB_API_KEY` is set, so it never blocks on the network; the
numbers of each metrics record are logged at its step, and the logged completions as a `completions` table per
step (as TRL does). logs.txt says where the run went: its URL, or the offline directory and the `wandb sync`
command that uploads it; `WANDB_FILE` in the run directory records the same (mode, url, dir) for the API's
`wandb_url`. Not covered: resuming the same W&B run after `--resume` (a resumed run starts a new W&B run).

Known-harmless library warnings that would otherwise print at every checkpoint are dropped
(`quiet_known_warnings`); nothing else is filtered.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from runrl_engine.rundir import RunDir
from runrl_engine.secrets import env_secret_values, redact

WANDB_FILE = RunDir(Path()).wandb.name  # {"mode", "url", "dir", "id", "project", "sync"}; see recorded_wandb_url
# (logger, text) of the messages quiet_known_warnings drops
_KNOWN_HARMLESS = (
    # accelerate's save_state on a model whose output head is tied to its input embeddings (the tiny and SmolLM2
    # models): the alias is dropped from the file and restored on load, so a resumed run is exact (tests)
    ("accelerate.utils.other", "Removed shared tensor"),
)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_known_warnings() -> None:
    """Drop the `_KNOWN_HARMLESS` messages (e.g. `[RANK 0] Removed shared tensor {'lm_head.weight'} while saving`
    at every checkpoint), and only those: every other record of those loggers still passes. Idempotent."""
    for name, text in _KNOWN_HARMLESS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))


def recorded_wandb_url(run_dir: Path) -> str | None:
    """The W&B URL a run recorded in `WANDB_FILE` (None: no W&B, offline, or not written yet)."""
    try:
        url = json.loads(RunDir(run_dir).wandb.read_text(encoding="utf-8")).get("url")
    except (OSError, ValueError, AttributeError):
        return None
    return url if isinstance(url, str) and url.startswith(("https://", "http://")) else None


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
        self._wandb_offline_dir: Path | None = None
        quiet_known_warnings()  # every process saves checkpoints
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        mode = "a" if resume else "w"
        paths = RunDir(out_dir)
        self._log = open(paths.log, mode, encoding="utf-8", buffering=1)
        self._metrics = open(paths.metrics, mode, encoding="utf-8", buffering=1)
        self._completions = open(paths.completions, mode, encoding="utf-8", buffering=1)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
        if "wandb" in report_to:
            self._wandb, mode = _start_wandb(out_dir, wandb_project, run_name, config or {})
            self._announce_wandb(mode, wandb_project)

    def _announce_wandb(self, mode: str, project: str) -> None:
        """Say in logs.txt where the W&B run went, and record it in WANDB_FILE (read by the API's wandb_url)."""
        run = self._wandb
        run_dir = Path(run.dir).resolve().parent  # run.dir is the run's files/ directory
        url = None if mode == "offline" else run.url  # an offline run's .url only prints a warning
        record = {"mode": mode, "url": url, "dir": str(run_dir), "id": run.id, "project": project,
                  "sync": f"wandb sync {shlex.quote(str(run_dir))}" if mode == "offline" else None}
        path = RunDir(self.out_dir).wandb
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        tmp.replace(path)
        if mode == "offline":
            self._wandb_offline_dir = run_dir
            self.log(f"W&B: offline run (WANDB_API_KEY is not set); upload it with `{record['sync']}`")
        else:
            self.log(f"W&B: {url}")

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
        if self._wandb is not None:
            import wandb

            rows = [[r.get("step"), redact(_prompt_text(r.get("prompt")), self.secrets),
                     redact(str(r.get("completion", "")), self.secrets), r.get("reward"), r.get("finished")]
                    for r in records]
            table = wandb.Table(columns=["step", "prompt", "completion", "reward", "finished"], data=rows)
            if isinstance(records[0].get("step"), int):
                self._wandb.log({"completions": table}, step=records[0]["step"])
            else:
                self._wandb.log({"completions": table})

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
            if self._wandb_offline_dir is not None:
                where = shlex.quote(str(self._wandb_offline_dir))
                self.log(f"W&B offline run saved in {where}; upload it with `wandb sync {where}`")
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
    run = wandb.init(project=project, name=name, config=config, dir=str(out_dir), mode=mode,
                     settings=wandb.Settings(silent=True))
    return run, mode


def _prompt_text(prompt: Any) -> str:
    """A prompt's message list as `role: content` lines, for the W&B table."""
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in prompt)
    return "" if prompt is None else str(prompt)
