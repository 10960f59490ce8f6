"""`runrl serve` and `runrl keys create` (dispatched from runrl_engine/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from server import auth
from server.settings import Settings, default_slots
from server.store import Store


def serve(*, host: str = "127.0.0.1", port: int = 8000, data_dir: str | Path = "~/.runrl",
          slots: int | None = None, trusted_proxies: Sequence[str] = (), **policy: Any) -> None:
    """`policy`: Settings security fields (require_isolation, allow_user_network, allowed_destinations, ...).
    `trusted_proxies`: addresses whose X-Forwarded-For is believed (none by default, so a client cannot pick
    the address the failed-authentication throttle counts)."""
    import uvicorn

    from server.app import create_app

    settings = Settings(data_dir=Path(data_dir).expanduser().resolve(), slots=slots or default_slots(), **policy)
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
        user_id = store.get_or_create_user(user)
        _, token = auth.create_key(store, user_id, name, scopes)
    finally:
        store.close()
    return token
