"""Resumable checkpoints, the final export and the optional push to the Hugging Face Hub.

A checkpoint is `checkpoints/step-N/`: accelerate's state (model or adapter weights, optimizer, scheduler,
RNG) plus `trainer_state.json` (the step, the run's length, and a SHA-256 of each input file). It is written
under a temporary name and renamed when complete, so a crash mid-save never leaves a checkpoint that looks
whole. The trainer writes one every `save_every` steps and always one at the last step, so a finished run
can be extended exactly. Resuming restores that state; rollouts are seeded per step and per sample, so the
resumed run continues with the same data and samples it would have had.

`resume_point` decides what `--resume` does before anything is loaded or written: it refuses a config or
input-file change that cannot happen mid-run (`config.RESUMABLE_KEYS` lists what may change), and says
whether the run is already complete (nothing to do: nothing is touched). `trim_streams` cuts
metrics.jsonl and completions.jsonl back to the checkpoint's step, so the steps a crash interrupted after
the checkpoint are logged once, by the resumed run.

`final/` is a plain Hugging Face model directory (weights + tokenizer) loadable with
`AutoModelForCausalLM.from_pretrained`; under LoRA it holds the merged model when `merge_lora` is true and
the adapter otherwise. With `hf_name`, `push_to_hub` uploads it and writes the outcome to `hf_push.json` in the
run directory: the engine's side of the contract with `runrl serve`, which shows it on the run (the engine
never imports the server).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from runrl_engine.config import RunConfig, resume_changes
from runrl_engine.rundir import RunDir

STATE_FILE = "trainer_state.json"  # in each checkpoint directory
PUSH_RECORD = RunDir(Path()).hub_push.name  # the result of the push to the Hub (`push_to_hub`), for the server
PUSH_STATUSES = ("pushed", "failed", "skipped")
INPUT_FILES = ("prompt_file", "reward_file", "eval_prompt_file", "sft_file")  # whose contents a run depends on


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return RunDir(out_dir).checkpoint(step)


def latest_checkpoint(out_dir: Path) -> Path | None:
    root = RunDir(out_dir).checkpoints
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if RunDir.checkpoint_step(p) is not None and (p / STATE_FILE).is_file()]
    return max(done, key=RunDir.checkpoint_step, default=None)


def save_checkpoint(accelerator: Any, out_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Collective: every process calls it. Returns the checkpoint directory."""
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(out_dir, keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: Path) -> dict[str, Any]:
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def input_fingerprints(cfg: RunConfig) -> dict[str, str]:
    """SHA-256 of each input file the config names (absent files are left to the loaders to report)."""
    out = {}
    for key in INPUT_FILES:
        path = getattr(cfg, key)
        if path and Path(path).is_file():
            out[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


@dataclass
class ResumePoint:
    """Where `--resume` continues: the latest checkpoint, its state, and the allowed config changes."""

    path: Path
    state: dict[str, Any]
    total_steps: int | None  # the resumed run's length when it can be told without loading data, else None
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key, the run's value, the new value)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def complete(self) -> bool:
        """Nothing to train and `final/` written: resuming must leave the run as it is."""
        return (self.total_steps is not None and self.step >= self.total_steps
                and RunDir(self.path.parent.parent).final.is_dir())


def resume_point(out_dir: Path, cfg: RunConfig) -> ResumePoint | None:
    """The checkpoint `cfg` resumes from, or None (no checkpoint: the run starts at step 0). Raises ConfigError,
    before anything is read into memory or written, when `cfg` changes what cannot change mid-run: a key outside
    `RESUMABLE_KEYS` (against the run's `config.yaml`), or the contents of an input file (against the checkpoint's
    fingerprints)."""
    path = latest_checkpoint(out_dir)
    if path is None:
        return None
    state = json.loads((path / STATE_FILE).read_text())
    changes: list[tuple[str, Any, Any]] = []
    stored = RunDir(out_dir).config
    if stored.is_file():
        changes = resume_changes(stored, cfg, where=f"--resume {out_dir}")
    now = input_fingerprints(cfg)
    for key, digest in state.get("inputs", {}).items():
        if key in now and now[key] != digest:
            from runrl_engine.errors import ConfigError

            raise ConfigError(f"{key} {getattr(cfg, key)} changed since {path} was written (its contents differ); "
                              "a run cannot change its data or code mid-run", where=f"--resume {out_dir}",
                              fix=f"restore {key} as it was, or start a new run with another --output directory")
    per_epoch = state.get("steps_per_epoch")
    total = cfg.max_steps or (cfg.epochs * per_epoch if per_epoch else None)
    return ResumePoint(path=path, state=state, total_steps=total, changes=changes)


def announce_complete(point: ResumePoint, *, main: bool) -> dict[str, Any]:
    """Say that a resumed run is complete (stderr and logs.txt, main process only) and return its last step's
    metrics record; nothing else is touched."""
    asked = point.total_steps
    why = (f"run already complete at step {point.step}" if asked == point.step else
           f"run already has {point.step} steps done and {asked} are asked for")
    message = f"{why}; nothing to do (final/, metrics.jsonl and config.yaml unchanged)"
    out_dir = point.path.parent.parent
    if main:
        import sys
        import time

        with open(RunDir(out_dir).log, "a", encoding="utf-8") as f:
            f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}\n")
        print(message, file=sys.stderr, flush=True)
    return last_step_record(out_dir, point.step)


def trim_streams(out_dir: Path, step: int) -> None:
    """Drop the records after `step` from metrics.jsonl and completions.jsonl (main process, before they are
    opened for appending): what a crashed run logged past its last checkpoint is logged again by the resumed
    one. With `step` 0 nothing is kept (the run starts over, SFT warm-start included); otherwise records without
    a step (the SFT warm-start's) stay. A torn last line is dropped."""
    for path in RunDir(out_dir).streams:
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if step > 0 and isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line + "\n")
        text = "".join(kept)
        if text != path.read_text(encoding="utf-8"):
            path.write_text(text, encoding="utf-8")


def last_step_record(out_dir: Path, step: int) -> dict[str, Any]:
    """metrics.jsonl's record of RL step `step` (the summary of a run resumed with nothing to do), or {}."""
    path = RunDir(out_dir).metrics
    if not path.is_file():
        return {}
    for line in reversed(path.read_text(encoding="utf-8").splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step") == step and "reward_mean" in record:
            return record
    return {}


def _prune(out_dir: Path, keep: int) -> None:
    root = RunDir(out_dir).checkpoints
    steps = sorted((p for p in root.iterdir() if RunDir.checkpoint_step(p) is not None), key=RunDir.checkpoint_step)
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def export_final(model: Any, tokenizer: Any, out_dir: Path, *, merge_lora: bool) -> Path:
    """Write `final/` from the unwrapped policy (main process only)."""
    final = RunDir(out_dir).final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    is_peft = hasattr(model, "peft_config")
    if is_peft and merge_lora:
        model = model.merge_and_unload()
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def push_to_hub(final: Path, repo_id: str, token: str | None, log: Callable[[str], None],
                record: Path | None = None) -> dict[str, Any]:
    """Upload `final/` to `repo_id` on the configured Hub (huggingface_hub's endpoint: `HF_ENDPOINT`, else
    https://huggingface.co). Never raises: a push that cannot happen or fails is logged, and the local model is
    what matters. Returns the result, also written to `record` when given (`PUSH_RECORD` in the run directory,
    which `runrl serve` reads): `repo_id` (as the Hub created it), `status` (`pushed`, `failed`, or `skipped`
    when there is no token), `url` (the repo URL `create_repo` answered: it follows the endpoint; None unless
    pushed), `endpoint`, `error` (`ExceptionType: message`, the token redacted; None when pushed) and `at`."""
    from huggingface_hub import constants

    result: dict[str, Any] = {"repo_id": repo_id, "status": "skipped", "url": None, "endpoint": constants.ENDPOINT,
                              "error": None, "at": None}
    if not token:
        result["error"] = "no hf_token (or HF_TOKEN) to push with"
        log(f"hf_name={repo_id!r} is set but there is no hf_token (or HF_TOKEN): the model stays in {final}")
    else:
        try:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
            created = api.create_repo(repo_id, private=True, exist_ok=True)
            repo = getattr(created, "repo_id", None) or repo_id  # `name` alone: the Hub adds the namespace
            api.upload_folder(repo_id=repo, folder_path=str(final), commit_message="runrl-engine final model")
            result.update(status="pushed", repo_id=repo, url=str(created))
            log(f"pushed the final model to {created}")
        except Exception as exc:  # network down, bad token, no permission: the local model is what matters
            error = f"{type(exc).__name__}: {exc}".replace(token, "***")
            result.update(status="failed", error=error)
            log(f"could not push to the Hugging Face Hub at {constants.ENDPOINT} ({error}); the model stays in {final}")
    result["at"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if record is not None:
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(json.dumps(result), encoding="utf-8")
        tmp.replace(record)
    return result


def read_push_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's `PUSH_RECORD` (None: no push was tried, or the file is unreadable)."""
    try:
        record = json.loads(RunDir(run_dir).hub_push.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("status") in PUSH_STATUSES else None
