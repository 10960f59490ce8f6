"""SQLite (WAL) store: the schema, the statement runner, and one repository per resource (`store.users`,
`store.keys`, `store.files`, `store.tools`, `store.runs`, `store.shared`, `store.deployments`, `store.webhooks`).

The repositories are the one home of the server's SQL: routes parse a request, call a repository method and
render its rows, and never write a statement. The exception is the run queue (server/queue.py), whose state
machine (claims, leases, transitions) is the runs' transactional repository and writes its own statements
through `Store.tx()`. This module is long because it holds the schema and every statement against it, per
resource, side by side; it does not cover file bytes or run outputs, which live on disk under the data dir.

One connection per `Store`, serialised by a lock: every statement is short, the server is one process, and
the job queue relies on `UPDATE ... WHERE status = ?` being atomic under that lock.

Rows come back as plain dicts with JSON columns decoded; turning rows into API objects is the routes' job.
Every query that reads a user's resource takes the `user_id`, so ownership is enforced where data is read.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT, user_id INTEGER NOT NULL REFERENCES users(id), name TEXT NOT NULL,
    prefix TEXT NOT NULL UNIQUE, key_hash TEXT NOT NULL, last4 TEXT NOT NULL, scopes TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1, requests_per_hour INTEGER NOT NULL, expires_at TEXT,
    total_requests INTEGER NOT NULL DEFAULT 0, last_used_at TEXT, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, user_id INTEGER NOT NULL, name TEXT NOT NULL, original_filename TEXT,
    type TEXT NOT NULL, file_size INTEGER NOT NULL, mime_type TEXT, storage TEXT NOT NULL,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, deleted_at TEXT);
CREATE INDEX IF NOT EXISTS files_user ON files(user_id, deleted_at);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, user_id INTEGER NOT NULL, status TEXT NOT NULL, type TEXT NOT NULL,
    model TEXT NOT NULL, parameters TEXT NOT NULL, config TEXT NOT NULL, secrets TEXT NOT NULL DEFAULT '{}',
    prompt_file_id TEXT, reward_file_id TEXT, sft_file_id TEXT, tool_ids TEXT NOT NULL DEFAULT '[]',
    hf_name TEXT, total_steps INTEGER, error_message TEXT, cancel_requested INTEGER NOT NULL DEFAULT 0,
    pid INTEGER, lease_owner TEXT, lease_expires_at REAL, attempts INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, started_at TEXT, completed_at TEXT);
CREATE INDEX IF NOT EXISTS runs_user ON runs(user_id, id);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status, id);
CREATE TABLE IF NOT EXISTS run_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER NOT NULL, status TEXT NOT NULL, message TEXT NOT NULL,
    timestamp TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_run ON run_history(run_id, id);
CREATE TABLE IF NOT EXISTS tools (
    id INTEGER PRIMARY KEY AUTOINCREMENT, user_id INTEGER NOT NULL, name TEXT NOT NULL, description TEXT,
    mcp_url TEXT NOT NULL, is_public INTEGER NOT NULL DEFAULT 0, verified INTEGER NOT NULL DEFAULT 0,
    usage_count INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    UNIQUE(user_id, name));
CREATE TABLE IF NOT EXISTS shared_configs (
    uuid TEXT PRIMARY KEY, user_id INTEGER NOT NULL, name TEXT NOT NULL, description TEXT,
    visibility TEXT NOT NULL, configuration TEXT NOT NULL, prompt_file_id TEXT, reward_file_id TEXT,
    sft_file_id TEXT, copies INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shared_config_likes (
    uuid TEXT NOT NULL, user_id INTEGER NOT NULL, PRIMARY KEY (uuid, user_id));
CREATE TABLE IF NOT EXISTS deployments (
    id INTEGER PRIMARY KEY AUTOINCREMENT, user_id INTEGER NOT NULL, run_id INTEGER NOT NULL,
    base_model TEXT NOT NULL, status TEXT NOT NULL, api_url TEXT NOT NULL DEFAULT '', error_message TEXT,
    pid INTEGER, port INTEGER, created_at TEXT NOT NULL, updated_at TEXT NOT NULL, deleted_at TEXT);
CREATE TABLE IF NOT EXISTS webhooks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, user_id INTEGER NOT NULL, url TEXT NOT NULL, events TEXT NOT NULL,
    secret TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS webhooks_user ON webhooks(user_id, id);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, webhook_id INTEGER NOT NULL, delivery_id TEXT NOT NULL,
    event TEXT NOT NULL, attempt INTEGER NOT NULL, status_code INTEGER, success INTEGER NOT NULL, error TEXT,
    duration_ms INTEGER NOT NULL, retrying INTEGER NOT NULL DEFAULT 0, delivered_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS deliveries_webhook ON webhook_deliveries(webhook_id, id);
"""

# Columns added after a table was first released: (table, column, declaration). `Store()` adds each one a data
# dir's database lacks (SQLite's ALTER TABLE ADD COLUMN), new databases included, so a server upgraded in place
# keeps its data. Append here (not to CREATE TABLE above); never edit or reorder an entry.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("runs", "resumes", "INTEGER NOT NULL DEFAULT 0"),  # resumes after a vanished process (server/queue.py)
    ("runs", "devices", "TEXT"),  # the GPUs a run holds or last held, "0,1" (server/gpus.py, RunQueue.claim)
)

JSON_COLUMNS = {"scopes", "parameters", "config", "secrets", "tool_ids", "configuration", "events"}


class Sort(NamedTuple):
    """A listing's order as the request asked for it (server/routes `sort_clause`): `key` is one of the
    repository's sort keys (FILE_SORTS, RUN_SORTS, TOOL_SORTS), which map it to a column."""

    key: str
    descending: bool


class DuplicateName(ValueError):
    """A write that would give an owner two tools of the same name (the UNIQUE(user_id, name) constraint)."""


# `sort` keys of the listings and their columns; ties break on rowid, in the same direction.
FILE_SORTS = {"name": "name COLLATE NOCASE", "created_at": "created_at", "file_size": "file_size",
              "updated_at": "updated_at"}
# RunRL's runs "sort same as files"; a run has no name or size, so its own times and fields
RUN_SORTS = {"created_at": "created_at", "updated_at": "updated_at", "started_at": "started_at",
             "completed_at": "completed_at", "id": "id", "status": "status", "model": "model"}
TOOL_SORTS = {"name": "name COLLATE NOCASE", "created_at": "created_at", "usage_count": "usage_count",
              "updated_at": "updated_at"}
# The columns a Run listing needs (never `config` or `secrets`).
RUN_COLUMNS = ("id, status, type, model, parameters, tool_ids, total_steps, created_at, updated_at, started_at, "
               "completed_at, error_message, hf_name, prompt_file_id, reward_file_id, sft_file_id, devices")


def _order(columns: dict[str, str], sort: Sort) -> str:
    direction = "DESC" if sort.descending else "ASC"
    return f"{columns[sort.key]} {direction}, rowid {direction}"


def _contains(text: str) -> str:
    """A LIKE pattern (with ESCAPE '\\') matching `text` anywhere, its own `%`, `_` and `\\` taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _decode(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    for key in JSON_COLUMNS & out.keys():
        if isinstance(out[key], str):
            out[key] = json.loads(out[key])
    return out


def _encode(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


class ResponseCache:
    """Rendered responses keyed by (user, request), valid while `Store.generation()` is unchanged."""

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._entries: dict[Any, tuple[Any, bytes]] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, generation: Any) -> bytes | None:
        with self._lock:
            hit = self._entries.get(key)
        return hit[1] if hit and hit[0] == generation else None

    def put(self, key: Any, generation: Any, body: bytes) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key] = (generation, body)


class Store:
    """The database: statement primitives (`tx`, `one`, `all`, `insert`, `page`, ...) for the repositories and the
    queue, and the repositories themselves as attributes. Thread-safe; one instance per data dir per process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._add_columns()
        self._writes = 0
        # Status-change listeners (webhooks): called as listener(kind, id, status) by `notify`
        self.listeners: list[Callable[[str, int, str], None]] = []
        # The repositories: one per resource, each the only place its tables' SQL is written
        self.users = Users(self)
        self.keys = Keys(self)
        self.files = Files(self)
        self.tools = Tools(self)
        self.runs = Runs(self)
        self.shared = SharedConfigs(self)
        self.deployments = Deployments(self)
        self.webhooks = Webhooks(self)

    def _add_columns(self) -> None:
        for table, column, declaration in ADDED_COLUMNS:
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def notify(self, kind: str, obj_id: int, status: str) -> None:
        """A run ("run") or deployment ("deployment") now has `status`: tell the listeners. Never raises (a
        listener's error is logged), so queue.py and deploy.py call it right after writing a status."""
        for listener in list(self.listeners):
            try:
                listener(kind, obj_id, status)
            except Exception:
                logging.getLogger("runrl.server").exception("status listener failed for %s %s", kind, obj_id)

    def generation(self) -> tuple[int, int]:
        """Changes whenever the database may have changed: our own writes, or commits by other connections
        (`PRAGMA data_version`). Read it before reading data that a cache will keep."""
        with self._lock:
            return self._writes, self._db.execute("PRAGMA data_version").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- primitives ----------------------------------------------------------------------------------------
    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE) under the lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._writes += 1
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def one(self, sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None:
        with self._lock:
            return _decode(self._db.execute(sql, args).fetchone())

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [_decode(r) for r in self._db.execute(sql, args).fetchall()]

    def scalar(self, sql: str, args: Sequence[Any] = ()) -> Any:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
            return row[0] if row else None

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; returns lastrowid for INSERT, rowcount otherwise."""
        with self._lock:
            self._writes += 1
            cur = self._db.execute(sql, args)
            return cur.lastrowid if sql.lstrip().upper().startswith("INSERT") else cur.rowcount

    def insert(self, table: str, values: dict[str, Any]) -> int:
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        return self.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", [_encode(v) for v in values.values()])

    def update(self, table: str, key: str, key_value: Any, values: dict[str, Any]) -> int:
        sets = ", ".join(f"{k} = ?" for k in values)
        return self.execute(f"UPDATE {table} SET {sets} WHERE {key} = ?",
                            [_encode(v) for v in values.values()] + [key_value])

    def page(self, sql: str, args: Sequence[Any], order_by: str, page: int, per_page: int
             ) -> tuple[list[dict[str, Any]], int]:
        """Rows of `sql` (a SELECT without ORDER BY) for one page, and the total count."""
        total = self.scalar(f"SELECT COUNT(*) FROM ({sql})", args)
        rows = self.all(f"{sql} ORDER BY {order_by} LIMIT ? OFFSET ?", [*args, per_page, (page - 1) * per_page])
        return rows, int(total or 0)

    # ---- shorthands for the queue's, the worker's and the tests' callers ---------------------------------
    def get_or_create_user(self, name: str) -> int:
        return self.users.get_or_create(name)

    def run(self, run_id: int, user_id: int | None = None) -> dict[str, Any] | None:
        return self.runs.get(run_id, user_id)

    def history(self, run_id: int) -> list[dict[str, Any]]:
        return self.runs.history(run_id)

# ---- repositories ----------------------------------------------------------------------------------------------
class Users:
    """Accounts: a name and an id; keys, files, runs, ... belong to a user id."""

    def __init__(self, store: Store):
        self.store = store

    def get_or_create(self, name: str) -> int:
        with self.store.tx() as db:
            row = db.execute("SELECT id FROM users WHERE name = ?", (name,)).fetchone()
            if row:
                return int(row[0])
            return int(db.execute("INSERT INTO users (name, created_at) VALUES (?, ?)", (name, now_iso())).lastrowid)

    def public(self, user_id: int) -> dict[str, Any] | None:
        """What other users may see of a user: id and name."""
        return self.store.one("SELECT id, name FROM users WHERE id = ?", (user_id,))


class Keys:
    """API keys (hashes only; server/auth.py makes and checks tokens) and their usage counters. `owner` rows carry
    the owning user's name as `user` (the admin CLI's view)."""

    _WITH_OWNER = "SELECT k.*, u.name AS user FROM api_keys k JOIN users u ON u.id = k.user_id"

    def __init__(self, store: Store):
        self.store = store

    def get(self, key_id: int, user_id: int | None = None) -> dict[str, Any] | None:
        if user_id is None:
            return self.store.one("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        return self.store.one("SELECT * FROM api_keys WHERE id = ? AND user_id = ?", (key_id, user_id))

    def by_prefix(self, prefix: str) -> dict[str, Any] | None:
        return self.store.one("SELECT * FROM api_keys WHERE prefix = ?", (prefix,))

    def of_user(self, user_id: int) -> list[dict[str, Any]]:
        return self.store.all("SELECT * FROM api_keys WHERE user_id = ? ORDER BY id", (user_id,))

    def create(self, values: dict[str, Any]) -> dict[str, Any]:
        key_id = self.store.insert("api_keys", values)
        return self.get(key_id)  # type: ignore[return-value]  (just inserted)

    def update(self, key_id: int, values: dict[str, Any]) -> None:
        self.store.update("api_keys", "id", key_id, values)

    def delete(self, key_id: int) -> None:
        self.store.execute("DELETE FROM api_keys WHERE id = ?", (key_id,))

    def add_usage(self, counts: dict[int, tuple[int, str]]) -> None:
        """Flush request counters: key id -> (requests since last flush, last-used timestamp)."""
        with self.store.tx() as db:
            db.executemany("UPDATE api_keys SET total_requests = total_requests + ?, last_used_at = ? WHERE id = ?",
                           [(n, ts, key_id) for key_id, (n, ts) in counts.items()])

    def with_owner(self, *, key_id: int | None = None, prefix: str | None = None) -> dict[str, Any] | None:
        """One key by id or by prefix, with its owner's name."""
        if key_id is not None:
            return self.store.one(f"{self._WITH_OWNER} WHERE k.id = ?", (key_id,))
        return self.store.one(f"{self._WITH_OWNER} WHERE k.prefix = ?", (prefix,))

    def all_with_owner(self, user: str | None = None) -> list[dict[str, Any]]:
        """Every key (or `user`'s), oldest first, with its owner's name."""
        if user is None:
            return self.store.all(f"{self._WITH_OWNER} ORDER BY k.id")
        return self.store.all(f"{self._WITH_OWNER} WHERE u.name = ? ORDER BY k.id", (user,))


class Files:
    """Uploaded files' metadata (their bytes are under the files dir, server/routes/files.py). `get` sees live
    files only; a soft-deleted file keeps its row (`deleted_at`) for the runs and recipes that name it."""

    def __init__(self, store: Store):
        self.store = store

    def get(self, file_id: str, user_id: int | None = None) -> dict[str, Any] | None:
        if user_id is None:
            return self.store.one("SELECT * FROM files WHERE id = ? AND deleted_at IS NULL", (file_id,))
        return self.store.one("SELECT * FROM files WHERE id = ? AND user_id = ? AND deleted_at IS NULL",
                              (file_id, user_id))

    def get_any(self, file_id: str) -> dict[str, Any] | None:
        """The row, deleted or not."""
        return self.store.one("SELECT * FROM files WHERE id = ?", (file_id,))

    def refs(self, file_ids: set[str]) -> dict[str, dict[str, Any]]:
        """id -> (id, name, type, deleted_at) of each of `file_ids` that has a row, deleted or not."""
        if not file_ids:
            return {}
        marks = ", ".join("?" for _ in file_ids)
        rows = self.store.all(f"SELECT id, name, type, deleted_at FROM files WHERE id IN ({marks})", list(file_ids))
        return {r["id"]: r for r in rows}

    def list(self, user_id: int, *, ftype: str | None, search: str | None, sort: Sort, page: int, per_page: int
             ) -> tuple[list[dict[str, Any]], int]:
        """One page of the user's live files (of `ftype`; `search` in the name or original filename)."""
        sql, args = "SELECT * FROM files WHERE user_id = ? AND deleted_at IS NULL", [user_id]
        if ftype:
            sql += " AND type = ?"
            args.append(ftype)
        if search:
            sql += " AND (name LIKE ? ESCAPE '\\' OR original_filename LIKE ? ESCAPE '\\')"
            args += [_contains(search)] * 2
        return self.store.page(sql, args, _order(FILE_SORTS, sort), page, per_page)

    def search(self, user_id: int, text: str, limit: int) -> list[dict[str, Any]]:
        """The user's live files whose name or original filename contains `text`, newest first."""
        like = _contains(text)
        return self.store.all("SELECT * FROM files WHERE user_id = ? AND deleted_at IS NULL AND (name LIKE ? ESCAPE "
                              "'\\' OR original_filename LIKE ? ESCAPE '\\') ORDER BY created_at DESC LIMIT ?",
                              (user_id, like, like, limit))

    def insert(self, row: dict[str, Any]) -> None:
        self.store.insert("files", row)

    def update(self, file_id: str, values: dict[str, Any]) -> None:
        self.store.update("files", "id", file_id, values)

    def soft_delete(self, file_id: str) -> None:
        self.store.update("files", "id", file_id, {"deleted_at": now_iso()})

    def purge(self, file_id: str) -> None:
        self.store.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def active_runs_using(self, file_id: str) -> list[int]:
        """Ids of the queued or running runs that read the file."""
        rows = self.store.all("SELECT id FROM runs WHERE status IN ('PENDING','SETTING_UP','RUNNING') AND "
                              "(prompt_file_id = ? OR reward_file_id = ? OR sft_file_id = ?)", (file_id,) * 3)
        return [r["id"] for r in rows]


class Tools:
    """MCP tool registrations. A user sees their own tools and every public one (`visible`)."""

    def __init__(self, store: Store):
        self.store = store

    def get(self, tool_id: int) -> dict[str, Any] | None:
        return self.store.one("SELECT * FROM tools WHERE id = ?", (tool_id,))

    def visible(self, tool_id: int, user_id: int) -> dict[str, Any] | None:
        return self.store.one("SELECT * FROM tools WHERE id = ? AND (user_id = ? OR is_public = 1)",
                              (tool_id, user_id))

    def refs(self, tool_ids: set[int]) -> dict[int, dict[str, Any]]:
        """id -> (id, name, mcp_url, description) of each of `tool_ids` that still exists."""
        if not tool_ids:
            return {}
        marks = ", ".join("?" for _ in tool_ids)
        rows = self.store.all(f"SELECT id, name, mcp_url, description FROM tools WHERE id IN ({marks})",
                              list(tool_ids))
        return {r["id"]: r for r in rows}

    def list(self, user_id: int, *, owned_only: bool, public_only: bool, verified: bool | None,
             search: str | None, sort: Sort, page: int, per_page: int) -> tuple[list[dict[str, Any]], int]:
        """One page of the tools the user sees, filtered (`verified` None: either)."""
        sql, args = "SELECT * FROM tools WHERE (user_id = ? OR is_public = 1)", [user_id]
        if owned_only:
            sql += " AND user_id = ?"
            args.append(user_id)
        if public_only:
            sql += " AND is_public = 1"
        if verified is not None:
            sql += " AND verified = ?"
            args.append(int(verified))
        if search:
            sql += " AND (name LIKE ? ESCAPE '\\' OR description LIKE ? ESCAPE '\\')"
            args += [_contains(search)] * 2
        return self.store.page(sql, args, _order(TOOL_SORTS, sort), page, per_page)

    def search(self, user_id: int, text: str, limit: int) -> list[dict[str, Any]]:
        """The tools the user sees whose name or description contains `text`, newest first."""
        like = _contains(text)
        return self.store.all("SELECT * FROM tools WHERE (user_id = ? OR is_public = 1) AND (name LIKE ? ESCAPE "
                              "'\\' OR description LIKE ? ESCAPE '\\') ORDER BY created_at DESC LIMIT ?",
                              (user_id, like, like, limit))

    def create(self, values: dict[str, Any]) -> int:
        """The new tool's id; DuplicateName when the owner has a tool of that name."""
        try:
            return self.store.insert("tools", values)
        except sqlite3.IntegrityError:
            raise DuplicateName(values["name"]) from None

    def update(self, tool_id: int, values: dict[str, Any]) -> None:
        """DuplicateName when the new name is another of the owner's tools'."""
        try:
            self.store.update("tools", "id", tool_id, values)
        except sqlite3.IntegrityError:
            raise DuplicateName(values.get("name")) from None

    def delete(self, tool_id: int) -> None:
        self.store.execute("DELETE FROM tools WHERE id = ?", (tool_id,))

    def count_use(self, tool_ids: list[int]) -> None:
        """One more run uses each of the tools."""
        for tool_id in tool_ids:
            self.store.execute("UPDATE tools SET usage_count = usage_count + 1 WHERE id = ?", (tool_id,))


class Runs:
    """Runs and their status history. Status transitions, leases and claims are the queue's (server/queue.py,
    which writes its own transactional SQL on these rows); this is the API's side: create, read, list, search,
    ask to cancel. Listings return RUN_COLUMNS only."""

    def __init__(self, store: Store):
        self.store = store

    def get(self, run_id: int, user_id: int | None = None) -> dict[str, Any] | None:
        if user_id is None:
            return self.store.one("SELECT * FROM runs WHERE id = ?", (run_id,))
        return self.store.one("SELECT * FROM runs WHERE id = ? AND user_id = ?", (run_id, user_id))

    def status(self, run_id: int) -> str | None:
        return self.store.scalar("SELECT status FROM runs WHERE id = ?", (run_id,))

    def create(self, values: dict[str, Any], message: str) -> int:
        """Insert a run with its first history entry in one transaction (a worker may claim it at once)."""
        cols, marks = ", ".join(values), ", ".join("?" for _ in values)
        with self.store.tx() as db:
            run_id = db.execute(f"INSERT INTO runs ({cols}) VALUES ({marks})",
                                [_encode(v) for v in values.values()]).lastrowid
            db.execute("INSERT INTO run_history (run_id, status, message, timestamp) VALUES (?, ?, ?, ?)",
                       (run_id, values["status"], message, values["created_at"]))
        return int(run_id)

    def list(self, user_id: int, *, statuses: list[str] | None, created_after: str | None, created_before: str | None,
             run_type: str | None, model: str | None, sort: Sort, page: int, per_page: int
             ) -> tuple[list[dict[str, Any]], int]:
        """One page of the user's runs; each filter applies unless None (`statuses` [] matches nothing;
        `created_*`: timestamps as stored)."""
        sql, args = f"SELECT {RUN_COLUMNS} FROM runs WHERE user_id = ?", [user_id]
        if statuses is not None:
            sql += f" AND status IN ({', '.join('?' for _ in statuses)})"
            args += statuses
        for column, op, value in (("created_at", ">=", created_after), ("created_at", "<", created_before),
                                  ("type", "=", run_type), ("model", "=", model)):
            if value:
                sql += f" AND {column} {op} ?"
                args.append(value)
        return self.store.page(sql, args, _order(RUN_SORTS, sort), page, per_page)

    def search(self, user_id: int, text: str, limit: int) -> list[dict[str, Any]]:
        """The user's runs whose id is `text` or whose model, status or type contains it, newest first."""
        like = _contains(text)
        return self.store.all(f"SELECT {RUN_COLUMNS} FROM runs WHERE user_id = ? AND (CAST(id AS TEXT) = ? OR model "
                              "LIKE ? ESCAPE '\\' OR status LIKE ? ESCAPE '\\' OR type LIKE ? ESCAPE '\\') "
                              "ORDER BY id DESC LIMIT ?", (user_id, text, like, like, like, limit))

    def active_counts(self, user_id: int | None) -> dict[str, int]:
        """status -> number of queued and running runs (of `user_id`; None: everyone's)."""
        sql, args = "SELECT status, COUNT(*) AS n FROM runs WHERE status IN ('PENDING','SETTING_UP','RUNNING')", []
        if user_id is not None:
            sql, args = sql + " AND user_id = ?", [user_id]
        return {r["status"]: r["n"] for r in self.store.all(sql + " GROUP BY status", args)}

    def cancel_requested(self, run_id: int) -> bool:
        return bool(self.store.scalar("SELECT cancel_requested FROM runs WHERE id = ?", (run_id,)))

    def set_error_message(self, run_id: int, message: str) -> None:
        """The reason shown on the run, set before the worker stops it (the status moves later, from its exit)."""
        self.store.update("runs", "id", run_id, {"error_message": message})

    def request_cancel(self, run_id: int) -> None:
        """Flag the run for its worker (which stops it); the queue moves a PENDING one to CANCELLED itself."""
        self.store.update("runs", "id", run_id, {"cancel_requested": 1, "updated_at": now_iso()})

    def history(self, run_id: int) -> list[dict[str, Any]]:
        return self.store.all("SELECT status, message, timestamp FROM run_history WHERE run_id = ? ORDER BY id",
                              (run_id,))

    def add_history(self, run_id: int, status: str, message: str) -> None:
        self.store.insert("run_history", {"run_id": run_id, "status": status, "message": message,
                                          "timestamp": now_iso()})


class SharedConfigs:
    """Saved run recipes (`shared_configs`, keyed by uuid) and their likes. Who may read or change one is the
    route's rule (server/routes/shared.py); this reads and writes rows."""

    FILE_COLUMNS = ("prompt_file_id", "reward_file_id", "sft_file_id")

    def __init__(self, store: Store):
        self.store = store

    def get(self, uuid: str) -> dict[str, Any] | None:
        return self.store.one("SELECT * FROM shared_configs WHERE uuid = ?", (uuid,))

    def of_user(self, user_id: int) -> list[dict[str, Any]]:
        """The user's recipes, newest first."""
        return self.store.all("SELECT * FROM shared_configs WHERE user_id = ? ORDER BY created_at DESC, rowid DESC",
                              (user_id,))

    def browse(self, visibilities: list[str], *, model: str | None, reward_mode: str | None, search: str | None,
               page: int, per_page: int) -> tuple[list[dict[str, Any]], int]:
        """One page, newest first, of the recipes with one of `visibilities`; `model` and `reward_mode` match the
        configuration's keys (`reward_mode`, else `type`); `search` is a LIKE pattern's body in name or
        description."""
        sql = f"SELECT * FROM shared_configs WHERE visibility IN ({', '.join('?' for _ in visibilities)})"
        args: list[Any] = list(visibilities)
        if model:
            sql += " AND json_extract(configuration, '$.model') = ?"
            args.append(model)
        if reward_mode:
            sql += (" AND coalesce(json_extract(configuration, '$.reward_mode'), json_extract(configuration, "
                    "'$.type')) = ?")
            args.append(reward_mode)
        if search:
            sql += " AND (name LIKE ? OR description LIKE ?)"
            args += [f"%{search}%"] * 2
        return self.store.page(sql, args, "created_at DESC, rowid DESC", page, per_page)

    def shares_file(self, column: str, file_id: str) -> bool:
        """Whether a public or unlisted recipe names `file_id` in `column` (one of FILE_COLUMNS)."""
        if column not in self.FILE_COLUMNS:
            raise ValueError(f"not a file column of shared_configs: {column!r}")
        return self.store.one(f"SELECT 1 AS x FROM shared_configs WHERE {column} = ? AND visibility != 'private'",
                              (file_id,)) is not None

    def likes(self, uuid: str) -> int:
        return int(self.store.scalar("SELECT COUNT(*) FROM shared_config_likes WHERE uuid = ?", (uuid,)))

    def liked(self, uuid: str, user_id: int) -> bool:
        return self.store.one("SELECT 1 AS x FROM shared_config_likes WHERE uuid = ? AND user_id = ?",
                              (uuid, user_id)) is not None

    def toggle_like(self, uuid: str, user_id: int) -> bool:
        """Like the recipe, or take the like back; whether the user likes it now."""
        removed = self.store.execute("DELETE FROM shared_config_likes WHERE uuid = ? AND user_id = ?", (uuid, user_id))
        if not removed:
            self.store.insert("shared_config_likes", {"uuid": uuid, "user_id": user_id})
        return not removed

    def insert(self, values: dict[str, Any]) -> None:
        self.store.insert("shared_configs", values)

    def count_copy(self, uuid: str) -> None:
        self.store.execute("UPDATE shared_configs SET copies = copies + 1 WHERE uuid = ?", (uuid,))

    def update(self, uuid: str, values: dict[str, Any]) -> None:
        self.store.update("shared_configs", "uuid", uuid, values)

    def delete(self, uuid: str) -> None:
        """The recipe and its likes."""
        self.store.execute("DELETE FROM shared_config_likes WHERE uuid = ?", (uuid,))
        self.store.execute("DELETE FROM shared_configs WHERE uuid = ?", (uuid,))


class Deployments:
    """Model-serving deployments of finished runs: `pending` and `active` are live; `failed` and `deleted` are
    kept. The processes are server/deploy.py's."""

    def __init__(self, store: Store):
        self.store = store

    def get(self, deployment_id: int, user_id: int | None = None) -> dict[str, Any] | None:
        if user_id is None:
            return self.store.one("SELECT * FROM deployments WHERE id = ?", (deployment_id,))
        return self.store.one("SELECT * FROM deployments WHERE id = ? AND user_id = ?", (deployment_id, user_id))

    def live_for_run(self, run_id: int) -> dict[str, Any] | None:
        """The id of the run's live deployment, if it has one."""
        return self.store.one("SELECT id FROM deployments WHERE run_id = ? AND status IN ('pending', 'active')",
                              (run_id,))

    def live(self) -> list[dict[str, Any]]:
        return self.store.all("SELECT * FROM deployments WHERE status IN ('pending', 'active')")

    def list(self, user_id: int, *, status: str | None, page: int, per_page: int
             ) -> tuple[list[dict[str, Any]], int]:
        """One page of the user's deployments not deleted (of `status`), newest first."""
        sql, args = "SELECT * FROM deployments WHERE user_id = ? AND status != 'deleted'", [user_id]
        if status:
            sql += " AND status = ?"
            args.append(status)
        return self.store.page(sql, args, "id DESC", page, per_page)

    def create(self, values: dict[str, Any]) -> int:
        return self.store.insert("deployments", values)

    def update(self, deployment_id: int, values: dict[str, Any]) -> None:
        self.store.update("deployments", "id", deployment_id, values)

    def set_status(self, deployment_id: int, status: str, only_from: str | None, values: dict[str, Any]) -> bool:
        """Move a live deployment (or one in `only_from`) to `status` with `values`; whether it moved."""
        sql = "UPDATE deployments SET status = ?, updated_at = ?" + "".join(f", {k} = ?" for k in values)
        sql += " WHERE id = ? AND status IN (?, ?)"
        allowed = (only_from, only_from) if only_from else ("pending", "active")
        return bool(self.store.execute(sql, [status, now_iso(), *values.values(), deployment_id, *allowed]))

    def mark_deleted(self, deployment_id: int) -> None:
        self.store.execute("UPDATE deployments SET status = 'deleted', deleted_at = ?, updated_at = ? WHERE id = ?",
                           (now_iso(), now_iso(), deployment_id))


class Webhooks:
    """Webhook subscriptions and the record of each delivery attempt (sending is server/webhooks.py's)."""

    def __init__(self, store: Store):
        self.store = store

    def get(self, webhook_id: int, user_id: int | None = None) -> dict[str, Any] | None:
        if user_id is None:
            return self.store.one("SELECT * FROM webhooks WHERE id = ?", (webhook_id,))
        return self.store.one("SELECT * FROM webhooks WHERE id = ? AND user_id = ?", (webhook_id, user_id))

    def count(self, user_id: int) -> int:
        return int(self.store.scalar("SELECT COUNT(*) FROM webhooks WHERE user_id = ?", (user_id,)))

    def subscriptions(self, user_id: int) -> list[dict[str, Any]]:
        """(id, events) of each of the user's webhooks, oldest first."""
        return self.store.all("SELECT id, events FROM webhooks WHERE user_id = ? ORDER BY id", (user_id,))

    def list(self, user_id: int, *, page: int, per_page: int) -> tuple[list[dict[str, Any]], int]:
        """One page of the user's webhooks, newest first."""
        return self.store.page("SELECT * FROM webhooks WHERE user_id = ?", [user_id], "id DESC", page, per_page)

    def create(self, values: dict[str, Any]) -> int:
        return self.store.insert("webhooks", values)

    def delete(self, webhook_id: int) -> None:
        """The webhook and its deliveries, in one transaction."""
        with self.store.tx() as db:
            db.execute("DELETE FROM webhook_deliveries WHERE webhook_id = ?", (webhook_id,))
            db.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,))

    def deliveries(self, webhook_id: int, *, page: int, per_page: int) -> tuple[list[dict[str, Any]], int]:
        """One page of the webhook's delivery attempts, newest first."""
        return self.store.page("SELECT * FROM webhook_deliveries WHERE webhook_id = ?", [webhook_id], "id DESC",
                               page, per_page)

    def record_delivery(self, values: dict[str, Any]) -> None:
        """One attempt's record (webhook_delivery columns); none for a webhook deleted meanwhile, whose deliveries
        went with it."""
        cols = ("webhook_id", "delivery_id", "event", "attempt", "status_code", "success", "error", "duration_ms",
                "retrying", "delivered_at")
        self.store.execute(
            f"INSERT INTO webhook_deliveries ({', '.join(cols)}) SELECT {', '.join('?' for _ in cols)} "
            "WHERE EXISTS (SELECT 1 FROM webhooks WHERE id = ?)", [values[c] for c in cols] + [values["webhook_id"]])
