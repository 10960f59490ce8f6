"""Server settings: one frozen dataclass, built by `runrl serve` or by tests."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

MAX_UPLOAD_BYTES = 50 * 1024 * 1024


def default_slots() -> int:
    """One concurrent run per GPU the server has (server/gpus.py `detect_gpus`), else 1; without importing torch."""
    from server.gpus import detect_gpus

    return max(1, len(detect_gpus()))


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    slots: int = 1
    # The training command; the worker appends `CONFIG --output RUN_DIR`. Tests about the queue alone may
    # substitute a stand-in; everything else uses the real `runrl train`.
    train_command: tuple[str, ...] = (sys.executable, "-m", "runrl_engine.cli", "train")
    # GPU placement (server/gpus.py; `runrl serve --gpus`, detected by default): the device ids (CUDA_VISIBLE_DEVICES
    # entries) runs are placed on, each run on `n_gpus` of them that no other run holds, given to its process as its
    # CUDA_VISIBLE_DEVICES; () = CPU only (runs see no GPU). None = no placement: runs inherit the server's
    # environment and n_gpus must be 1 (a Settings built by hand, e.g. in tests). `slots` still caps runs at once.
    gpus: tuple[str, ...] | None = None
    # Runs with n_gpus > 1: the worker appends accelerate launch's options, `train` and the train arguments.
    launch_command: tuple[str, ...] = (sys.executable, "-m", "runrl_engine.cli", "launch")
    start_worker: bool = True
    poll_interval_s: float = 0.5
    lease_s: float = 30.0
    cancel_grace_s: float = 5.0
    # How often a run whose training process vanished (server restart or kill, expired lease, trainer killed by a
    # signal such as the OOM killer's SIGKILL) is resumed from its last checkpoint before it ends FAILED
    # (server/queue.py; `runrl serve --max-resumes`). A graceful server shutdown is not counted.
    max_resumes: int = 3
    # Where claimed runs train (server/executor.py; `runrl serve --executor`): "local", a subprocess of this server
    # on its own GPUs, or "ray", a Ray job on the cluster whose job server (dashboard) is `ray_address`
    # (`--ray-address http://head:8265`; server/ray_executor.py). With ray, `runs_dir` must be mounted at the same
    # path on every Ray node, each run asks Ray for `ray_cpus_per_run` CPUs, `ray_memory_mb` MiB of memory (0: no
    # reservation) and its n_gpus GPUs (none with `--gpus none`), and a run whose job server stays unreachable for
    # `ray_grace_s` seconds is resumed (bounded by max_resumes) or failed.
    executor: str = "local"
    ray_address: str = ""
    ray_cpus_per_run: float = 1.0
    ray_memory_mb: int = 0
    ray_grace_s: float = 60.0
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    public_url: str = ""  # base for download/preview URLs and deployment api_url; "" = from each request
    deploy_command: tuple[str, ...] = (sys.executable, "-m", "server.deploy")
    extra_env: dict[str, str] = field(default_factory=dict)
    # Server-Sent Event streams (a run's logs, a deployment's streamed chat) send a keepalive (one empty line,
    # server/sse.py) after this many seconds without an event, so a client's read timeout (the SDK's httpx: 30 s)
    # or a proxy's idle timeout never fires while a run is queued or silent. SSE clients and the SDK skip it.
    sse_keepalive_s: float = 15.0

    # ---- security policy (issue 16). `runrl serve` flags set these; the defaults are the safe ones. --------
    # User code (reward functions, environments, pip builds, validation) runs only in a working bubblewrap
    # sandbox; without one, runs and validation that execute user code are refused with a clear error.
    require_isolation: bool = True
    # Whether a run may set `reward_allow_network: true` (otherwise it is forced off: no network at all).
    allow_user_network: bool = False
    # `package_requirements` entries that are URLs (`name @ https://...`); never host paths.
    allow_url_requirements: bool = False
    # Outbound destinations the server or a run's trainer connects to for users (MCP tools, test-mcp,
    # webhooks): public addresses are allowed; loopback, private, link-local and other special ranges only
    # when `allow_private_destinations` or when listed in `allowed_destinations` ("host:port", "host" or a CIDR).
    allow_private_destinations: bool = False
    allowed_destinations: tuple[str, ...] = ()
    # Request bodies: JSON bodies are capped at `max_json_bytes` (routes that carry file content at
    # `max_upload_bytes`), before parsing, streamed bodies too; JSON nesting deeper than `max_json_depth` is a 422.
    max_json_bytes: int = 1024 * 1024
    max_json_depth: int = 64
    # Validation of user code: its own bounded pool, a per-user cap, a smaller memory limit per sandbox.
    validation_workers: int = 4
    validation_per_user: int = 2
    validation_memory_mb: int = 1024
    # Failed authentications per client address per minute before 429s.
    auth_failures_per_minute: int = 30

    # Create-run ranges: by default a self-hosted server accepts what the engine accepts (RunConfig's bounds,
    # e.g. completion_length 1..32768); True keeps RunRL's hosted ranges for completion_length (128..8192),
    # epochs (1..100) and learning_rate_multiplier (0.1..10) (`runrl serve --hosted-ranges`).
    hosted_ranges: bool = False

    # ---- webhooks (issue 15; server/webhooks.py) ------------------------------------------------------------
    # A delivery is tried up to `webhook_attempts` times in all, each attempt bounded by `webhook_timeout_s`
    # (connect, send and answer together), waiting `webhook_backoff_s` * 1, 2, 4, ... between attempts (the
    # defaults: 5 attempts, 10 s each, waits of 1, 2, 4 and 8 s). At most `webhook_concurrency` attempts are in
    # flight at once; beyond `webhook_max_pending` deliveries pending at once, new ones are dropped (recorded).
    # Target URLs follow allow_private_destinations / allowed_destinations above.
    webhook_attempts: int = 5
    webhook_timeout_s: float = 10.0
    webhook_backoff_s: float = 1.0
    webhook_concurrency: int = 16
    webhook_max_pending: int = 10_000
    max_webhooks_per_user: int = 20

    @property
    def db_path(self) -> Path:
        return self.data_dir / "runrl.db"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"
