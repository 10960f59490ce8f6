"""The run directory: every file a run writes or is given, by name, in one place (stdlib only).

The engine (`runrl train --output DIR`) and the server (`runrl serve`, which gives each run `runs/<id>/` and
reads what training left there) agree on this layout and nothing else; neither spells a file name of its own.

    config.yaml         the resolved config, secrets redacted (written by the trainer)
    metrics.jsonl       one JSON object per step (and the SFT warm-start's records)
    completions.jsonl   per step: prompt, completion or messages, reward, info
    logs.txt            the run's log; the server appends `[server] ...` lines after training ends
    wandb.json          where the W&B run went: {"mode", "url", "dir", "id", "project", "sync"}
    checkpoints/step-N/ resumable state (runrl_engine/checkpoint.py says what is inside)
    final/              the final model in Hugging Face format (a full model or a LoRA adapter)
    hf_push.json        the outcome of the push of final/ to the Hub (`hf_name`)
    sandbox/            the sandbox workers' private directories while training runs
    reward_env/         the run's `package_requirements` environment while training runs
  written by the server, for one training process:
    inputs/             the run's input files, copied when it starts (prompt.jsonl, reward.py, sft.jsonl)
    run.yaml            the config handed to `runrl train` (private, removed when training ends)
    process.log         the training process's stdout
    stderr.log          the training process's stderr (the server's `error_message` comes from its tail)
    ray_launch.json     with `--executor ray`: the job's launch plan (private, removed when the job starts)
    ray_exit.json       with `--executor ray`: the exit status of the job's training command

Not covered: what is inside a checkpoint (checkpoint.py) or a record (metrics.py, DESIGN.md), and where the
server keeps run directories (`Settings.runs_dir`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_CHECKPOINT = re.compile(r"step-(\d+)")
# the server's copies of a run's input files, by config key
_INPUT_NAMES = {"prompt_file": "prompt.jsonl", "reward_file": "reward.py", "sft_file": "sft.jsonl"}


@dataclass(frozen=True)
class RunDir:
    """One run's directory. Only paths: nothing is created or read here."""

    root: Path

    # ---- written by the engine -----------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def completions(self) -> Path:
        return self.root / "completions.jsonl"

    @property
    def streams(self) -> tuple[Path, Path]:
        """The per-step records, which a resumed run trims back to its checkpoint."""
        return self.metrics, self.completions

    @property
    def log(self) -> Path:
        return self.root / "logs.txt"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    @staticmethod
    def checkpoint_step(path: Path) -> int | None:
        """The step of a `checkpoint(step)` directory; None for any other name (`step-N.tmp`, half written)."""
        match = _CHECKPOINT.fullmatch(path.name)
        return int(match.group(1)) if match else None

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def has_model(self) -> bool:
        """Whether `final/` holds a model: a full one (`config.json`) or a LoRA adapter (`adapter_config.json`,
        `merge_lora: false`)."""
        return (self.final / "config.json").is_file() or (self.final / "adapter_config.json").is_file()

    @property
    def hub_push(self) -> Path:
        return self.root / "hf_push.json"

    @property
    def sandbox(self) -> Path:
        return self.root / "sandbox"

    @property
    def reward_env(self) -> Path:
        return self.root / "reward_env"

    @property
    def has_trained(self) -> bool:
        """Whether a training process has run here before (so the next one resumes)."""
        return any(p.exists() for p in (self.config, self.metrics, self.checkpoints))

    # ---- written by the server -----------------------------------------------------------------------------
    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    def input_copy(self, key: str) -> Path:
        """Where the server copies the input file of config key `key` (prompt_file, reward_file, sft_file)."""
        return self.inputs / _INPUT_NAMES[key]

    @property
    def launch_config(self) -> Path:
        return self.root / "run.yaml"

    @property
    def ray_launch(self) -> Path:
        """The Ray executor's launch plan for one job, secrets included (0600; the job deletes it at start)."""
        return self.root / "ray_launch.json"

    @property
    def ray_exit(self) -> Path:
        """The exit status a Ray job's training command ended with (server/ray_entry.py writes it)."""
        return self.root / "ray_exit.json"

    @property
    def process_log(self) -> Path:
        return self.root / "process.log"

    @property
    def stderr_log(self) -> Path:
        return self.root / "stderr.log"

    @property
    def leftovers(self) -> tuple[Path, ...]:
        """What is nobody's business once training has ended: the config handed to the trainer, the sandbox
        workers' directories and the package environment (user-written files a later run must never find)."""
        return self.launch_config, self.sandbox, self.reward_env

    @property
    def texts(self) -> tuple[Path, ...]:
        """The files a training process writes free text to (user code may print a secret into any of them)."""
        return self.stderr_log, self.process_log, self.log, self.hub_push


INPUT_KEYS = tuple(_INPUT_NAMES)  # the config keys whose files the server copies into `inputs/`
