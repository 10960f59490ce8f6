"""Where a claimed run's training command runs: the executor interface behind the queue, and the local executor.

The worker (server/worker.py) owns everything about a run's lifecycle: the claim, its lease, the run directory,
the RUNNING transition, and how the exit status maps to COMPLETED / FAILED / CANCELLED / resumed. An executor
only starts the training command somewhere and reports on it:

- `start(run, run_dir, argv, env, stdin)` starts `argv` (`runrl train ...` or `runrl launch --multi_gpu ...`) for
  one run, with `env` added to the environment where it runs, its stdout appended to `run_dir/process.log` and
  its stderr to `run_dir/stderr.log` (the REST logs route and the SSE stream read those files), `stdin` (the
  run's secrets as JSON, for `--secrets-stdin`) handed over without being written anywhere another user can
  read. It returns a `Handle`. `places_gpus`: whether the queue places runs on the server's own GPUs (`--gpus`,
  server/gpus.py); a Ray cluster places them itself.
- `Handle.poll(timeout)` waits up to `timeout` seconds and returns the exit status once the command has ended,
  in `runrl train`'s terms: 0, 2 (a user error), 1 (a traceback), a negative signal number or 128+N (killed).
  It raises `ExecutorLost` when the executor can no longer tell (a cluster gone for longer than its grace).
  `running()` says whether the command has begun (a Ray job can wait for resources first). `cancel(grace_s)`
  stops it (SIGTERM, then SIGKILL after `grace_s`) without blocking; `cleanup()`, once it has ended, makes sure
  nothing it started outlives it.
- `ready()` says whether a slot may claim a run now (a Ray executor whose cluster is unreachable says no, so
  queued runs stay PENDING instead of failing); `stop_orphan(row, run_dir)` stops what a previous server left
  running for a claimed run (`RunQueue.recover`), returning whether it stopped anything.

`LocalExecutor` (the default, `runrl serve --executor local`) runs the command as a subprocess of the server in
its own process group. The Ray executor is server/ray_executor.py. This module does not decide states.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from runrl_engine.rundir import RunDir


class ExecutorLost(Exception):
    """The executor lost track of a run's training command (its message says why); the run is resumed or failed."""


class Handle(Protocol):
    pid: int | None  # the process group recorded in the run's row (`kill_orphan`); None where it is remote

    def running(self) -> bool: ...

    def poll(self, timeout: float) -> int | None: ...

    def cancel(self, grace_s: float) -> None: ...

    def cleanup(self) -> None: ...


class Executor(Protocol):
    name: str
    places_gpus: bool

    def ready(self) -> bool: ...

    def start(self, run: Mapping[str, Any], run_dir: Path, argv: Sequence[str], env: Mapping[str, str],
              stdin: bytes) -> Handle: ...

    def stop_orphan(self, row: Mapping[str, Any], run_dir: Path) -> bool: ...


class LocalHandle:
    """One training subprocess in its own process group (so a cancel reaches everything it started)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.pid: int | None = proc.pid

    def running(self) -> bool:
        return True

    def poll(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def cancel(self, grace_s: float) -> None:
        threading.Thread(target=self._terminate, args=(grace_s,), daemon=True).start()

    def _terminate(self, grace_s: float) -> None:
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                self.proc.wait(timeout=wait)
                # the leader is gone; make sure nothing else in the group survives
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                return
            except subprocess.TimeoutExpired:
                continue
            return

    def cleanup(self) -> None:
        try:  # nothing the training started (sandbox workers, grandchildren) outlives it
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class LocalExecutor:
    """`runrl serve --executor local`: the training command as a subprocess of this server."""

    name = "local"
    places_gpus = True

    def ready(self) -> bool:
        return True

    def start(self, run: Mapping[str, Any], run_dir: Path, argv: Sequence[str], env: Mapping[str, str],
              stdin: bytes) -> LocalHandle:
        with open(RunDir(run_dir).process_log, "ab") as out, open(RunDir(run_dir).stderr_log, "wb") as err:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=err, stdin=subprocess.PIPE,
                                    env={**os.environ, **env}, cwd=str(run_dir), start_new_session=True)
        assert proc.stdin is not None
        try:  # a pipe: the secrets are never written down
            proc.stdin.write(stdin)
            proc.stdin.close()
        except OSError:  # the process died at once; its exit status tells why
            pass
        return LocalHandle(proc)

    def stop_orphan(self, row: Mapping[str, Any], run_dir: Path) -> bool:
        from server.queue import kill_orphan

        return kill_orphan(row.get("pid"), run_dir)
