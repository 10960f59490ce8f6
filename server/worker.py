"""Runs queued runs: `runrl train` (or `runrl launch --multi_gpu ...`) through an executor.

`execute_next()` is the synchronous step: claim one run, prepare its directory (input files snapshotted
into `inputs/`, a private `run.yaml` holding the config with its secrets, deleted when training ends), start
the training command through the executor (server/executor.py: `local`, a subprocess in its own process group,
the default; `ray`, a Ray job, server/ray_executor.py) with stdout → `process.log` and stderr → `stderr.log`,
renew the lease while it runs, and record how it ended. `start()` runs that step in `slots` threads. The claim,
the lease and the mapping below are the same for both executors; an executor that loses track of a run (a Ray
cluster gone) has it resumed, bounded by `max_resumes`, or failed with the reason.

Exit status → state: 0 COMPLETED; a cancel request → CANCELLED (the whole process group is killed); killed by a
signal (a negative status, or 128+N from a launcher or shell; the OOM killer's SIGKILL, kill -9), or stopped
by this server's own shutdown → back to PENDING, to be resumed from the last checkpoint (`RunQueue.resume_or_fail`,
bounded by `max_resumes`; a shutdown is not counted); 2 (a user error), 1 (a traceback) or any other exit →
FAILED with the last lines of stderr as `error_message`, never retried. A run that has trained before (its
directory holds config.yaml, metrics.jsonl or checkpoints/) is started with `--resume`, and the operator's
policy keys given again with `--set`, so today's policy applies to it too. Secrets of the run are redacted
from everything this module writes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from runrl_engine.rundir import INPUT_KEYS, RunDir
from runrl_engine.secrets import SERVED_MARK, redact, secret_values
from server import hub_push
from server.executor import Executor, ExecutorLost, Handle, LocalExecutor
from server.gpus import requested, train_command, trainer_env
from server.legacy import ignored_warnings
from server.policy import forced_config
from server.queue import RunQueue, RunStatus
from server.settings import Settings
from server.store import Store

log = logging.getLogger("runrl.worker")
REPO_ROOT = Path(__file__).resolve().parent.parent
ERROR_TAIL_LINES = 20
EXIT_USER_ERROR = 2  # `runrl train`'s status for a configuration or data error (runrl_engine/cli.py)
# The operator's policy keys (server/policy.py and the tool destinations) given again with `--set` to a resumed
# run, whose `runrl train --resume` otherwise continues with the run's stored config.yaml. All are RESUMABLE_KEYS.
RESUME_POLICY_KEYS = ("sandbox_isolation", "reward_allow_network", "reward_network",
                      "reward_allow_private_destinations", "reward_allowed_destinations",
                      "tool_allow_private_destinations", "tool_allowed_destinations")
S = RunStatus


def killed_by(returncode: int) -> str | None:
    """The signal that ended a training process, or None when it exited by itself (a real failure). Negative: the
    signal itself (`runrl train`); 128+N: a launcher or shell reporting its child killed by N (`runrl launch`, for
    runs on several GPUs, exits so when one of its processes was killed)."""
    number = -returncode if returncode < 0 else returncode - 128 if 128 < returncode <= 128 + 64 else 0
    if not number:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def error_from_stderr(stderr: str, returncode: int) -> str:
    """The user-facing reason a training process failed: the `error: ...` paragraph if there is one (exit
    2), otherwise the tail of stderr (a traceback's last lines)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("error:"):
            return "\n".join(lines[i:])[:4000]
    for i in range(len(lines) - 1, -1, -1):  # a crash: the last traceback, without the log lines before it
        if lines[i].startswith("Traceback (most recent call last)"):
            lines = lines[i:]
            break
    tail = "\n".join(lines[-ERROR_TAIL_LINES:])[-4000:]
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        return f"Training process was killed by {name}." + (f"\n{tail}" if tail else "")
    return tail or f"Training process exited with code {returncode} and printed no error."


def remove_leftovers(run_dir: Path) -> None:
    """Remove what a run leaves that is nobody's business once training has ended (`RunDir.leftovers`)."""
    for path in RunDir(run_dir).leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def resume_overrides(config_path: Path) -> list[str]:
    """`--set KEY=VALUE` for the policy keys of the config the worker wrote (values as JSON, which YAML reads)."""
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    out = []
    for key in RESUME_POLICY_KEYS:
        if key in config:
            out += ["--set", f"{key}={json.dumps(config[key])}"]
    return out


def make_executor(settings: Settings) -> Executor:
    """The executor `settings.executor` names: `local` (server/executor.py) or `ray` (server/ray_executor.py, which
    imports ray only when it is chosen)."""
    if settings.executor == "ray":
        from server.ray_executor import RayExecutor

        return RayExecutor(settings)
    return LocalExecutor()


class Worker:
    def __init__(self, settings: Settings, store: Store, queue: RunQueue, executor: Executor | None = None):
        self.settings = settings
        self.store = store
        self.queue = queue
        self.executor = executor or make_executor(settings)
        queue.stop_orphan = self.executor.stop_orphan  # recover() stops a previous server's runs where they run
        self._handles: dict[int, Handle] = {}
        self._shut_down: set[int] = set()  # runs stop() stopped: resumed after the restart
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.settings.slots):
            t = threading.Thread(target=self._loop, name=f"runrl-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Stop taking runs; runs in progress are stopped and go back to PENDING, to be resumed from their last
        checkpoint when the server starts again (not counted against `max_resumes`)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            running = list(self._handles)
            self._shut_down.update(running)
        for run_id in running:
            self._kill(run_id, None)
        for t in self._threads:
            t.join(timeout=self.settings.cancel_grace_s + 5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.executor.ready() or self.execute_next() is None:
                    self._wake.wait(self.settings.poll_interval_s)
                    self._wake.clear()
            except Exception:  # a bug here must not kill the slot; the run itself was already failed
                log.exception("worker slot error")
                time.sleep(self.settings.poll_interval_s)

    # ---- cancel ------------------------------------------------------------------------------------------------
    def cancel(self, run_id: int) -> None:
        """Kill a running run's process group (the worker then records CANCELLED)."""
        self._kill(run_id, None)

    def _kill(self, run_id: int, fail_message: str | None) -> None:
        with self._lock:
            handle = self._handles.get(run_id)
        if handle is None:
            return
        if fail_message:
            self.store.runs.set_error_message(run_id, fail_message)
        handle.cancel(self.settings.cancel_grace_s)  # SIGTERM, SIGKILL after the grace; does not block

    # ---- one run -------------------------------------------------------------------------------------------
    def execute_next(self) -> int | None:
        """Claim one PENDING run and run it to its end (blocking). Returns its id, or None if none queued."""
        # with GPUs: only once its n_gpus are free (server/gpus.py); on a Ray cluster, Ray places runs on GPUs
        run = self.queue.claim(self.settings.gpus if self.executor.places_gpus else None)
        if run is None:
            return None
        try:
            self._execute(run)
        except Exception as exc:
            log.exception("run %s: worker error", run["id"])
            message = f"Internal error while running: {type(exc).__name__}: {exc}"
            self.queue.transition(run["id"], S.FAILED, message, error_message=message)
        self.wake()  # its GPUs are free: a slot waiting for GPUs looks again
        return run["id"]

    def _prepare(self, run: dict[str, Any], run_dir: Path) -> Path:
        paths = RunDir(run_dir)
        paths.inputs.mkdir(parents=True, exist_ok=True)
        config = forced_config(self.settings, run["config"])  # today's policy, even for runs queued before
        config.update(tool_allow_private_destinations=self.settings.allow_private_destinations,
                      tool_allowed_destinations=list(self.settings.allowed_destinations))
        for key in INPUT_KEYS:
            src = config.get(key)
            if src:
                dst = paths.input_copy(key)
                shutil.copyfile(src, dst)
                config[key] = str(dst)
        # The run's secrets (hf_token) are never written down: `runrl train --secrets-stdin` reads them from a
        # pipe. run.yaml holds only what config.yaml shows anyway, so a kill -9 leaves no secret behind.
        path = paths.launch_config
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(config, fh, sort_keys=False)
        return path

    def _execute(self, run: dict[str, Any]) -> None:
        run_id = run["id"]
        run_dir = self.settings.runs_dir / str(run_id)
        secrets = secret_values(run["secrets"])
        config_path = self._prepare(run, run_dir)
        env = dict(self.settings.extra_env)  # what the trainer's environment adds to the executor's own
        path = env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)
        env["PYTHONUNBUFFERED"] = "1"
        if self.executor.places_gpus:  # its own GPUs (none on a CPU-only server)
            env.update(trainer_env(self.settings.gpus, run.get("devices")))
        # n_gpus > 1: `runrl launch --multi_gpu --num_processes N train ...`, one process per GPU
        cmd = train_command(self.settings.train_command, self.settings.launch_command, requested(run["config"]),
                            [str(config_path), "--output", str(run_dir), "--secrets-stdin"])
        resume = RunDir(run_dir).has_trained
        if resume:  # an earlier attempt trained here: continue from its last checkpoint (or step 0), today's policy
            cmd += ["--resume", *resume_overrides(config_path)]
        with self._lock:
            if self._stop.is_set() or self.store.runs.cancel_requested(run_id):
                handle = None
            else:  # stdout → process.log, stderr → stderr.log; the secrets through stdin (server/executor.py)
                handle = self.executor.start(run, run_dir, cmd, env, json.dumps(run["secrets"]).encode("utf-8"))
                self._handles[run_id] = handle
        if handle is None:
            config_path.unlink(missing_ok=True)
            if self._stop.is_set() and not self.store.runs.cancel_requested(run_id):
                self.queue.transition(run_id, S.PENDING, "Released unstarted: the server is shutting down; "
                                                         "it runs after the restart")
            else:
                self.queue.transition(run_id, S.CANCELLED, "Cancelled before training started")
            return
        pid = {"pid": handle.pid} if handle.pid else {}  # a remote (Ray) job has no local process group
        self.queue.heartbeat(run_id, **pid)
        first_start = {"started_at": run["started_at"]} if run.get("started_at") else {}  # a resumed run keeps it
        message = (f"Resuming training process (attempt {run['attempts']}, --resume)" if resume else
                   "Starting training process")
        started, lost, code = False, None, None
        last_beat = time.monotonic()
        try:
            while True:
                if not started and handle.running():  # a Ray job may wait for its resources first
                    self.queue.transition(run_id, S.RUNNING, message, **pid, **first_start)
                    started = True
                try:
                    code = handle.poll(self.settings.poll_interval_s)
                except ExecutorLost as exc:
                    lost = str(exc)
                if code is not None or lost is not None:
                    break
                if time.monotonic() - last_beat > self.settings.lease_s / 3:
                    self.queue.heartbeat(run_id)
                    last_beat = time.monotonic()
            if not started:  # it ended (or was lost) before it was seen running: its history still says it began
                self.queue.transition(run_id, S.RUNNING, message, **pid, **first_start)
        finally:
            with self._lock:
                self._handles.pop(run_id, None)
            config_path.unlink(missing_ok=True)
            handle.cleanup()  # nothing the training started (sandbox workers, grandchildren) outlives it
            remove_leftovers(run_dir)
        self._note_ignored(run, run_dir)
        if lost is not None:  # the executor cannot tell how it ended (a Ray cluster gone): resumed, or failed
            with self._lock:
                shut_down = run_id in self._shut_down
                self._shut_down.discard(run_id)
            row = self.store.run(run_id)
            if row["status"] == S.RUNNING.value and row["attempts"] == run["attempts"]:
                self._resume(row, run_dir, lost, counted=not shut_down)
            return
        self._finish(run_id, run_dir, code, secrets, attempt=run["attempts"])

    def _finish(self, run_id: int, run_dir: Path, code: int, secrets: list[str], attempt: int | None = None) -> None:
        row = self.store.run(run_id)
        paths = RunDir(run_dir)
        # whatever the trainer did, no secret stays (hf_push.json, the Hub push's result, too: server/hub_push.py)
        for path in paths.texts:
            if path.exists():
                text = path.read_text(encoding="utf-8", errors="replace")
                clean = redact(text, secrets, mark=SERVED_MARK)
                if clean != text:
                    path.write_text(clean, encoding="utf-8")
        stderr = paths.stderr_log.read_text(encoding="utf-8", errors="replace")
        with self._lock:
            shut_down = run_id in self._shut_down
            self._shut_down.discard(run_id)
        signal_name = killed_by(code)
        if attempt is not None and (row["status"] != S.RUNNING.value or row["attempts"] != attempt):
            # recover() took the run over (this slot's lease had expired) and resumed or ended it already
            log.warning("run %s: attempt %s ended (status %s) after recovery took the run over", run_id, attempt, code)
        elif row["cancel_requested"]:
            self._note(run_dir, "run cancelled; training process group stopped")
            self.queue.transition(run_id, S.CANCELLED, "Cancelled by user; training process stopped")
        elif code == 0:
            self._note(run_dir, "training finished")
            pushed = hub_push.settle(self.store, run_id, run_dir)  # hf_name: a history entry; a failure's message
            self.queue.transition(run_id, S.COMPLETED, "Training completed", **pushed)
        elif shut_down and code != EXIT_USER_ERROR:  # stopped by stop(): the server is shutting down
            self._resume(row, run_dir, "The server shut down while this run was in progress; its training process "
                                       "was stopped", counted=False)
        elif signal_name:  # killed from outside (OOM killer, kill -9): the process vanished, the run did not fail
            tail = error_from_stderr(stderr, code)  # for a negative code its first line says "killed by"
            self._resume(row, run_dir, f"Training process was killed by {signal_name}",
                         detail=tail.partition("\n")[2] if code < 0 else tail)
        else:
            message = error_from_stderr(stderr, code)
            kind = "a configuration or data error" if code == EXIT_USER_ERROR else f"exit code {code}"
            self._note(run_dir, f"training failed ({kind}): {message}")
            self.queue.transition(run_id, S.FAILED, f"Training failed ({kind})", error_message=message)

    def _resume(self, row: dict[str, Any], run_dir: Path, why: str, *, counted: bool = True, detail: str = "") -> None:
        outcome = self.queue.resume_or_fail(row, run_dir, why, counted=counted, detail=detail)
        if outcome is not None:
            self._note(run_dir, outcome[1])

    def _note_ignored(self, run: dict[str, Any], run_dir: Path) -> None:
        """The create keys this server ignored (gpu_type, turbo: server/legacy.py), said once in the run's log, as
        in its history since it was created."""
        path = RunDir(run_dir).log
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        for warning in ignored_warnings(run["parameters"], self.settings.gpus):
            if f"[server] warning: {warning}\n" not in text:
                self._note(run_dir, f"warning: {warning}")

    @staticmethod
    def _note(run_dir: Path, text: str) -> None:
        """Append a server line to the run's log (after the trainer has exited, so lines never interleave)."""
        with open(RunDir(run_dir).log, "a", encoding="utf-8") as fh:
            for line in text.splitlines():
                fh.write(f"[server] {line}\n")
