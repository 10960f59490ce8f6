"""The durable run queue: an explicit state machine over the `runs` table, with leases.

A run is never removed from the table to be worked on: a worker *claims* the oldest PENDING run by moving it
to SETTING_UP with a lease (`lease_owner`, `lease_expires_at`) in one atomic UPDATE, renews the lease while
the training process lives (heartbeat), and ends it in a terminal state. `recover()` finds claimed runs whose
owner is gone (a server restart, a killed worker, an expired lease) and stops any training process they left
behind, so a run is never stuck RUNNING.

A run whose training process *vanished* (the server restarted or was killed, a lease expired, the trainer was
killed by a signal: SIGKILL from the OOM killer, kill -9) is not failed but resumed (`resume_or_fail`): back to
PENDING with a history entry saying why and which attempt, then claimed again and started with `runrl train
--resume`, which continues from the run's last checkpoint (from step 0 when there is none) and trims what
the lost attempt logged past it. `max_resumes` bounds how often: the next vanishing after that many resumes ends
FAILED with the reason. A graceful server shutdown also sends its running runs back to PENDING, without counting
(it is no fault of the run). A trainer that *exits* non-zero (2: a configuration or data error; 1: a traceback) is
a real failure and never retried. A cancel always wins: a run with a cancel request is CANCELLED, never resumed,
including one whose request comes while it is being put back (checked again after the transition). A resumed
run keeps its id, so it goes before every run created after it (claims go by id).

    PENDING ──► SETTING_UP ──► RUNNING ──► COMPLETED | FAILED | CANCELLED
    PENDING, SETTING_UP ──► CANCELLED | FAILED
    SETTING_UP ──► PENDING   (released unstarted when the server shuts down; it runs after the restart)
    SETTING_UP, RUNNING ──► PENDING   (its process vanished or the server shut down: resumed from a checkpoint)

Every transition is checked against `TRANSITIONS` and recorded in `run_history` with a message.
"""

from __future__ import annotations

import enum
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from server.gpus import capacity, describe, free_devices, requested
from server.store import Store, now_iso


class RunStatus(str, enum.Enum):
    PENDING = "PENDING"
    SETTING_UP = "SETTING_UP"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


S = RunStatus
TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    S.PENDING: frozenset({S.SETTING_UP, S.CANCELLED, S.FAILED}),
    S.SETTING_UP: frozenset({S.RUNNING, S.FAILED, S.CANCELLED, S.PENDING}),  # PENDING: released unstarted
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.PENDING}),  # PENDING: resumed (resume_or_fail)
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
ACTIVE = frozenset({S.PENDING, S.SETTING_UP, S.RUNNING})
TERMINAL = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})


class RunQueue:
    """Queue operations for one worker identity (one per server process)."""

    def __init__(self, store: Store, worker_id: str, lease_s: float = 30.0, max_resumes: int = 3):
        self.store = store
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.max_resumes = max_resumes
        # How recover() stops what a gone worker left running for a claimed run (its row: id, pid, attempts):
        # a local process group by default; the worker's executor sets its own (a Ray job: server/ray_executor.py).
        self.stop_orphan: Callable[[dict[str, Any], Path], bool] = lambda row, run_dir: kill_orphan(row["pid"],
                                                                                                   run_dir)

    def transition(self, run_id: int, to: RunStatus, message: str, *, only_from: RunStatus | None = None,
                   **values: Any) -> bool:
        """Move `run_id` to `to` if its current state allows it (and is `only_from`, when given); False if it
        does not (e.g. the run already ended)."""
        sources = [s.value for s, targets in TRANSITIONS.items() if to in targets and only_from in (None, s)]
        now = now_iso()
        values = {"status": to.value, "updated_at": now, **values}
        if to == S.RUNNING:
            values.setdefault("started_at", now)
        if to in TERMINAL:
            values.update(completed_at=now)
        if to in TERMINAL or to == S.PENDING:
            values.update(lease_owner=None, lease_expires_at=None)
        if to == S.PENDING:  # back in the queue: its GPUs are free, and the next claim assigns some again
            values.update(devices=None)
        sets = ", ".join(f"{k} = ?" for k in values)
        marks = ", ".join("?" for _ in sources)
        with self.store.tx() as db:
            cur = db.execute(f"UPDATE runs SET {sets} WHERE id = ? AND status IN ({marks})",
                             [*values.values(), run_id, *sources])
            if cur.rowcount != 1:
                return False
            db.execute("INSERT INTO run_history (run_id, status, message, timestamp) VALUES (?, ?, ?, ?)",
                       (run_id, to.value, message, now))
        self.store.notify("run", run_id, to.value)  # webhooks (never raises)
        return True

    def claim(self, gpus: Sequence[str] | None = None) -> dict[str, Any] | None:
        """Atomically take the oldest PENDING run (PENDING -> SETTING_UP, leased to this worker). With `gpus` (the
        server's GPU ids, server/gpus.py): only once `n_gpus` of them are free (held by no SETTING_UP or RUNNING
        run); the run then holds the first free ones (`devices`). First come, first served: while the oldest run
        waits for its GPUs no younger run starts, so small runs never starve a large one. A run asking for more
        GPUs than the server has (queued before a restart with fewer) is failed, with the reason."""
        pending = "SELECT id, config FROM runs WHERE status = 'PENDING' AND cancel_requested = 0 ORDER BY id LIMIT 1"
        held = "SELECT devices FROM runs WHERE status IN ('SETTING_UP', 'RUNNING') AND devices IS NOT NULL"
        while True:
            row = self.store.one(pending)  # the idle poll stays a read: no write lock, no cache churn
            if row is None:
                return None
            n = requested(row["config"])
            if n > capacity(gpus):
                message = (f"This run asks for {n} GPUs (n_gpus), but {describe(gpus)} now; start it again with "
                           "fewer")
                self.transition(row["id"], S.FAILED, message, only_from=S.PENDING, error_message=message)
                continue
            if gpus and len(free_devices(gpus, [r["devices"] for r in self.store.all(held)])) < n:
                return None  # it waits for its GPUs, and every younger run waits behind it
            now, devices, claimed = now_iso(), None, False
            with self.store.tx() as db:
                first = db.execute(pending).fetchone()
                if first is not None and first[0] == row["id"]:
                    free = free_devices(gpus, [r[0] for r in db.execute(held).fetchall()]) if gpus else []
                    if not gpus or len(free) >= n:
                        devices = ",".join(free[:n]) if gpus else None
                        db.execute("UPDATE runs SET status = 'SETTING_UP', lease_owner = ?, lease_expires_at = ?, "
                                   "attempts = attempts + 1, devices = ?, updated_at = ? WHERE id = ? AND "
                                   "status = 'PENDING'",
                                   (self.worker_id, time.time() + self.lease_s, devices, now, row["id"]))
                        on = f" on GPU(s) {devices}" if devices else ""
                        db.execute("INSERT INTO run_history (run_id, status, message, timestamp) VALUES (?, ?, ?, ?)",
                                   (row["id"], "SETTING_UP", f"Claimed by a worker{on}; preparing the run directory",
                                    now))
                        claimed = True
            if claimed:
                self.store.notify("run", row["id"], "SETTING_UP")  # webhooks (never raises)
                return self.store.run(row["id"])
            if gpus and first is not None and first[0] == row["id"]:
                return None  # its GPUs were taken in the meantime

    def heartbeat(self, run_id: int, **values: Any) -> None:
        values = {"lease_expires_at": time.time() + self.lease_s, **values}
        sets = ", ".join(f"{k} = ?" for k in values)
        self.store.execute(f"UPDATE runs SET {sets} WHERE id = ? AND lease_owner = ?",
                           [*values.values(), run_id, self.worker_id])

    def recover(self, runs_dir: Path) -> list[int]:
        """Resume (or, past `max_resumes`, fail) claimed runs whose worker is gone, after stopping the training
        processes they left behind; a run with a cancel request ends CANCELLED. Returns the runs handled."""
        rows = self.store.all("SELECT id, pid, attempts, lease_owner, lease_expires_at FROM runs "
                              "WHERE status IN ('SETTING_UP', 'RUNNING')")
        handled = []
        for row in rows:
            ours = row["lease_owner"] == self.worker_id
            if ours and (row["lease_expires_at"] or 0) > time.time():
                continue
            run_dir = runs_dir / str(row["id"])
            stopped = self.stop_orphan(row, run_dir)
            from server.worker import Worker, remove_leftovers  # (worker imports this module)

            remove_leftovers(run_dir)  # run.yaml, sandbox, reward_env; never checkpoints or outputs
            why = ("The server restarted while this run was in progress" if not ours else
                   "The worker stopped renewing this run's lease")
            why += ("; its training process was stopped" if stopped else "; its training process is gone")
            current = self.store.run(row["id"])
            outcome = self.resume_or_fail(current, run_dir, why) if current is not None else None
            if outcome is not None:
                if run_dir.is_dir():
                    Worker._note(run_dir, outcome[1])  # the run's log says it too (its trainer is gone)
                handled.append(row["id"])
        return handled

    def resume_or_fail(self, run: dict[str, Any], run_dir: Path, why: str, *, counted: bool = True,
                       detail: str = "") -> tuple[RunStatus, str] | None:
        """A run whose training process vanished (`why` says how): back to PENDING to be resumed from its last
        checkpoint, or FAILED when it has been resumed `max_resumes` times already (`counted`: False for a graceful
        server shutdown, which is no fault of the run and never uses up a resume); CANCELLED when a cancel was
        requested, also one that comes while it is put back. `detail` (e.g. the end of the trainer's stderr) goes
        into `error_message` when it fails. Returns the state the run was left in and the history message, or None
        when it was no longer in `run["status"]` (another worker or a cancel got there first)."""
        run_id, source = run["id"], RunStatus(run["status"])
        attempt, resumes = int(run["attempts"] or 0), int(run.get("resumes") or 0)
        if run["cancel_requested"]:
            message = f"Cancelled by user; {why[0].lower()}{why[1:]}"
            return (S.CANCELLED, message) if self.transition(run_id, S.CANCELLED, message, only_from=source) else None
        if counted and resumes >= self.max_resumes:
            message = (f"{why} (attempt {attempt}); it was resumed {resumes} time(s) already, the most max_resumes "
                       f"({self.max_resumes}) allows, so the run has failed")
            error = message + (f"\n{detail}" if detail else "")
            return (S.FAILED, message) if self.transition(run_id, S.FAILED, message, only_from=source,
                                                          error_message=error) else None
        from runrl_engine.checkpoint import latest_checkpoint  # torch-free

        point = latest_checkpoint(run_dir)
        where = (f"its last checkpoint ({point.name})" if point is not None else
                 "the start (no checkpoint was written yet)")
        count = (f"resume {resumes + 1} of at most {self.max_resumes}" if counted else
                 "not counted against max_resumes")
        message = f"{why} (attempt {attempt}); queued again to resume from {where}, {count}"
        if not self.transition(run_id, S.PENDING, message, only_from=source, pid=None, error_message=None,
                               resumes=resumes + 1 if counted else resumes):
            return None
        # a cancel request that came while the run was being put back: claim() skips it, so end it here
        if self.store.scalar("SELECT cancel_requested FROM runs WHERE id = ?", (run_id,)):
            message = "Cancelled by user while it waited to resume"
            self.transition(run_id, S.CANCELLED, message, only_from=S.PENDING)
            return S.CANCELLED, message
        return S.PENDING, message


def kill_orphan(pid: int | None, run_dir: Path, wait_s: float = 10.0) -> bool:
    """Kill the process group `pid` if it still runs this run's training (checked via its command line), and wait
    (up to `wait_s`) until its leader is gone, so a resumed trainer never shares the run directory with it."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return False
    if str(run_dir) not in cmdline:
        return False  # the pid was reused by something else
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    deadline = time.monotonic() + wait_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (an orphan's new parent may reap it late, or never)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
