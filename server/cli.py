"""`runrl serve` and `runrl keys create|list|update|revoke` (dispatched from runrl_engine/cli.py).

The `keys` commands work on the data dir's store directly, as the operator of this machine: they check no
scopes (the API's no-escalation rules bind keys, not whoever can write the database). A change reaches a running
server within its key cache's 5 s. `runrl runs` (a client of a running server) is server/client.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from server import auth
from server.gpus import detect_gpus
from server.settings import Settings
from server.store import Store


def serve_settings(*, data_dir: str | Path = "~/.runrl", slots: int | None = None,
                   gpus: Sequence[str] | None = None, **policy: Any) -> Settings:
    """`runrl serve`'s Settings. `gpus`: the GPUs runs are placed on (None: detected, server/gpus.py; (): CPU
    only); `slots`: runs at once (None: one per GPU, else 1)."""
    gpus = detect_gpus() if gpus is None else tuple(gpus)
    return Settings(data_dir=Path(data_dir).expanduser().resolve(), slots=slots or max(1, len(gpus)), gpus=gpus,
                    **policy)


def serve(*, host: str = "127.0.0.1", port: int = 8000, data_dir: str | Path = "~/.runrl",
          slots: int | None = None, gpus: Sequence[str] | None = None, trusted_proxies: Sequence[str] = (),
          **policy: Any) -> None:
    """`policy`: Settings security fields (require_isolation, allow_user_network, allowed_destinations, ...) and
    `hosted_ranges` (RunRL's hosted create-run ranges instead of the engine's).
    `gpus`, `slots`: see `serve_settings`.
    `trusted_proxies`: addresses whose X-Forwarded-For is believed (none by default, so a client cannot pick
    the address the failed-authentication throttle counts)."""
    import sys

    import uvicorn

    from server.app import create_app
    from server.gpus import describe

    settings = serve_settings(data_dir=data_dir, slots=slots, gpus=gpus, **policy)
    print(f"runrl serve: {describe(settings.gpus)}; up to {settings.slots} run(s) at once", file=sys.stderr)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", timeout_graceful_shutdown=10,
                proxy_headers=bool(trusted_proxies), forwarded_allow_ips=list(trusted_proxies) or None)


def create_key(*, name: str, scopes: list[str], user: str = "admin", data_dir: str | Path = "~/.runrl") -> str:
    """Create `user` on first use and a key for it; returns the token (shown once)."""
    try:
        scopes = auth.check_scopes(scopes)
    except auth.ApiError as exc:
        from runrl_engine.errors import UserError

        raise UserError(f"{exc.message}: {exc.details['scopes']}", where="--scopes",
                        fix="pass a comma-separated list such as read,write") from None
    settings = Settings(data_dir=Path(data_dir).expanduser().resolve())
    store = Store(settings.db_path)
    try:
        user_id = store.users.get_or_create(user)
        _, token = auth.create_key(store, user_id, name, scopes)
    finally:
        store.close()
    return token


KEY_COLUMNS = (("id", "ID"), ("user", "USER"), ("name", "NAME"), ("masked_key", "KEY"), ("scopes", "SCOPES"),
               ("active", "ACTIVE"), ("requests_per_hour", "REQ/H"), ("expires_at", "EXPIRES"),
               ("last_used_at", "LAST USED"))


def _user_error(message: str, where: str, fix: str) -> Exception:
    from runrl_engine.errors import UserError

    return UserError(message, where=where, fix=fix)


def _open_store(data_dir: str | Path) -> Store:
    """The data dir's store; a directory without one is a mistake (never a new empty store)."""
    settings = Settings(data_dir=Path(data_dir).expanduser().resolve())
    if not settings.db_path.is_file():
        raise _user_error("no runrl serve data here", where=str(settings.data_dir),
                          fix="pass the --data-dir that runrl serve and runrl keys create use")
    return Store(settings.db_path)


def _key_row(row: dict[str, Any]) -> dict[str, Any]:
    """What `keys list` shows of a key (never its hash)."""
    return {"id": row["id"], "user": row["user"], "name": row["name"], "masked_key": auth.masked(row),
            "scopes": row["scopes"], "active": bool(row["active"]), "requests_per_hour": row["requests_per_hour"],
            "total_requests": row["total_requests"], "created_at": row["created_at"],
            "expires_at": row["expires_at"], "last_used_at": row["last_used_at"]}


def list_keys(*, data_dir: str | Path = "~/.runrl", user: str | None = None) -> list[dict[str, Any]]:
    """Every key of the store (or of `user`), oldest first."""
    store = _open_store(data_dir)
    try:
        rows = store.keys.all_with_owner(user)
    finally:
        store.close()
    return [_key_row(r) for r in rows]


def _find_key(store: Store, key: str) -> dict[str, Any]:
    """A key by its id, its token, its masked form or its 8-character prefix."""
    text = key.strip()
    if text.isdigit():
        row = store.keys.with_owner(key_id=int(text))
    else:
        parts = text.split("_")
        prefix = parts[1] if len(parts) >= 2 and parts[0] == "rl" else text
        row = store.keys.with_owner(prefix=prefix)
    if row is None:
        raise _user_error("no such API key", where=key, fix="pass an id or a key prefix that runrl keys list shows")
    return row


def update_key(key: str, *, data_dir: str | Path = "~/.runrl", name: str | None = None,
               scopes: list[str] | None = None, active: bool | None = None, requests_per_hour: int | None = None,
               expires_at: str | None = None) -> dict[str, Any]:
    """Change a key's name, scopes, active flag, hourly quota or expiry (`expires_at="never"` removes it)."""
    values: dict[str, Any] = {}
    if name is not None:
        if not name.strip():
            raise _user_error("a key name cannot be empty", where="--name", fix="pass a non-empty name")
        values["name"] = name.strip()
    if scopes is not None:
        try:
            values["scopes"] = auth.check_scopes(scopes)
        except auth.ApiError as exc:
            raise _user_error(f"{exc.message}: {exc.details['scopes']}", where="--scopes",
                              fix="pass a comma-separated list such as read,write") from None
    if active is not None:
        values["active"] = int(active)
    if requests_per_hour is not None:
        if not 1 <= requests_per_hour <= 10_000_000:
            raise _user_error(f"{requests_per_hour} is out of range", where="--requests-per-hour",
                              fix="pass a number between 1 and 10000000")
        values["requests_per_hour"] = requests_per_hour
    if expires_at is not None:
        try:
            values["expires_at"] = None if expires_at.lower() == "never" else auth.parse_expiry(expires_at)
        except auth.ApiError as exc:
            raise _user_error(f"{exc.details['expires_at']} expected, got {expires_at!r}", where="--expires-at",
                              fix="pass an ISO date such as 2026-12-31, or never") from None
    store = _open_store(data_dir)
    try:
        row = _find_key(store, key)
        if values:
            store.keys.update(row["id"], values)
        return _key_row(store.keys.with_owner(key_id=row["id"]))  # type: ignore[arg-type]  (found above)
    finally:
        store.close()


def revoke_key(key: str, *, data_dir: str | Path = "~/.runrl") -> dict[str, Any]:
    """Deactivate a key (the row stays, with its usage; `update_key(active=True)` restores it)."""
    return update_key(key, data_dir=data_dir, active=False)
