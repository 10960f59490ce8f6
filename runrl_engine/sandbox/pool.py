"""A pool of long-lived worker processes running one user module, driven by a selector loop in the caller.

`WorkerPool` owns the mechanics every kind of user code shares: starting workers in parallel (each loads the
module once), non-blocking JSON-lines I/O over pipes, per-request deadlines, killing a worker that times out or
misbehaves (after asking it for a traceback), replacing dead workers, and cleaning up. Subclasses
(`RewardSandbox`, `EnvSandbox`) decide what to send and whom to blame when a worker is lost.

Not thread-safe: one caller drives the loop. Nothing here unpickles or evaluates worker output; a worker that
writes anything but well-formed protocol lines is killed.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from runrl_engine.errors import UserCodeError
from runrl_engine.netpolicy import DestinationPolicy
from runrl_engine.sandbox.egress import EgressProxy, EgressUnavailable
from runrl_engine.sandbox.isolation import Isolation, Launcher, detect_isolation, host_pid, release_memory_cgroup
from runrl_engine.sandbox.static import UserCodeInfo, inspect_user_code
from runrl_engine.secrets import env_secret_values, redact

_READ_CHUNK = 1 << 16
_MAX_LINE = 64 << 20  # a reply longer than this is a misbehaving worker, not a result
_ERR_TAIL = 16 << 10
_ERROR_TEXT_MAX = 4000
_PoolT = TypeVar("_PoolT", bound="WorkerPool")
_NETWORK_SIGNS = ("Network is unreachable", "Temporary failure in name resolution", "Name or service not known",
                  "Connection refused", "gaierror", "ConnectError", "APIConnectionError")


# A concurrent worker's in-process timeout fires at timeout_s; the parent's kill waits this much longer.
CONCURRENT_GRACE_S = 1.0

# The largest reward magnitude accepted from user code (and for an episode's summed step rewards): training
# keeps rewards in float32, and their group statistics, advantages and losses must stay finite there.
MAX_ABS_REWARD = 1e15


def usable_reward(value: object) -> bool:
    """A finite number within ±MAX_ABS_REWARD (bools are not rewards)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= MAX_ABS_REWARD)


@dataclass
class SandboxStats:
    """Counters since the pool started; the trainer logs them per step as differences."""

    items: int = 0      # calls scored / steps taken
    errors: int = 0     # items that ended with an error (any cause)
    timeouts: int = 0   # items that ran past timeout_s
    crashes: int = 0    # workers that died under an item or while idle
    restarts: int = 0   # replacement workers started (crashes, timeouts, CPU-budget recycling)


class _Worker:
    """One worker process and its buffers; `outstanding` holds the request keys it owes answers for."""

    def __init__(self, slot: int, proc: subprocess.Popen, private_dir: Path):
        assert proc.stdin and proc.stdout and proc.stderr
        self.slot, self.proc, self.dir = slot, proc, private_dir
        self.in_fd, self.out_fd, self.err_fd = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
        for fd in (self.in_fd, self.out_fd, self.err_fd):
            os.set_blocking(fd, False)
        self.state = "starting"  # starting -> idle <-> busy -> dead
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.err = bytearray()
        self.err_mark = 0     # len(err) when the current request started: its stderr is err[err_mark:]
        self.err_dropped = 0  # bytes trimmed from the front of err
        self.outstanding: list[Any] = []
        self.batch = False
        self.deadline = math.inf
        self.inner_pid: int | None = None
        self.retiring = ""  # why the worker said it will exit: "cpu" (its CPU budget) or "timeout" (a stuck thread)
        self.started = time.monotonic()

    def stderr_since_mark(self, limit: int = 1500) -> str:
        start = max(0, self.err_mark - self.err_dropped)
        text = bytes(self.err[start:]).decode("utf-8", errors="replace").strip()
        return text if len(text) <= limit else "..." + text[-limit:]


def _kill_all(procs: dict[int, subprocess.Popen], root: Path | None, egress: EgressProxy | None = None) -> None:
    """Finalizer: no worker (nor the egress proxy) outlives its pool, even when close() was never called."""
    for proc in list(procs.values()):
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # each worker leads its own process group
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        _release_cgroup(proc)
    procs.clear()
    if egress is not None:
        egress.close()
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def _release_cgroup(proc: subprocess.Popen) -> None:
    """Remove the worker's memory cgroup once its processes are gone (waits up to 5 s for the kill to land)."""
    cgroup = getattr(proc, "memory_cgroup", None)
    if cgroup is None:
        return
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass
    # whatever is still inside (a process that left the session) is killed too; a process that touched a large
    # shared mapping can take a few seconds to leave after SIGKILL on a loaded host (its pages are torn down first)
    deadline = time.monotonic() + 5.0
    while True:
        release_memory_cgroup(cgroup, kill=True)
        if not cgroup.exists() or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def describe_exit(returncode: int | None, bwrap: bool) -> str:
    if returncode is None:
        return "it stopped answering"
    signum = -returncode if returncode < 0 else (returncode - 128 if bwrap and returncode > 128 else 0)
    if signum:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        hint = {"SIGKILL": " (out of memory, or killed)", "SIGXCPU": " (CPU-time limit)",
                "SIGSEGV": " (segmentation fault in native code)"}.get(name, "")
        return f"killed by {name}{hint}"
    return f"exit code {returncode}"


class WorkerPool:
    """Workers that load `code_path` once each and answer JSON requests; see the module docstring."""

    kind = "function"  # static-check mode: "function" (reward code) or "environment"

    def __init__(self, code_path: Path, *, num_workers: int = 2, timeout_s: float = 30.0, memory_mb: int = 4096,
                 requirements_dir: Path | None = None, allow_network: bool = False, secrets: Sequence[str] = (),
                 log: Callable[[str], None] | None = None, work_dir: Path | None = None,
                 isolation: str = "auto", load_timeout_s: float = 120.0, cpu_limit_s: float = 3600.0,
                 file_size_mb: int = 1024, display_name: str | None = None,
                 egress: DestinationPolicy | None = None, concurrency: int = 1, sync_threads: bool = False,
                 secret_env: dict[str, str] | None = None):
        if num_workers < 1 or timeout_s <= 0 or concurrency < 1:
            raise ValueError("num_workers and concurrency must be >= 1 and timeout_s > 0")
        # Calls in flight per worker (reward_fn only; the worker says in `ready` what applies to the loaded code)
        # and the variables set in each worker's environment before the code loads (RunConfig reward_secrets).
        self.concurrency_limit, self.sync_threads = int(concurrency), bool(sync_threads)
        self.concurrency = 1
        self.secret_env = dict(secret_env or {})
        code_path = Path(code_path)
        self.display_name = display_name or str(code_path)
        self.source = code_path.read_text(encoding="utf-8-sig")
        self.info: UserCodeInfo = inspect_user_code(self.source, mode=self.kind, filename=self.display_name)
        self.num_workers, self.timeout_s, self.load_timeout_s = num_workers, float(timeout_s), load_timeout_s
        self.allow_network = allow_network
        self.secrets = [*secrets, *self.secret_env.values(), *env_secret_values()]
        self._log = log or (lambda message: None)
        self.stats = SandboxStats()
        self.isolation: Isolation = detect_isolation(isolation)
        self.mode = self.isolation.mode
        if requirements_dir is not None and not Path(requirements_dir).is_dir():
            raise FileNotFoundError(f"requirements_dir {requirements_dir} does not exist")
        filtered = egress is not None and allow_network
        if filtered and self.mode != "bwrap":
            raise EgressUnavailable(self.isolation.reason or "plain subprocess mode")
        limits = {"data_mb": memory_mb, "cpu_s": cpu_limit_s, "fsize_mb": file_size_mb, "nproc": 256}
        if work_dir is not None:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
        self._root = Path(tempfile.mkdtemp(prefix="runrl-sandbox-", dir=work_dir)).resolve()
        if self.isolation.run_as is not None:
            os.chmod(self._root, 0o711)  # the unprivileged worker must be able to reach its own directory
        # Filtered network: user code's only way out is this proxy (see egress.py), closed with the pool.
        self.egress: EgressProxy | None = None
        if filtered:
            assert egress is not None
            try:
                self.egress = EgressProxy(egress, self._root / "egress.sock", log=log)
            except BaseException:
                shutil.rmtree(self._root, ignore_errors=True)
                raise
        self._launcher = Launcher(self.isolation, allow_network=allow_network,
                                  requirements_dir=Path(requirements_dir).resolve() if requirements_dir else None,
                                  limits=limits, egress_socket=self.egress.path if self.egress else None)
        self._sel = selectors.DefaultSelector()
        self._workers: list[_Worker | None] = [None] * num_workers
        self._procs: dict[int, subprocess.Popen] = {}
        self._finalizer = weakref.finalize(self, _kill_all, self._procs, self._root, self.egress)
        self._closed = False
        self.contract: str | None = None
        self.entry: str | None = None
        self._load_error: str | None = None
        self._init_state()
        net = "" if self.mode == "bwrap" or allow_network else " (allow_network=False cannot be enforced here)"
        if self.egress is not None:
            net = (f"; network only through its egress proxy: public addresses"
                   f"{', and private ones' if egress and egress.allow_private else ''}"
                   f"{', and ' + ', '.join(egress.allowed) if egress and egress.allowed else ''}")
        self._log(f"user code sandbox: {self.isolation.describe(allow_network)}{net}; {num_workers} worker(s)")
        started = time.monotonic()
        try:
            self._start_all()
        except BaseException:
            self.close()
            raise
        self._log(f"user code loaded in {num_workers} worker(s) in {time.monotonic() - started:.2f} s "
                  f"(contract: {self.contract})")

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def __enter__(self: _PoolT) -> _PoolT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (EOF first, SIGKILL after a short grace) and delete the private directories."""
        if self._closed:
            return
        self._closed = True
        live = [w for w in self._workers if w is not None]
        for w in live:
            try:
                if w.proc.stdin is not None:
                    w.proc.stdin.close()  # EOF: an idle worker exits on its own
            except OSError:
                pass
        deadline = time.monotonic() + 0.5
        for w in live:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._discard(w)
        self._sel.close()
        self._finalizer()

    def _start_all(self) -> None:
        for slot in range(self.num_workers):
            self._spawn(slot)
        self._wait_ready()
        if self._load_error is not None:
            raise UserCodeError(f"loading the code failed:\n{self._load_error}", where=self.display_name,
                                fix="fix the error above; the file is executed once per worker at start-up")

    def _wait_ready(self) -> None:
        while any(w is not None and w.state == "starting" for w in self._workers):
            self._pump()

    def _spawn(self, slot: int) -> None:
        private_dir = Path(tempfile.mkdtemp(prefix=f"w{slot}-", dir=self._root))
        proc = self._launcher.spawn(private_dir)
        w = _Worker(slot, proc, private_dir)
        self._procs[proc.pid] = proc
        self._workers[slot] = w
        self._sel.register(w.out_fd, selectors.EVENT_READ, (w, "out"))
        self._sel.register(w.err_fd, selectors.EVENT_READ, (w, "err"))
        w.deadline = time.monotonic() + self.load_timeout_s
        self._send(w, {"op": "load", "source": self.source, "filename": self.display_name,
                       "kind": "environment" if self.kind == "environment" else "reward", "entry": self.info.entry,
                       "concurrency": self.concurrency_limit, "sync_threads": self.sync_threads,
                       "timeout_s": self.timeout_s, "env": self.secret_env})

    def _ensure_workers(self) -> None:
        """Before a batch: replace workers that died while idle; fill empty slots. Replacements still loading
        join the batch when ready; we only wait when no worker has ever loaded (the contract is unknown)."""
        for slot, w in enumerate(self._workers):
            if w is not None and w.proc.poll() is not None:
                # Read what it said before dying: a `retire` sent after the last result is a planned exit.
                while w.state != "dead" and self._read_out(w):
                    pass
                if w.state != "dead":
                    self._lose(w, "crash")
            if self._workers[slot] is None:
                self._spawn(slot)
                self.stats.restarts += 1
        self._load_error = None
        if self.contract is None or not self._live_workers():
            self._wait_ready()

    # ---- I/O ----------------------------------------------------------------------------------------------

    def _send(self, w: _Worker, obj: dict[str, Any] | bytes) -> None:
        data = obj if isinstance(obj, bytes) else (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        pending = bool(w.wbuf)
        w.wbuf += data
        if not pending:
            self._flush(w)

    def _flush(self, w: _Worker) -> None:
        try:
            while w.wbuf:
                n = os.write(w.in_fd, w.wbuf)
                del w.wbuf[:n]
        except BlockingIOError:
            pass
        except OSError:  # the worker is gone; its EOF on stdout reports it
            w.wbuf.clear()
        registered = self._sel.get_map().get(w.in_fd) is not None
        if w.wbuf and not registered:
            self._sel.register(w.in_fd, selectors.EVENT_WRITE, (w, "in"))
        elif not w.wbuf and registered:
            self._sel.unregister(w.in_fd)

    def _pump(self) -> None:
        """Wait for the next event or the nearest deadline; dispatch messages; handle deaths and timeouts."""
        live = [w for w in self._workers if w is not None and w.state != "dead"]
        if not live:
            return
        wait = max(0.0, min(w.deadline for w in live) - time.monotonic())
        for key, _ in self._sel.select(timeout=min(wait, 3600.0)):
            w, stream = key.data
            if w.state == "dead":
                continue
            if stream == "in":
                self._flush(w)
            elif stream == "err":
                self._read_err(w)
            else:
                self._read_out(w)
        now = time.monotonic()
        for w in live:
            if w.state != "dead" and now >= w.deadline:
                self._lose(w, "timeout" if w.state == "busy" else "load_timeout")

    def _read_err(self, w: _Worker) -> bool:
        """Append what `w` wrote to stderr to its bounded tail; False when there was nothing to read."""
        try:
            data = os.read(w.err_fd, _READ_CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._sel.unregister(w.err_fd)
            return False
        w.err += data
        if len(w.err) > 2 * _ERR_TAIL:  # keep a bounded tail; print-heavy user code must not grow the trainer
            drop = len(w.err) - _ERR_TAIL
            del w.err[:drop]
            w.err_dropped += drop
        return True

    def _read_out(self, w: _Worker) -> bool:
        """Read and dispatch what `w` wrote; False when there was nothing to read yet."""
        try:
            data = os.read(w.out_fd, _READ_CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._lose(w, "retired" if w.retiring else "crash")
            return True
        w.rbuf += data
        while w.state != "dead":
            end = w.rbuf.find(b"\n")
            if end < 0:
                if len(w.rbuf) > _MAX_LINE:
                    self._lose(w, "protocol", "the worker sent an over-long message")
                return True
            line = bytes(w.rbuf[:end])
            del w.rbuf[: end + 1]
            try:
                msg = json.loads(line)
                op = msg["op"]
            except (ValueError, KeyError, TypeError):
                self._lose(w, "protocol", "the worker sent malformed output (user code wrote to the protocol pipe?)")
                return True
            if op == "ready":
                w.state, w.deadline, w.inner_pid = "idle", math.inf, msg.get("pid")
                self.contract, self.entry = msg.get("contract"), msg.get("entry")
                concurrency = msg.get("concurrency")
                self.concurrency = min(self.concurrency_limit, concurrency) if type(concurrency) is int and \
                    concurrency >= 1 else 1
                if w.outstanding:  # requests were queued behind the load message: their clock starts now
                    w.state, w.deadline = "busy", time.monotonic() + self.call_timeout_s
            elif op == "load_error":
                self._load_error = redact(str(msg.get("error")), self.secrets)[-_ERROR_TEXT_MAX:]
                self._lose(w, "load_error")
            elif op == "retire":
                w.retiring = msg.get("reason") if msg.get("reason") == "timeout" else "cpu"
            elif op == "progress":
                w.deadline, w.batch = time.monotonic() + self.call_timeout_s, False
                w.err_mark = w.err_dropped + len(w.err)
            elif not self._on_message(w, msg):
                self._lose(w, "protocol", f"the worker sent an unexpected {op!r} message")
        return True

    # ---- failures -----------------------------------------------------------------------------------------

    def _lose(self, w: _Worker, kind: str, detail: str = "") -> None:
        """Kill and discard `w`, describe what happened, let the subclass settle its requests, replace it."""
        if w.state == "dead":
            return
        was_loading = w.state == "starting"
        if kind == "timeout":
            self._collect_traceback(w)
        self._kill(w)
        while w.err_fd in (self._sel.get_map() or {}) and self._read_err(w):
            pass  # the last words (a segfault's traceback) may still sit in the stderr pipe
        returncode = w.proc.returncode
        if kind == "timeout":
            what = f"timed out after {self.timeout_s:g} s (worker killed and replaced)"
        elif kind == "load_timeout":
            what = f"loading the code took longer than {self.load_timeout_s:g} s"
        elif kind == "protocol":
            what = detail
        else:
            what = f"the worker process died: {describe_exit(returncode, self.mode == 'bwrap')}"
        stderr = w.stderr_since_mark()
        description = redact(what + (f"\n--- worker stderr ---\n{stderr}" if stderr else ""), self.secrets)
        self._discard(w)
        if kind in ("crash", "protocol"):
            self.stats.crashes += 1
        if kind == "retired" and w.retiring == "timeout":
            self._log(f"sandbox worker {w.slot} was replaced: a call in one of its threads timed out and cannot "
                      "be stopped")
        elif kind == "retired":
            self._log(f"sandbox worker {w.slot} reached its CPU-time budget and was recycled")
        elif was_loading:
            self._load_error = self._load_error or description
        else:
            self._log(f"sandbox worker {w.slot} lost ({kind}): {description.splitlines()[0]}")
        if not was_loading and not self._closed:
            self._spawn(w.slot)  # the replacement loads in the background while other workers keep going
            self.stats.restarts += 1
        if w.outstanding:
            self._on_lost(w, kind, description)
            w.outstanding = []

    def _collect_traceback(self, w: _Worker) -> None:
        """Ask the stuck worker (SIGUSR1 -> faulthandler) where it is, and give it a moment to say."""
        target = host_pid(w.proc.pid, w.inner_pid) if w.inner_pid else None
        if target is None:
            return
        try:
            os.kill(target, signal.SIGUSR1)
        except OSError:
            return
        deadline, seen = time.monotonic() + 0.3, len(w.err)
        while time.monotonic() < deadline:
            ready = selectors.DefaultSelector()
            ready.register(w.err_fd, selectors.EVENT_READ)
            got = ready.select(timeout=0.05)
            ready.close()
            if got:
                self._read_err(w)
            elif len(w.err) > seen:
                return

    def _kill(self, w: _Worker) -> None:
        try:
            if self.mode == "bwrap":
                w.proc.kill()  # --die-with-parent takes the whole sandbox (its own pid namespace) down
            else:
                os.killpg(w.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def _discard(self, w: _Worker) -> None:
        if w.state != "dead":
            if w.proc.poll() is None:
                self._kill(w)
            w.state = "dead"
        registered = self._sel.get_map()
        for fd in (w.in_fd, w.out_fd, w.err_fd):
            if registered is not None and fd in registered:
                self._sel.unregister(fd)
        for stream in (w.proc.stdin, w.proc.stdout, w.proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._procs.pop(w.proc.pid, None)
        if self._workers[w.slot] is w:
            self._workers[w.slot] = None
        shutil.rmtree(w.dir, ignore_errors=True)
        _release_cgroup(w.proc)

    @property
    def call_timeout_s(self) -> float:
        """How long the parent waits for a worker's next answer before killing it. Concurrent workers time each
        call themselves (from its own start, at `timeout_s`) and answer a late one as timed out; the parent's
        clock, from the previous answer, is then a backstop for code that blocks the whole worker (a sync call
        inside `async def`), with `CONCURRENT_GRACE_S` so the worker's own answer arrives first."""
        return self.timeout_s + (CONCURRENT_GRACE_S if self.concurrency > 1 else 0.0)

    # ---- for subclasses -----------------------------------------------------------------------------------

    def _init_state(self) -> None:
        """Set up subclass state; called by __init__ before any worker starts."""

    def _on_message(self, w: _Worker, msg: dict[str, Any]) -> bool:
        """Handle one reply; return False if it makes no sense (the worker is then killed)."""
        return False

    def _on_lost(self, w: _Worker, kind: str, description: str) -> None:
        """`w` died or timed out owing answers for `w.outstanding`: settle or requeue them."""

    def _clean_error(self, text: str | None) -> str | None:
        if text is None:
            return None
        text = redact(text, self.secrets)
        if len(text) > _ERROR_TEXT_MAX:
            text = text[:1000] + "\n...\n" + text[-(_ERROR_TEXT_MAX - 1000):]
        if not self.allow_network and self.mode == "bwrap" and any(s in text for s in _NETWORK_SIGNS):
            text += "\nhint: network access is disabled for this code (allow_network=False)"
        elif self.egress is not None and any(s in text for s in _NETWORK_SIGNS):
            text += ("\nhint: this code reaches the network only through the HTTP(S) proxy in $HTTPS_PROXY "
                     "(reward_network: filtered); direct connections have no route")
        return text

    def _scrub_info(self, info: dict[str, Any]) -> dict[str, Any]:
        """A reward's info dict with secret values (reward_secrets among them) redacted from its texts: it is
        written to completions.jsonl and the metrics."""
        if not self.secrets:
            return info
        return {k: redact(v, self.secrets) if isinstance(v, str) else v for k, v in info.items()}

    def _idle_workers(self) -> list[_Worker]:
        return [w for w in self._workers if w is not None and w.state == "idle"]

    def _live_workers(self) -> list[_Worker]:
        return [w for w in self._workers if w is not None and w.state != "dead"]
