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
- `allow_network=False` (the default here; the run config decides for training, and `runrl serve` forces it
  unless the operator passes --allow-user-network): a private network namespace with only its own loopback,
  so neither the internet nor services on the host's 127.0.0.1 nor cloud metadata endpoints are reachable.
  `allow_network=True` with an `egress` policy (`reward_network: filtered`; `runrl serve` always sets it):
  the same private namespace, and the only way out is an HTTP proxy in the trainer (`egress.py`) reached
  through a Unix socket bound into the sandbox, set in HTTP(S)_PROXY/ALL_PROXY. It serves CONNECT tunnels
  and plain-HTTP requests and connects only to addresses the policy allows (`netpolicy.py`: public ones,
  plus explicit exceptions; loopback, private ranges, link-local/metadata denied), checking every address a
  name resolves to and connecting to the checked address; refusals are 403 with the reason. Raw sockets,
  UDP and DNS have no route. Not filtered: what an allowed tunnel carries. `allow_network=True` with no
  policy (`reward_network: host`, the `runrl train` default) shares the host network: loopback, private
  ranges and metadata endpoints are then reachable, unfiltered (which is why everything the server starts
  that listens demands a credential). The pip build of `package_requirements` always has the host network;
- a user namespace with uid 65534 and no capabilities, and no nested user namespaces (hosts without
  unprivileged user namespaces: as root with all capabilities dropped);
- `/dev/shm` is a private 64 MiB tmpfs (`isolation.SHM_MB`), gone with the sandbox.

**memory cgroup** (both modes, where the host lets us create one: cgroup v1's memory hierarchy writable, or
cgroup v2 with `memory` delegated to our children): each worker runs in its own child cgroup limited to
`memory_mb` + 64 + 256 MiB, so shared mappings (`MAP_SHARED`, memfd) and tmpfs pages count too; going over
kills the worker (its item scores 0, "killed by SIGKILL"). Without one, only RLIMIT_DATA applies.

**Failing closed**: `isolation="bwrap"` (config key `sandbox_isolation`; `runrl serve` forces it unless started
with --allow-unisolated) refuses to start any worker, pip build or validation when bubblewrap cannot start a
sandbox here (`IsolationUnavailable`, a UserError naming `sandbox_isolation`). `isolation="auto"` (the
default for `runrl train` on your own machine) falls back to a plain subprocess with a logged warning.

**fallback mode** (plain subprocess), and in both modes:
- the environment is built from an allowlist (PATH, LANG, LC_*, TZ; HOME and TMPDIR = the private directory;
  PYTHONPATH = the requirements directory): no `*TOKEN*`, `*KEY*`, `*SECRET*`, `*PASSWORD*`, `RUNRL_*`,
  `HF_TOKEN`, `WANDB_API_KEY`, `OPENAI_API_KEY`. The one way in for the run's own secrets is `reward_secrets`
  (`secret_env`): sent with the `load` request over the worker's private pipe and set in its `os.environ` before
  the user module runs, so they are in neither its command line nor its initial `/proc/<pid>/environ`; their
  values are redacted from error texts and reward info strings like every other secret;
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
be signalled or traced. A process that leaves the worker's session survives the kill, unless the worker
has a memory cgroup (then everything in it is killed when the worker goes).
**Not isolated in either mode**: the kernel (no seccomp filter); without a memory cgroup, memory that
RLIMIT_DATA does not count (shared mappings, memfd; and in fallback mode the host's /dev/shm); total disk
use of the private directory (only the size of each file is capped); the number of processes unless the
worker runs as `nobody` in fallback mode (RLIMIT_NPROC counts per uid, and never applies to root); CPU
contention with the trainer (no CPU cgroup); with network allowed and no egress policy, which destinations
are reached (a filtered network needs bubblewrap: `EgressUnavailable` refuses to start without it).

Rewards: only finite numbers within ±1e15 (`pool.MAX_ABS_REWARD`, checked in the worker and again in the
parent, since user code can write to the protocol pipe) are used; anything else scores 0 as an error.
`package_requirements` are requirement specifiers only (`requirements.check_requirements`), never paths.
"""

from __future__ import annotations

from runrl_engine.sandbox.env import EnvSandbox, EnvStart, EnvStep
from runrl_engine.sandbox.isolation import Isolation, IsolationUnavailable, detect_isolation, worker_env
from runrl_engine.sandbox.pool import SandboxStats
from runrl_engine.sandbox.requirements import install_requirements
from runrl_engine.sandbox.reward import RewardResult, RewardSandbox
from runrl_engine.sandbox.static import UserCodeInfo, inspect_user_code
from runrl_engine.sandbox.validate import validate_user_code
from runrl_engine.secrets import redact

__all__ = [
    "EnvSandbox", "EnvStart", "EnvStep", "Isolation", "IsolationUnavailable", "RewardResult", "RewardSandbox", "SandboxStats",
    "UserCodeInfo", "detect_isolation", "inspect_user_code", "install_requirements", "redact",
    "validate_user_code", "worker_env",
]
