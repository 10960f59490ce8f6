"""Server settings: one frozen dataclass, built by `runrl serve` or by tests."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

MAX_UPLOAD_BYTES = 50 * 1024 * 1024


def default_slots() -> int:
    """One concurrent run per visible GPU, else 1; counted without importing torch."""
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        n = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        return max(1, n)
    except (OSError, subprocess.SubprocessError):
        return 1


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    slots: int = 1
    # The training command; the worker appends `CONFIG --output RUN_DIR`. Tests about the queue alone may
    # substitute a stand-in; everything else uses the real `runrl train`.
    train_command: tuple[str, ...] = (sys.executable, "-m", "runrl_engine.cli", "train")
    start_worker: bool = True
    poll_interval_s: float = 0.5
    lease_s: float = 30.0
    cancel_grace_s: float = 5.0
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    public_url: str = ""  # base for download/preview URLs and deployment api_url; "" = from each request
    deploy_command: tuple[str, ...] = (sys.executable, "-m", "server.deploy")
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "runrl.db"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"
