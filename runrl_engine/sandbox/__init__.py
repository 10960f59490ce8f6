"""Running untrusted user code (reward functions, environments) in sandboxed worker processes.

User code never runs in the trainer or the server process. Each `RewardSandbox` / `EnvSandbox` starts
`num_workers` long-lived workers (`_worker.py`, stdlib only, no torch); each loads the user module once, then
answers batched requests over pipes (JSON lines; nothing is unpickled). Every call has a wall-clock timeout
enforced by the parent: a worker that times out, crashes or misbehaves is killed and replaced, the item it was
running scores 0 with the reason in `error`, and the rest of its batch is retried elsewhere.

Threat model: the code is written by a user of this service and may be careless or hostile. Protected are the
trainer's secrets (API keys, `hf_token`, W&B keys, the server's data) and the host; not protected is the user's
own run (reward code can always return garbage). The mode is chosen at runtime (`detect_isolation`) and logged.

**bubblewrap mode** (`bwrap` installed and a trial sandbox starts), in addition to everything in fallback mode:
- own PID namespace: user code sees only its own sandbox's processes, so `/proc/<pid>/environ` of the trainer
  and of other workers cannot be read, and they cannot be signalled;
- a fresh root file system: read-only `/usr`, `/bin`, `/lib*`, a few `/etc` files (passwd, group, hosts,
  resolv.conf, TLS certificates, ld.so cache; not shadow), the Python installation and virtualenv, the
  requirements directory. Writable: only the worker's private directory (mounted at `/sandbox`, and its
  `tmp/` at `/tmp`). Home directories, the run directory, the server's data directory and caches such as
  `~/.cache/huggingface` are not there at all;
- `allow_network=False` (the default here; the run config decides for training): a private network
  namespace with only its own loopback, so neither the internet nor services on the host's 127.0.0.1 nor
  cloud metadata endpoints are reachable. `allow_network=True` shares the host network, loopback included;
- a user namespace with uid 65534 and no capabilities, and no nested user namespaces (hosts without
  unprivileged user namespaces: as root with all capabilities dropped).

**fallback mode** (plain subprocess), and in both modes:
- the environment is built from an allowlist (PATH, LANG, LC_*, TZ; HOME and TMPDIR = the private directory;
  PYTHONPATH = the requirements directory): no `*TOKEN*`, `*KEY*`, `*SECRET*`, `*PASSWORD*`, `RUNRL_*`,
  `HF_TOKEN`, `WANDB_API_KEY`, `OPENAI_API_KEY`;
- a fresh private working directory per worker process, deleted when the worker goes;
- limits set before user code runs: RLIMIT_DATA = `memory_mb` (heap and anonymous mappings), RLIMIT_CPU =
  `cpu_limit_s` per worker lifetime (a worker retires before reaching it and is replaced), RLIMIT_FSIZE =
  `file_size_mb` per file, no core files; the per-call timeout; its own session, killed as a group;
- workers die with the trainer, even when it is killed (bubblewrap's --die-with-parent; PR_SET_PDEATHSIG);
- if the trainer runs as root and user `nobody` can run the interpreter, the worker runs as uid 65534: it
  cannot read the trainer's `/proc/<pid>/environ`, cannot signal it, and RLIMIT_NPROC (256) applies.

**Not isolated** in fallback mode: file-system reads (anything the worker's uid can read) and writes
(anything it can write: as the trainer's own uid, that is everything the trainer can write), the network
(`allow_network=False` cannot be enforced; a warning is logged), and, when the worker runs as the trainer's
own uid, the trainer's process: its `/proc/<pid>/environ` (secrets it was started with) is readable and it can
be signalled or traced. A process that leaves the worker's session survives the kill.
**Not isolated in either mode**: the kernel (no seccomp filter), memory that RLIMIT_DATA does not count
(shared memory, tmpfs such as /dev/shm), total disk use of the private directory (only the size of each file
is capped), the number of processes unless the worker runs as `nobody` in fallback mode (RLIMIT_NPROC counts
per uid, and never applies to root), CPU and memory contention with the trainer (no cgroups).
"""

from __future__ import annotations

from runrl_engine.sandbox.env import EnvSandbox, EnvStart, EnvStep
from runrl_engine.sandbox.isolation import Isolation, detect_isolation, redact, worker_env
from runrl_engine.sandbox.pool import SandboxStats
from runrl_engine.sandbox.requirements import install_requirements
from runrl_engine.sandbox.reward import RewardResult, RewardSandbox
from runrl_engine.sandbox.static import UserCodeInfo, inspect_user_code
from runrl_engine.sandbox.validate import validate_user_code

__all__ = [
    "EnvSandbox", "EnvStart", "EnvStep", "Isolation", "RewardResult", "RewardSandbox", "SandboxStats",
    "UserCodeInfo", "detect_isolation", "inspect_user_code", "install_requirements", "redact",
    "validate_user_code", "worker_env",
]
