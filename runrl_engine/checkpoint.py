"""Resumable checkpoints, the final export and the optional push to the Hugging Face Hub.

A checkpoint is `checkpoints/step-N/`: accelerate's state (model or adapter weights, optimizer, scheduler,
RNG) plus `trainer_state.json`. It is written under a temporary name and renamed when complete, so a crash
mid-save never leaves a checkpoint that looks whole. Resuming restores that state; rollouts are seeded per
step and per sample, so the resumed run continues with the same data and samples it would have had.

`final/` is a plain Hugging Face model directory (weights + tokenizer) loadable with
`AutoModelForCausalLM.from_pretrained`; under LoRA it holds the merged model when `merge_lora` is true and
the adapter otherwise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

STATE_FILE = "trainer_state.json"


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step-{step}"


def latest_checkpoint(out_dir: Path) -> Path | None:
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-", 1)[1]), default=None)


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


def _prune(out_dir: Path, keep: int) -> None:
    root = out_dir / "checkpoints"
    steps = sorted((p for p in root.iterdir() if p.name.startswith("step-") and not p.name.endswith(".tmp")),
                   key=lambda p: int(p.name.split("-", 1)[1]))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def export_final(model: Any, tokenizer: Any, out_dir: Path, *, merge_lora: bool) -> Path:
    """Write `final/` from the unwrapped policy (main process only)."""
    final = out_dir / "final"
    tmp = out_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    is_peft = hasattr(model, "peft_config")
    if is_peft and merge_lora:
        model = model.merge_and_unload()
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def push_to_hub(final: Path, repo_id: str, token: str | None, log: Callable[[str], None]) -> str | None:
    """Upload `final/` to `repo_id`; returns the repo URL, or None (with a logged reason) when it can't."""
    if not token:
        log(f"hf_name={repo_id!r} is set but there is no hf_token (or HF_TOKEN): the model stays in {final}")
        return None
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=True, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(final), commit_message="runrl-engine final model")
    except Exception as exc:  # network down, bad token, no permission: the local model is what matters
        log(f"could not push to the Hugging Face Hub ({type(exc).__name__}: {exc}); the model stays in {final}")
        return None
    url = f"https://huggingface.co/{repo_id}"
    log(f"pushed the final model to {url}")
    return url
