"""GPU placement for `runrl serve`: which GPUs the server has, what a run may ask for, and how it is started on them.

- The server's GPUs (`Settings.gpus`): `runrl serve --gpus 0,1,2,3` (`parse_gpus`; `none` = CPU only), else
  `detect_gpus()`: the entries of the server's own CUDA_VISIBLE_DEVICES when the operator set it, else one id per
  `nvidia-smi -L` line. Never imports torch. `None` (tests, a `Settings` built by hand) means no placement at all:
  runs inherit the server's environment, as before placement existed.
- A run asks for `n_gpus` (a RunConfig key, also RunRL's legacy create key; unset = 1). `check_n_gpus` refuses at
  create what this server cannot give (422 naming `n_gpus`).
- The queue (`RunQueue.claim`, server/queue.py) hands the oldest PENDING run `n_gpus` GPUs that no SETTING_UP or
  RUNNING run holds, in the order of `Settings.gpus`, in the claim's own transaction; when they are not free, no
  run starts (younger runs wait behind it, so a large run is never starved by small ones). The run's `devices`
  column keeps them; a run holds them while it is SETTING_UP or RUNNING, so every end (completed, failed,
  cancelled, a stopped server, recovery) frees them, and a run sent back to PENDING gets new ones when claimed.
- `trainer_env` gives the run's process CUDA_VISIBLE_DEVICES (its devices; "" on a CPU-only server) and
  CUDA_DEVICE_ORDER=PCI_BUS_ID unless the server's environment sets one, so the ids are nvidia-smi's.
- `train_command`: `n_gpus` 1 is `runrl train` as before; more is `runrl launch --multi_gpu --num_processes N`
  (accelerate's launcher, one process per GPU, a free rendezvous port each, so runs side by side never share one).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from typing import Any, Mapping, Sequence

GPU_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9:/._-]*")  # an index (0), a GPU-<uuid> or a MIG-<uuid>
NONE_WORDS = ("", "none")


def parse_gpus(text: str) -> tuple[str, ...]:
    """`--gpus 0,1,2,3` (indices or UUIDs); `none` or empty: no GPU. ValueError says what is wrong."""
    if text.strip().lower() in NONE_WORDS:
        return ()
    ids = [part.strip() for part in text.split(",")]
    for part in ids:
        if not GPU_ID.fullmatch(part):
            raise ValueError(f"{part!r} is not a GPU id" if part else "an empty GPU id (two commas, or a comma at "
                                                                      "an end)")
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"GPU {dupes[0]} is listed twice")
    return tuple(ids)


def detect_gpus(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The GPUs this machine gives the server: the operator's CUDA_VISIBLE_DEVICES when set (its entries up to
    the first invalid one, as CUDA reads it; "" or "-1": none), else one index per `nvidia-smi -L` GPU line;
    none when nvidia-smi is missing or fails."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = []
        for part in (p.strip() for p in visible.split(",")):
            if not GPU_ID.fullmatch(part) or part in ids:
                break
            ids.append(part)
        return tuple(ids)
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    if out.returncode != 0:
        return ()
    n = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    return tuple(str(i) for i in range(n))


def describe(gpus: Sequence[str] | None) -> str:
    if gpus is None:
        return "this server does not place runs on GPUs"
    if not gpus:
        return "this server has no GPU (CPU only)"
    return f"this server has {len(gpus)} GPU(s) ({','.join(gpus)})"


def requested(config: Mapping[str, Any]) -> int:
    """The GPUs (processes) a run's stored config asks for."""
    try:
        return max(1, int(config.get("n_gpus") or 1))
    except (TypeError, ValueError):
        return 1


def capacity(gpus: Sequence[str] | None) -> int:
    """The most GPUs one run can get here (a run without GPUs is one process)."""
    return max(1, len(gpus or ()))


def check_n_gpus(gpus: Sequence[str] | None, cfg: Any) -> str | None:
    """Why this server cannot run `cfg` (a RunConfig) on the GPUs it asks for, or None."""
    n = cfg.n_gpus or 1
    if n > capacity(gpus):
        if not gpus:
            return (f"asks for {n} GPUs, but {describe(gpus)}; n_gpus must be 1 here (the operator gives runs GPUs "
                    "with runrl serve --gpus)")
        return f"asks for {n} GPUs, but {describe(gpus)}; ask for at most {len(gpus)}"
    if n > 1 and cfg.prompts_per_step % n:
        return (f"{n} GPUs are {n} processes, and prompts_per_step={cfg.prompts_per_step} does not split over them; "
                f"use a prompts_per_step that is a multiple of {n}")
    return None


def free_devices(gpus: Sequence[str], held_rows: Sequence[Any]) -> list[str]:
    """`gpus` less those in the `devices` values ("0,1") of runs that hold GPUs, in `gpus` order."""
    held = {d for value in held_rows if value for d in str(value).split(",")}
    return [g for g in gpus if g not in held]


def trainer_env(gpus: Sequence[str] | None, devices: str | None) -> dict[str, str]:
    """Environment entries for a run's training process: its own GPUs only (none on a CPU-only server)."""
    if gpus is None:
        return {}
    env = {"CUDA_VISIBLE_DEVICES": devices or ""}
    if "CUDA_DEVICE_ORDER" not in os.environ:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's indices are then nvidia-smi's
    return env


def free_port() -> int:
    """A TCP port free on this machine now, for one multi-process run's rendezvous (torch's default, 29500, would
    make a second run side by side fail with 'address already in use')."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_options(n: int, port: int) -> list[str]:
    """accelerate launch's options for one run on `n` processes of this machine (one per visible GPU; on a CPU,
    `n` processes over gloo)."""
    return ["--multi_gpu", "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port)]


def train_command(train: Sequence[str], launch: Sequence[str], n: int, train_args: Sequence[str]) -> list[str]:
    """`train` (`runrl train`) + `train_args` for one process; `launch` (`runrl launch`) + accelerate's options +
    `train` + `train_args` for `n` > 1. The trainer's own options stay last, so more can be appended."""
    if n <= 1:
        return [*train, *train_args]
    return [*launch, *launch_options(n, free_port()), "train", *train_args]
