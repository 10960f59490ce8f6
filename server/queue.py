"""The durable run queue: an explicit state machine over the `runs` table, with leases.

A run is never removed from the table to be worked on: a worker *claims* the oldest PENDING run by moving it
to SETTING_UP with a lease (`lease_owner`, `lease_expires_at`) in one atomic UPDATE, renews the lease while
the training process lives (heartbeat), and ends it in a terminal state. `recover()` finds claimed runs whose
owner is gone (a server restart, a killed worker, an expired lease), stops any training process they left
behind, and fails them with a message that says what happened, so a run is never stuck RUNNING.

    PENDING ──► SETTING_UP ──► RUNNING ──► COMPLETED | FAILED | CANCELLED
    PENDING, SETTING_UP ──► CANCELLED | FAILED
    SETTING_UP ──► PENDING   (released unstarted when the server shuts down; it runs after the restart)

Every transition is checked against `TRANSITIONS` and recorded in `run_history` with a message.
"""

from __future__ import annotations

import enum
import os
import signal
import time
from pathlib import Path
from typing import Any

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
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
ACTIVE = frozenset({S.PENDING, S.SETTING_UP, S.RUNNING})
TERMINAL = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})


class InvalidTransition(Exception):
    pass


class RunQueue:
    """Queue operations for one worker identity (one per server process)."""

    def __init__(self, store: Store, worker_id: str, lease_s: float = 30.0):
        self.store = store
        self.worker_id = worker_id
        self.lease_s = lease_s

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

    def claim(self) -> dict[str, Any] | None:
        """Atomically take the oldest PENDING run (PENDING -> SETTING_UP, leased to this worker)."""
        pending = "SELECT id FROM runs WHERE status = 'PENDING' AND cancel_requested = 0 ORDER BY id LIMIT 1"
        if self.store.scalar(pending) is None:  # the idle poll stays a read: no write lock, no cache churn
            return None
        now = now_iso()
        with self.store.tx() as db:
            row = db.execute(pending).fetchone()
            if row is None:
                return None
            run_id = row[0]
            db.execute("UPDATE runs SET status = 'SETTING_UP', lease_owner = ?, lease_expires_at = ?, "
                       "attempts = attempts + 1, updated_at = ? WHERE id = ? AND status = 'PENDING'",
                       (self.worker_id, time.time() + self.lease_s, now, run_id))
            db.execute("INSERT INTO run_history (run_id, status, message, timestamp) VALUES (?, ?, ?, ?)",
                       (run_id, "SETTING_UP", "Claimed by a worker; preparing the run directory", now))
        self.store.notify("run", run_id, "SETTING_UP")  # webhooks (never raises)
        return self.store.run(run_id)

    def heartbeat(self, run_id: int, **values: Any) -> None:
        values = {"lease_expires_at": time.time() + self.lease_s, **values}
        sets = ", ".join(f"{k} = ?" for k in values)
        self.store.execute(f"UPDATE runs SET {sets} WHERE id = ? AND lease_owner = ?",
                           [*values.values(), run_id, self.worker_id])

    def recover(self, runs_dir: Path) -> list[int]:
        """Fail claimed runs whose worker is gone; stop training processes they left behind."""
        rows = self.store.all("SELECT id, pid, lease_owner, lease_expires_at FROM runs "
                              "WHERE status IN ('SETTING_UP', 'RUNNING')")
        failed = []
        for row in rows:
            ours = row["lease_owner"] == self.worker_id
            if ours and (row["lease_expires_at"] or 0) > time.time():
                continue
            stopped = kill_orphan(row["pid"], runs_dir / str(row["id"]))
            from server.worker import remove_leftovers  # (worker imports this module)

            remove_leftovers(runs_dir / str(row["id"]))
            message = ("The server restarted while this run was in progress; " if not ours else
                       "The worker stopped renewing this run's lease; ")
            message += ("its training process was stopped. " if stopped else "its training process is gone. ")
            message += "Start a new run to train again."
            if self.transition(row["id"], S.FAILED, message, error_message=message):
                failed.append(row["id"])
        return failed


def kill_orphan(pid: int | None, run_dir: Path) -> bool:
    """Kill the process group `pid` if it still runs this run's training (checked via its command line)."""
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
    return True
