"""How sandbox workers are started: the scrubbed environment, the bubblewrap command, the fallback.

`detect_isolation()` picks the strongest mode this host allows, once per process: bubblewrap when `bwrap`
exists and a trial sandbox starts Python, otherwise a plain subprocess (dropped to `nobody` when we are root
and that user can run Python). `Launcher.spawn()` starts one worker in that mode. What each mode does and does
not isolate is stated in `runrl_engine/sandbox/__init__.py`; this module only builds the commands.

Not covered here: the worker protocol (`pool.py`), resource limits (set by the worker itself, `_worker.py`),
which variables count as secrets and how texts are redacted (`runrl_engine/secrets.py`).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import signal
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from runrl_engine.errors import UserError
from runrl_engine.sandbox.egress import EGRESS_PORT, EGRESS_SOCKET_INSIDE, EgressUnavailable, proxy_env
from runrl_engine.secrets import is_secret_name

WORKER_SCRIPT = Path(__file__).resolve().with_name("_worker.py")
SANDBOX_DIR_INSIDE = "/sandbox"  # where the private directory appears inside bubblewrap
NOBODY = 65534

_ALLOWED_VARS = ("PATH", "LANG", "LANGUAGE", "TZ")
# pip needs its index and proxy settings; only the installer gets these, never the reward workers.
_PIP_VARS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_FIND_LINKS", "PIP_CERT",
             "PIP_NO_INDEX", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
             "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")
_NEVER_BIND = frozenset({"/", "/home", "/root", "/tmp", "/var", "/etc", "/srv", "/mnt", "/opt", "/usr"})
_ETC_FILES = ("passwd", "group", "hosts", "host.conf", "nsswitch.conf", "resolv.conf", "gai.conf", "services",
              "protocols", "localtime", "timezone", "ssl", "ca-certificates", "pki", "ld.so.cache", "ld.so.conf",
              "ld.so.conf.d", "alternatives", "mime.types", "os-release", "locale.alias")


def worker_env(home: str, pythonpath: Sequence[str] = (), *, for_pip: bool = False) -> dict[str, str]:
    """The whole environment of a worker, built from an allowlist (never a copy of ours minus a denylist)."""
    env: dict[str, str] = {}
    allowed = _ALLOWED_VARS + (_PIP_VARS if for_pip else ())
    for name, value in os.environ.items():
        if (name in allowed or name.startswith("LC_")) and not is_secret_name(name):
            env[name] = value
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(HOME=home, TMPDIR=home, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return env


# ------------------------------------------------------------------------------------------- memory cgroups

SHM_MB = 64  # size of the private tmpfs on /dev/shm inside bubblewrap
CGROUP_HEADROOM_MB = 256  # on top of RLIMIT_DATA + SHM_MB: interpreter pages, page cache of files written
_CGROUP_PREFIX = "runrl-sandbox-"
_cgroup_counter = itertools.count()


@functools.lru_cache(maxsize=None)
def memory_cgroup_base() -> tuple[Path, str] | None:
    """(our own memory cgroup directory, "v1" | "v2") when we may create child cgroups in it, else None.

    A worker in its own child cgroup has *all* its memory counted against the limit: shared mappings, memfd,
    tmpfs pages, which RLIMIT_DATA does not see. v1: the `memory` hierarchy, writable (root in most
    containers). v2: only where `memory` is already enabled for our cgroup's children (a delegated subtree)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "" and rel:  # v2
            root = Path("/sys/fs/cgroup")
            if not (root / "cgroup.controllers").exists():
                root = root / "unified"
            base, version, limit_file = root / rel.lstrip("/"), "v2", "memory.max"
            try:
                if "memory" not in (base / "cgroup.subtree_control").read_text().split():
                    continue
            except OSError:
                continue
        elif "memory" in controllers.split(","):
            base, version, limit_file = Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), "v1", "memory.limit_in_bytes"
        else:
            continue
        probe = base / f"{_CGROUP_PREFIX}{os.getpid()}-probe"
        try:
            probe.mkdir(exist_ok=True)
            ok = (probe / limit_file).exists()
            probe.rmdir()
        except OSError:
            continue
        if ok:
            return base, version
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_memory_cgroup(limit_mb: int, owner: int | None = None) -> Path | None:
    """A fresh child cgroup limited to `limit_mb` (swap included where the host counts it), or None when the
    host gives us none. Empty cgroups left by trainers that died are removed first. `owner`: a uid that
    must be able to move itself in (the unprivileged fallback worker)."""
    found = memory_cgroup_base()
    if found is None:
        return None
    base, version = found
    for stale in base.glob(f"{_CGROUP_PREFIX}*"):
        pid = stale.name[len(_CGROUP_PREFIX):].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            release_memory_cgroup(stale)
    path = base / f"{_CGROUP_PREFIX}{os.getpid()}-{next(_cgroup_counter)}"
    limit = str(limit_mb * 1024 * 1024)
    try:
        path.mkdir()
        if version == "v1":
            (path / "memory.limit_in_bytes").write_text(limit)
            for name in ("memory.memsw.limit_in_bytes",):  # only where swap accounting exists
                if (path / name).exists():
                    (path / name).write_text(limit)
        else:
            (path / "memory.max").write_text(limit)
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
        if owner is not None:
            os.chown(path / "cgroup.procs", owner, owner)
    except OSError:
        release_memory_cgroup(path)
        return None
    return path


def release_memory_cgroup(path: Path | None, *, kill: bool = False) -> None:
    """Remove a worker's cgroup. With `kill`, first SIGKILL every process still in it (one that left the
    worker's session or process group too); otherwise a busy cgroup is left for the next sweep."""
    if path is None:
        return
    if kill:
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            pids = []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    try:
        path.rmdir()
    except OSError:
        pass


# ------------------------------------------------------------------------------------------- launching


class IsolationUnavailable(UserError):
    """`isolation="bwrap"` was required and bubblewrap cannot start a sandbox here: user code does not run."""

    def __init__(self, reason: str):
        super().__init__(f"user code must run in a bubblewrap sandbox, and none can start on this host ({reason})",
                         where="sandbox_isolation",
                         fix="install bubblewrap (`apt install bubblewrap`) and allow it user namespaces, or, on a "
                             "machine only you use, set sandbox_isolation: auto (the operator of `runrl serve` "
                             "can allow that with --allow-unisolated)")


@dataclass(frozen=True)
class Isolation:
    """The mode workers start in. `bwrap_flags` is the user-namespace variant that worked in the trial."""

    mode: str  # "bwrap" | "subprocess"
    bwrap: str | None = None
    bwrap_flags: tuple[str, ...] = ()
    run_as: int | None = None  # fallback only: uid/gid to drop to (we are root and `nobody` can run Python)
    reason: str = ""

    def describe(self, allow_network: bool) -> str:
        if self.mode == "bwrap":
            net = "network allowed" if allow_network else "no network"
            return f"bubblewrap sandbox (pid/mount/ipc namespaces, {net})"
        who = f"as uid {self.run_as}" if self.run_as is not None else "as the trainer's own user"
        return (f"plain subprocess {who} with rlimits; NOT isolated: filesystem reads, network"
                f"{'' if self.run_as is not None else ', /proc of the trainer'} ({self.reason})")


def _python_paths() -> list[str]:
    """Host directories the worker's interpreter needs (prefixes, site-packages), minimal and deduplicated."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))}
    try:
        candidates.update(site.getsitepackages())
    except AttributeError:  # some embedded/virtualenv builds lack it
        pass
    paths = set()
    for p in candidates:
        # Never a whole tree that holds other things (an interpreter installed as /usr is covered by /usr).
        real = os.path.realpath(p) if p else ""
        if real and os.path.exists(real) and real not in _NEVER_BIND and os.path.dirname(real) != "/home" \
                and real != os.path.realpath(os.path.expanduser("~")):
            paths.add(os.path.abspath(p))
            paths.add(os.path.realpath(p))
    ordered = sorted(paths)
    return [p for p in ordered if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in ordered)]


def _bwrap_command(bwrap: str, flags: Sequence[str], *, allow_network: bool, private: Sequence[str],
                   ro_paths: Sequence[str], rw_paths: Sequence[str] = ()) -> list[str]:
    """bwrap arguments up to `--`. `private`: the mounts of /sandbox and /tmp (bind or tmpfs arguments)."""
    cmd = [bwrap, *flags, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
           "--hostname", "sandbox", "--die-with-parent", "--new-session"]
    if not allow_network:
        cmd.append("--unshare-net")
    cmd += ["--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            cmd += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            cmd += ["--ro-bind", d, d]
    for name in _ETC_FILES:
        cmd += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    # /tmp before the host paths: a path under the host's /tmp (a venv, a requirements dir) is then mounted
    # on top of the private /tmp instead of being hidden by it.
    # /dev/shm is a small private tmpfs: shared memory written there is bounded (and dies with the sandbox).
    cmd += ["--proc", "/proc", "--dev", "/dev", "--size", str(SHM_MB * 1024 * 1024), "--tmpfs", "/dev/shm",
            *private]
    bound = ["/usr"]
    for p in [*_python_paths(), *ro_paths]:
        if not any(p == b or p.startswith(b.rstrip("/") + "/") for b in bound):
            cmd += ["--ro-bind", p, p]
            bound.append(p)
    for p in rw_paths:
        cmd += ["--bind", p, p]
    return cmd


@functools.lru_cache(maxsize=None)
def detect_isolation(prefer: str = "auto") -> Isolation:
    """Find the strongest mode that works here. `prefer`: "auto", "bwrap" (fail if unusable) or "subprocess"."""
    if prefer not in ("auto", "bwrap", "subprocess"):
        raise ValueError(f"isolation must be auto, bwrap or subprocess, not {prefer!r}")
    reason = "requested"
    if prefer != "subprocess":
        bwrap = shutil.which("bwrap")
        reason = "bwrap not installed"
        if bwrap:
            # Prefer a user namespace with an unprivileged uid inside: as root, bwrap otherwise keeps every
            # capability in the sandbox. Without user namespaces, root can still drop all capabilities.
            variants: list[tuple[str, ...]] = [("--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY),
                                                "--disable-userns")]
            if os.geteuid() == 0:
                variants.append(("--cap-drop", "ALL"))
            for flags in variants:
                probe = [*_bwrap_command(bwrap, flags, allow_network=False, ro_paths=[str(WORKER_SCRIPT)],
                                         private=["--tmpfs", SANDBOX_DIR_INSIDE, "--tmpfs", "/tmp"]),
                         "--chdir", SANDBOX_DIR_INSIDE, "--", sys.executable, "-s", "-c", "pass"]
                try:
                    done = subprocess.run(probe, capture_output=True, timeout=20, env=worker_env("/"))
                except (OSError, subprocess.TimeoutExpired) as exc:
                    reason = f"bwrap trial failed: {exc}"
                    continue
                if done.returncode == 0:
                    return Isolation("bwrap", bwrap=bwrap, bwrap_flags=flags)
                reason = f"bwrap trial failed: {done.stderr.decode(errors='replace').strip()[-300:]}"
        if prefer == "bwrap":
            raise IsolationUnavailable(reason)
    run_as = None
    if os.geteuid() == 0:
        # Dropping to `nobody` stops user code from reading the trainer's /proc/<pid>/environ and from
        # signalling it; it only works if that user can reach the interpreter and our worker script.
        probe = [sys.executable, "-s", "-c", "import sys; open(sys.argv[1]).close()", str(WORKER_SCRIPT)]
        try:
            done = subprocess.run(probe, capture_output=True, timeout=20, user=NOBODY, group=NOBODY,
                                  extra_groups=[], cwd="/", env=worker_env("/"))
            run_as = NOBODY if done.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            run_as = None
        if run_as is None:
            reason += "; cannot drop to nobody (interpreter not readable by it)"
    return Isolation("subprocess", run_as=run_as, reason=reason)


@dataclass(frozen=True)
class Launcher:
    """Starts one worker process in the chosen isolation mode."""

    isolation: Isolation
    allow_network: bool = False
    requirements_dir: Path | None = None
    limits: dict | None = None  # {"data_mb", "cpu_s", "fsize_mb", "nproc"}, applied by the worker to itself
    # A filtered network (bubblewrap only): the egress proxy's Unix socket on the host. The sandbox then gets
    # no network of its own and reaches out only through it (not the pip sandbox, which keeps the host's).
    egress_socket: Path | None = None

    def spawn(self, private_dir: Path, *, role: str = "reward", extra_args: Sequence[str] = (),
              extra_ro: Sequence[str] = (), extra_rw: Sequence[str] = (), pipe_stdin: bool = True) -> subprocess.Popen:
        """`private_dir` is the worker's cwd, HOME and TMPDIR; only it (and `extra_rw`) is writable in bwrap mode."""
        iso = self.isolation
        limits = dict(self.limits or {})
        if not (iso.mode == "subprocess" and iso.run_as is not None):
            # RLIMIT_NPROC counts every process of the uid; only a dedicated uid makes it a worker limit.
            limits.pop("nproc", None)
        # Without bubblewrap's --die-with-parent, the worker asks the kernel to kill it when we die.
        wants_network = self.allow_network or role == "pip"  # pip must reach the package index
        egress = self.egress_socket is not None and wants_network
        if egress and iso.mode != "bwrap":
            raise EgressUnavailable(iso.reason or "plain subprocess mode")
        config = json.dumps({"role": role, "limits": limits, "die_with_parent": iso.mode != "bwrap",
                             **({"egress": {"socket": EGRESS_SOCKET_INSIDE, "port": EGRESS_PORT}} if egress else {})})
        req = [str(self.requirements_dir)] if self.requirements_dir else []
        (private_dir / "tmp").mkdir(exist_ok=True)
        if iso.mode == "bwrap":
            assert iso.bwrap is not None
            network = wants_network and not egress
            private = ["--bind", str(private_dir), SANDBOX_DIR_INSIDE, "--bind", str(private_dir / "tmp"), "/tmp"]
            cmd = _bwrap_command(iso.bwrap, iso.bwrap_flags, allow_network=network, private=private,
                                 ro_paths=[str(WORKER_SCRIPT), *req, *extra_ro], rw_paths=extra_rw)
            if egress:
                cmd += ["--ro-bind", str(self.egress_socket), EGRESS_SOCKET_INSIDE]
            cmd += ["--chdir", SANDBOX_DIR_INSIDE, "--"]
            home, cwd = SANDBOX_DIR_INSIDE, None
        else:
            cmd, home, cwd = [], str(private_dir), str(private_dir)
        cmd += [sys.executable, "-s", str(WORKER_SCRIPT), config, *extra_args]
        env = worker_env(home, req, for_pip=role == "pip")
        if egress:
            env.update(proxy_env(EGRESS_PORT))
        kwargs: dict = {}
        unprivileged = iso.mode == "subprocess" and iso.run_as is not None
        if unprivileged:
            for path in [private_dir, private_dir / "tmp", *map(Path, extra_rw)]:
                os.chown(path, iso.run_as, iso.run_as)
            kwargs.update(user=iso.run_as, group=iso.run_as, extra_groups=[])
        cgroup = None
        if limits.get("data_mb"):
            cgroup = create_memory_cgroup(int(limits["data_mb"]) + SHM_MB + CGROUP_HEADROOM_MB,
                                          owner=iso.run_as if unprivileged else None)
        if cgroup is not None:
            # The shell joins the cgroup, then becomes the worker (or bwrap): everything it starts is inside.
            cmd = ["/bin/sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh", str(cgroup / "cgroup.procs"), *cmd]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if pipe_stdin else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
                                    start_new_session=True, close_fds=True, **kwargs)
        except BaseException:
            release_memory_cgroup(cgroup)
            raise
        proc.memory_cgroup = cgroup  # type: ignore[attr-defined]  (released by the pool with the worker)
        return proc


def descendants(pid: int) -> list[int]:
    """Host pids below `pid` (used to reach the Python worker inside bwrap's pid namespace)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            tids = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            stack += kids
    return found


def host_pid(root_pid: int, inner_pid: int) -> int | None:
    """The host pid of the process that calls itself `inner_pid` inside the sandbox below `root_pid`."""
    for pid in [root_pid, *descendants(root_pid)]:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("NSpid:"):
                        if int(line.split()[-1]) == inner_pid:
                            return pid
                        break
        except (OSError, ValueError):
            continue
    return None
