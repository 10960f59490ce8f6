"""The Ray executor: each claimed run is a Ray job (`runrl serve --executor ray --ray-address http://head:8265`).

The queue, leases, run directories and state mapping stay the worker's (server/worker.py); this module only starts
and watches the training command through Ray's job submission API (`ray.job_submission.JobSubmissionClient`,
talking to the head's job server, the dashboard port). `ray` is imported only when this executor is chosen; without
it `runrl serve --executor ray` exits 2 saying `pip install "runrl-engine[ray]"`.

- Job: the entrypoint is `python server/ray_entry.py RUN_DIR`, which runs the same command the local executor runs
  (`runrl train CONFIG --output RUN_DIR --secrets-stdin [--resume ...]`, or `runrl launch --multi_gpu ...` for
  n_gpus > 1), writing `process.log` / `stderr.log` into the run directory, so the REST logs route, the SSE stream,
  metrics and the dashboard read the same files as for a local run. It asks Ray for `ray_cpus_per_run` CPUs,
  `ray_memory_mb` of memory and the run's n_gpus GPUs (none on a server started with `--gpus none`, or with no GPU
  listed or detected); Ray queues it until they are free, and the run stays SETTING_UP meanwhile. Its
  submission_id is `runrl-<tag>-run<ID>-attempt<N>` (`<tag>`: a random id kept in the data dir, so two servers
  sharing a cluster never collide and a restarted server finds its jobs); metadata names the run and attempt.
- Data path: a SHARED FILE SYSTEM. The server's runs directory (`--data-dir`/runs) must be mounted at the same path
  on every Ray node, and the server's Python environment (this repository and its venv) be at the same path there
  too, run by a user that can read the server's 0600 files. `check()` proves it at startup with a probe job that
  reads a random token the server wrote into the runs directory and writes its reverse back; `runrl serve` exits
  2 naming --data-dir and --executor ray when it fails.
- Secrets: never in the entrypoint, the metadata or a runtime_env (all readable through Ray's dashboard and job
  API). The server writes a launch plan (argv, environment entries, the secrets) into the run directory with mode
  0600 (`ray_launch.json`); the entrypoint deletes it before training starts and hands the secrets over stdin.
- Exit status: the entrypoint records the training command's own status in `ray_exit.json`, so SUCCEEDED is 0,
  FAILED keeps 2 (a user error) apart from 1 (a traceback) and from a kill (128+N), and STOPPED (stop_job: a cancel,
  a server shutdown) is what the command did on Ray's SIGTERM. A job that ended without recording one (its node or
  its supervisor died) counts as killed, so the run is resumed, bounded by max_resumes.
- Cluster gone: a job server that does not answer for `ray_grace_s` seconds, or that no longer knows the job,
  makes `poll` raise `ExecutorLost`: the worker resumes the run (bounded by max_resumes) or fails it with the
  reason, never leaving it RUNNING. While the job server is unreachable, `ready()` is False and no run is claimed,
  so queued runs wait PENDING. When the head dies, Ray's own watcher kills the job's process group on the node.
- Restart: `recover()` (server/queue.py) stops the Ray job of each run a previous server left claimed (stop_job,
  then waits for it to end) and requeues the run, the same rule as for a local process; its next attempt is a new
  job. Starting an attempt also stops the previous attempt's job if it still runs, so two trainers never share a
  run directory.

Not covered: Ray's runtime environments, the object store or a working_dir upload (the shared file system is the
only data path); job servers behind authentication; a job server that accepts connections but hangs (requests has
no timeout here).
"""

from __future__ import annotations

import json
import logging
import os
import secrets as random_tokens
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from runrl_engine.rundir import RunDir
from server.gpus import requested
from server.ray_entry import EXIT, LAUNCH
from server.settings import Settings

log = logging.getLogger("runrl.ray")
ENTRY = Path(__file__).resolve().parent / "ray_entry.py"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RETRY_CONNECT_S = 5.0  # after a failed connection, ready() says no for this long before it tries again
PROBE_TIMEOUT_S = 180.0
STOP_WAIT_S = 30.0
PROBE = ("import pathlib, sys; d = pathlib.Path(sys.argv[1]); "
         "(d / 'answer').write_text((d / 'token').read_text()[::-1])")
INSTALL_HINT = 'pip install "runrl-engine[ray]"'


def _user_error(message: str, where: str, fix: str) -> Exception:
    from runrl_engine.errors import UserError

    return UserError(message, where=where, fix=fix)


def job_client_class() -> Any:
    """`ray.job_submission.JobSubmissionClient`, imported now; a missing ray is the operator's to fix."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:
        raise _user_error(f"the Ray executor needs ray, which is not installed here ({exc})", where="--executor ray",
                          fix=f"{INSTALL_HINT}, or serve with --executor local") from None
    return JobSubmissionClient


def _status(value: Any) -> str:
    return str(getattr(value, "value", value))


def _not_found(exc: Exception) -> bool:
    return isinstance(exc, RuntimeError) and "status code 404" in str(exc)


class RayExecutor:
    """Runs each claimed run as a Ray job on the cluster at `settings.ray_address`."""

    name = "ray"
    places_gpus = False  # Ray places runs on GPUs; the server's --gpus only says whether runs ask for any

    def __init__(self, settings: Settings):
        if not settings.ray_address:
            raise _user_error("the Ray executor needs the address of the cluster's job server", where="--executor ray",
                              fix="pass --ray-address http://HEAD:8265 (the Ray dashboard's address)")
        self.settings = settings
        self.address = settings.ray_address
        self._client_class = job_client_class()
        self._client: Any = None
        self._failed_at = 0.0
        self._lock = threading.Lock()

    # ---- the connection ----------------------------------------------------------------------------------------
    def client(self) -> Any:
        """The job submission client, connected on first use and again after a failure (OSError when unreachable)."""
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._client_class(self.address)
                except Exception as exc:  # ConnectionError, or whatever ray raises for a wrong address
                    self._failed_at = time.monotonic()
                    raise ConnectionError(f"cannot reach the Ray job server at {self.address}: {exc}") from exc
            return self._client

    def forget(self) -> None:
        """Drop the client after a failed request, so the next use connects again."""
        with self._lock:
            self._client = None
            self._failed_at = time.monotonic()

    def ready(self) -> bool:
        if self._client is None and time.monotonic() - self._failed_at < RETRY_CONNECT_S:
            return False
        try:
            self.client()
        except ConnectionError:
            return False
        return True

    def tag(self) -> str:
        """This data dir's id among the jobs of a shared cluster (kept in the data dir: a restart keeps it)."""
        path = self.settings.data_dir / "ray_tag"
        if not path.exists():
            path.write_text(random_tokens.token_hex(4), encoding="utf-8")
        return path.read_text(encoding="utf-8").strip()

    def submission_id(self, run_id: int, attempt: int | None) -> str:
        return f"runrl-{self.tag()}-run{run_id}-attempt{int(attempt or 0)}"

    # ---- startup check -----------------------------------------------------------------------------------------
    def check(self) -> None:
        """Reach the job server and prove that Ray's workers see the runs directory at the same path (a probe job
        reads a token written here and writes its reverse back). Raises UserError (exit 2) saying what to fix."""
        try:
            client = self.client()
        except ConnectionError as exc:
            raise _user_error(str(exc), where=f"--ray-address {self.address}",
                              fix="start the cluster (ray start --head --dashboard-host 0.0.0.0) and pass its job "
                                  "server's address, e.g. http://HEAD:8265") from None
        runs_dir = self.settings.runs_dir
        token = random_tokens.token_hex(16)
        probe_dir = runs_dir / f".ray-probe-{token[:8]}"
        probe_dir.mkdir(parents=True, exist_ok=True)
        (probe_dir / "token").write_text(token, encoding="utf-8")
        entrypoint = shlex.join([sys.executable, "-c", PROBE, str(probe_dir)])
        fix = (f"mount this server's runs directory ({runs_dir}, under --data-dir) at the same path on every Ray "
               f"node, with this Python ({sys.executable}) at the same path there too")
        where = f"--data-dir / --executor ray (runs directory {runs_dir})"
        try:
            job = client.submit_job(entrypoint=entrypoint, submission_id=f"runrl-probe-{token[:12]}",
                                    entrypoint_num_cpus=0, metadata={"runrl": "shared file system probe"})
            deadline = time.monotonic() + PROBE_TIMEOUT_S
            while (status := _status(client.get_job_status(job))) not in TERMINAL:
                if time.monotonic() > deadline:
                    client.stop_job(job)
                    raise _user_error(f"the probe job {job} did not finish within {PROBE_TIMEOUT_S:.0f} s",
                                      where=where, fix="check that the cluster has a free node (ray status)")
                time.sleep(0.5)
            answer = probe_dir / "answer"
            seen = answer.read_text(encoding="utf-8") if answer.exists() else None
            if status != "SUCCEEDED" or seen != token[::-1]:
                message = client.get_job_info(job).message or ""
                raise _user_error(f"a Ray job could not read and write this server's runs directory (probe job {job}"
                                  f" {status}: {message.strip()[-500:]})", where=where, fix=fix)
        except (OSError, RuntimeError) as exc:
            raise _user_error(f"the shared file system probe failed: {exc}", where=where, fix=fix) from None
        finally:
            shutil.rmtree(probe_dir, ignore_errors=True)

    # ---- runs --------------------------------------------------------------------------------------------------
    def start(self, run: Mapping[str, Any], run_dir: Path, argv: Sequence[str], env: Mapping[str, str],
              stdin: bytes) -> RayHandle:
        job_id = self.submission_id(run["id"], run["attempts"])
        handle = RayHandle(self, job_id, run_dir)
        env = dict(env)
        gpus = requested(run["config"]) if self.settings.gpus else 0
        if not gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU-only run sees no GPU, as on a local CPU-only server
        (run_dir / EXIT).unlink(missing_ok=True)  # an earlier attempt's status
        plan = {"argv": list(argv), "env": env, "stdin": stdin.decode("utf-8")}
        fd = os.open(run_dir / LAUNCH, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(plan, fh)
        resources: dict[str, Any] = {"entrypoint_num_cpus": self.settings.ray_cpus_per_run,
                                     "entrypoint_num_gpus": gpus}
        if self.settings.ray_memory_mb:
            resources["entrypoint_memory"] = self.settings.ray_memory_mb * 1024 * 1024
        try:
            if run["attempts"] and int(run["attempts"]) > 1:  # a lost attempt's job must not share the directory
                self.stop_job(self.submission_id(run["id"], int(run["attempts"]) - 1))
            self.client().submit_job(
                entrypoint=shlex.join([sys.executable, str(ENTRY), str(run_dir)]), submission_id=job_id,
                metadata={"runrl_run_id": str(run["id"]), "runrl_attempt": str(run["attempts"]),
                          "runrl_run_dir": str(run_dir)}, **resources)
        except (OSError, RuntimeError) as exc:
            self.forget()
            handle.lost = f"Its Ray job could not be submitted to {self.address}: {exc}"
        return handle

    def stop_job(self, job_id: str, wait_s: float = STOP_WAIT_S) -> bool:
        """Stop `job_id` if it still runs and wait (up to `wait_s`) until Ray says it ended; False if it was not
        running (or unknown, or the job server did not answer)."""
        try:
            client = self.client()
            if _status(client.get_job_status(job_id)) in TERMINAL:
                return False
            client.stop_job(job_id)
            deadline = time.monotonic() + wait_s
            while _status(client.get_job_status(job_id)) not in TERMINAL and time.monotonic() < deadline:
                time.sleep(0.5)
            return True
        except (OSError, RuntimeError) as exc:
            if not _not_found(exc):
                log.warning("could not stop Ray job %s: %s", job_id, exc)
            return False

    def stop_orphan(self, row: Mapping[str, Any], run_dir: Path) -> bool:
        stopped = self.stop_job(self.submission_id(row["id"], row.get("attempts")))
        remove_plan(run_dir)
        return stopped


class RayHandle:
    """One run's Ray job, as the worker watches it."""

    pid: int | None = None

    def __init__(self, executor: RayExecutor, job_id: str, run_dir: Path):
        self.executor = executor
        self.job_id = job_id
        self.run_dir = run_dir
        self.lost: str | None = None  # set when it could not even be submitted
        self._running = False
        self._ended = False
        self._unreachable_since: float | None = None

    def running(self) -> bool:
        return self._running

    def _status_now(self) -> str | None:
        """The job's status, or None while the job server is unreachable (within the grace); raises ExecutorLost."""
        from server.executor import ExecutorLost

        if self.lost:
            raise ExecutorLost(self.lost)
        try:
            status = _status(self.executor.client().get_job_status(self.job_id))
        except (OSError, RuntimeError) as exc:
            if _not_found(exc):
                raise ExecutorLost(f"The Ray cluster at {self.executor.address} no longer knows its job "
                                   f"{self.job_id} (the head was restarted?)") from None
            self.executor.forget()
            now = time.monotonic()
            self._unreachable_since = self._unreachable_since or now
            grace = self.executor.settings.ray_grace_s
            if now - self._unreachable_since > grace:
                raise ExecutorLost(f"The Ray job server at {self.executor.address} did not answer for {grace:.0f} s "
                                   f"while its job {self.job_id} ran ({type(exc).__name__}: {exc})") from None
            return None
        self._unreachable_since = None
        if status != "PENDING":
            self._running = True
        return status

    def poll(self, timeout: float) -> int | None:
        status = self._status_now()
        if status not in TERMINAL:
            time.sleep(timeout)
            return None
        self._ended = True
        return self._exit_code(status)

    def _exit_code(self, status: str) -> int:
        path = self.run_dir / EXIT
        try:
            code: int | None = int(json.loads(path.read_text(encoding="utf-8"))["code"])
        except (OSError, ValueError, KeyError, TypeError):
            code = None
        if code is not None:
            return code
        if status == "SUCCEEDED":
            return 0
        if status == "STOPPED":  # stopped before the entrypoint could record anything
            return -signal.SIGTERM
        try:
            info = self.executor.client().get_job_info(self.job_id)
            message, driver = (info.message or "").strip(), info.driver_exit_code
        except (OSError, RuntimeError):
            message, driver = "", None
        with open(RunDir(self.run_dir).stderr_log, "a", encoding="utf-8") as fh:  # the reason, where the worker looks
            fh.write(f"\n[ray] job {self.job_id} {status}: {message}\n")
        if driver is not None and 0 < driver < 128:
            return driver  # the entrypoint itself failed (e.g. the launch plan was unreadable: 2)
        return -signal.SIGKILL  # its node or supervisor died with it: the training process vanished

    def cancel(self, grace_s: float) -> None:
        """stop_job: Ray sends SIGTERM to the job's processes, then SIGKILL (its own RAY_JOB_STOP_WAIT_TIME_S)."""
        def stop() -> None:
            try:
                self.executor.client().stop_job(self.job_id)
            except (OSError, RuntimeError) as exc:
                log.warning("could not stop Ray job %s: %s", self.job_id, exc)

        threading.Thread(target=stop, daemon=True).start()

    def cleanup(self) -> None:
        if not self._ended:  # a job the worker lost track of is stopped if it can be
            self.executor.stop_job(self.job_id, wait_s=0)
        remove_plan(self.run_dir)


def remove_plan(run_dir: Path) -> None:
    """The launch plan (its secrets, if the job never started) and the exit record go when an attempt ends."""
    for name in (LAUNCH, EXIT):
        (run_dir / name).unlink(missing_ok=True)
