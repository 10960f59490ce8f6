"""The `runrl` entry point: the engine's commands (train, launch, validate: runrl_engine/cli.py) plus `runrl
serve`, `runrl keys create|list|update|revoke` and `runrl runs` (a client of a running server, server/client.py).

`runrl train` loads nothing of the web stack: starlette, uvicorn and httpx are imported by the command that
needs them (a test checks it). A user error exits with status 2, as in the engine's commands; an API error in
`runrl runs` prints the server's message and exits with status 1.

The `keys` commands work on the data dir's store directly, as the operator of this machine: they check no
scopes (the API's no-escalation rules bind keys, not whoever can write the database). A change reaches a running
server within its key cache's 5 s.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from runrl_engine import cli as engine_cli
from runrl_engine.errors import UserError
from server.gpus import detect_gpus
from server.settings import Settings
from server.store import Store


RAY_SLOTS = 4  # `runrl serve --executor ray`'s default --slots


def serve_settings(*, data_dir: str | Path = "~/.runrl", slots: int | None = None,
                   gpus: Sequence[str] | None = None, **policy: Any) -> Settings:
    """`runrl serve`'s Settings. `gpus`: the GPUs runs are placed on (None: detected, server/gpus.py; (): CPU
    only); `slots`: runs at once (None: one per GPU, else 1; with `executor="ray"`, RAY_SLOTS runs in flight,
    which Ray queues until the cluster has their resources)."""
    gpus = detect_gpus() if gpus is None else tuple(gpus)
    default_slots = RAY_SLOTS if policy.get("executor") == "ray" else max(1, len(gpus))
    return Settings(data_dir=Path(data_dir).expanduser().resolve(), slots=slots or default_slots, gpus=gpus,
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
    app = create_app(settings)
    if settings.executor == "ray":  # the job server answers and its workers see runs_dir, or exit 2 (UserError)
        asks = "n_gpus GPUs each" if settings.gpus else "no GPU (CPU only: no --gpus listed or detected)"
        print(f"runrl serve: runs are Ray jobs on {settings.ray_address}, asking for {asks}; up to {settings.slots} "
              f"run(s) in flight; checking that Ray's workers see {settings.runs_dir} ...", file=sys.stderr)
        app.state.services.worker.executor.check()
    else:
        print(f"runrl serve: {describe(settings.gpus)}; up to {settings.slots} run(s) at once", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10,
                proxy_headers=bool(trusted_proxies), forwarded_allow_ips=list(trusted_proxies) or None)


def create_key(*, name: str, scopes: list[str], user: str = "admin", data_dir: str | Path = "~/.runrl") -> str:
    """Create `user` on first use and a key for it; returns the token (shown once)."""
    from server import auth

    try:
        scopes = auth.check_scopes(scopes)
    except auth.ApiError as exc:
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
    from server import auth

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
    from server import auth

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


def _serve(args: argparse.Namespace) -> int:
    from runrl_engine.netpolicy import parse_destination

    for entry in args.allow_destination or ():
        try:
            parse_destination(entry)
        except ValueError as exc:
            raise UserError(str(exc), where=f"--allow-destination {entry}",
                            fix="write host:port, host, an IP or a CIDR, e.g. 127.0.0.1:8765") from None
    if args.max_resumes < 0:
        raise UserError(f"--max-resumes is {args.max_resumes}", where="--max-resumes",
                        fix="pass 0 (never resume) or more")
    gpus = None  # detected
    if args.gpus is not None:
        from server.gpus import parse_gpus

        try:
            gpus = parse_gpus(args.gpus)
        except ValueError as exc:
            raise UserError(str(exc), where=f"--gpus {args.gpus}",
                            fix="list GPU indices or UUIDs separated by commas, e.g. --gpus 0,1,2,3, or --gpus none "
                                "for CPU only") from None

    ray: dict[str, Any] = {}
    if args.executor == "ray":
        address = args.ray_address or os.environ.get("RAY_ADDRESS", "")
        if not address:
            raise UserError("the Ray executor needs the address of the cluster's job server", where="--executor ray",
                            fix="pass --ray-address http://HEAD:8265 (the Ray dashboard's address) or set "
                                "RAY_ADDRESS")
        if args.ray_cpus_per_run < 0 or args.ray_memory_mb < 0 or args.ray_grace_s <= 0:
            raise UserError("--ray-cpus-per-run and --ray-memory-mb cannot be negative, --ray-grace-s must be "
                            "positive", where="--ray-*", fix="pass e.g. --ray-cpus-per-run 4 --ray-grace-s 60")
        ray = dict(ray_address=address, ray_cpus_per_run=args.ray_cpus_per_run, ray_memory_mb=args.ray_memory_mb,
                   ray_grace_s=args.ray_grace_s)
    serve(host=args.host, port=args.port, data_dir=args.data_dir, slots=args.slots, gpus=gpus,
          executor=args.executor, **ray,
          trusted_proxies=args.trusted_proxy or (), require_isolation=not args.allow_unisolated,
          allow_user_network=args.allow_user_network, allow_url_requirements=args.allow_url_requirements,
          allow_private_destinations=args.allow_private_destinations,
          allowed_destinations=tuple(args.allow_destination or ()), validation_workers=args.validation_workers,
          validation_per_user=args.validation_per_user, hosted_ranges=args.hosted_ranges,
          max_resumes=args.max_resumes)
    return 0


def _keys(args: argparse.Namespace) -> int:
    token = create_key(name=args.name, scopes=[s.strip() for s in args.scopes.split(",") if s.strip()],
                       user=args.user, data_dir=args.data_dir)
    print(token)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from server.client import format_table, to_json

    keys = list_keys(data_dir=args.data_dir, user=args.user)
    print(to_json(keys) if args.json else (format_table(keys, KEY_COLUMNS) if keys else "no keys"))
    return 0


def _keys_update(args: argparse.Namespace) -> int:
    from server.client import to_json

    if args.keys_command == "revoke":
        row = revoke_key(args.key, data_dir=args.data_dir)
    else:
        scopes = None if args.scopes is None else [s.strip() for s in args.scopes.split(",") if s.strip()]
        row = update_key(args.key, data_dir=args.data_dir, name=args.name, scopes=scopes, active=args.active,
                         requests_per_hour=args.requests_per_hour, expires_at=args.expires_at)
    print(to_json(row))
    return 0


def _runs(args: argparse.Namespace) -> int:
    from server import client

    try:
        base_url, key = client.resolve(args.base_url, args.api_key)
    except client.MissingCredentials:
        raise UserError("no API key", where="--api-key",
                        fix="pass --api-key rl_... or set RUNRL_API_KEY (runrl keys create prints one)") from None
    try:
        with client.RunsClient(base_url, key) as api:
            if args.runs_command == "list":
                print(client.format_runs(api.list(status=args.status, page=args.page, per_page=args.per_page)))
            elif args.runs_command == "show":
                print(client.to_json(api.get(args.run_id)))
            elif args.runs_command == "logs":
                for line in (api.follow(args.run_id) if args.follow else api.all_logs(args.run_id)):
                    print(line, flush=True)
            else:
                run, message = api.cancel(args.run_id)
                print(f"{message or 'cancel'}: run {run['id']} is {run['status']}")
    except client.ApiCallError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _add_commands(sub: argparse._SubParsersAction) -> None:
    """serve, keys and runs, after the engine's train, launch and validate."""
    p = sub.add_parser("serve", help="serve RunRL's REST API from this machine")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--data-dir", default=str(Path.home() / ".runrl"),
                   help="keys, files, runs and their outputs (SQLite + directories; default: ~/.runrl)")
    p.add_argument("--slots", type=int, default=None, help="concurrent training runs (default: one per GPU, else 1)")
    p.add_argument("--gpus", metavar="IDS|none",
                   help="GPUs runs are placed on, comma-separated indices or UUIDs (e.g. 0,1,2,3); each run gets "
                        "n_gpus of them as its CUDA_VISIBLE_DEVICES; none: CPU only (default: the server's "
                        "CUDA_VISIBLE_DEVICES if set, else every GPU nvidia-smi lists)")
    p.add_argument("--max-resumes", type=int, default=3, metavar="N",
                   help="how often a run whose training process vanished (server restart or kill -9, trainer killed "
                        "by a signal such as the OOM killer's) is resumed from its last checkpoint before it ends "
                        "FAILED (default 3; 0: never; a graceful server shutdown is not counted)")
    cluster = p.add_argument_group("where runs train (README: Running the service over a Ray cluster)")
    cluster.add_argument("--executor", choices=("local", "ray"), default="local",
                         help="local: each run is a subprocess of this server (default); ray: each run is a Ray job "
                              "on a cluster whose nodes mount --data-dir's runs/ at the same path (pip install "
                              "\"runrl-engine[ray]\")")
    cluster.add_argument("--ray-address", metavar="URL",
                         help="the Ray job server (dashboard) address, e.g. http://head:8265 (default: $RAY_ADDRESS)")
    cluster.add_argument("--ray-cpus-per-run", type=float, default=1.0, metavar="N",
                         help="CPUs each run's Ray job asks for (default 1); GPUs: its n_gpus, none with --gpus none")
    cluster.add_argument("--ray-memory-mb", type=int, default=0, metavar="MB",
                         help="memory each run's Ray job reserves (default 0: none)")
    cluster.add_argument("--ray-grace-s", type=float, default=60.0, metavar="S",
                         help="how long the job server may stay unreachable before a run is resumed (bounded by "
                              "--max-resumes) or failed (default 60)")
    policy = p.add_argument_group("security policy (the defaults are the safe ones)")
    policy.add_argument("--allow-unisolated", action="store_true",
                        help="run user code even where bubblewrap cannot start (then it is NOT isolated: it can "
                             "read what the server's user can read); default: refuse such runs and validations")
    policy.add_argument("--allow-user-network", action="store_true",
                        help="let runs set reward_allow_network: true (user code then reaches the network only "
                             "through an egress proxy that applies the destination policy below); default: user "
                             "code has no network")
    policy.add_argument("--allow-url-requirements", action="store_true",
                        help="accept `name @ https://...` entries in package_requirements; default: index names only")
    policy.add_argument("--allow-private-destinations", action="store_true",
                        help="let MCP tools (test-mcp, run tools), user code's network and pip builds reach "
                             "loopback, private and link-local addresses")
    policy.add_argument("--allow-destination", action="append", metavar="HOST[:PORT]|CIDR",
                        help="allow one non-public destination (MCP tools, user code, pip's index), e.g. "
                             "127.0.0.1:8765 or pypi.internal (repeatable)")
    policy.add_argument("--validation-workers", type=int, default=4, help="concurrent code validations (default 4)")
    policy.add_argument("--validation-per-user", type=int, default=2,
                        help="concurrent code validations per user (default 2)")
    policy.add_argument("--trusted-proxy", action="append", metavar="IP",
                        help="a reverse proxy whose X-Forwarded-For is believed (repeatable; default none)")
    p.add_argument("--hosted-ranges", action="store_true",
                   help="keep RunRL's hosted ranges for a run's completion_length (128-8192), epochs (1-100) and "
                        "learning_rate_multiplier (0.1-10); default: accept what the engine accepts "
                        "(e.g. completion_length 1-32768)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("keys", help="manage API keys")
    ks = p.add_subparsers(dest="keys_command", required=True)
    kc = ks.add_parser("create", help="create an API key and print it")
    kc.add_argument("--name", required=True, help="a name to tell the key by (runrl keys list shows it)")
    kc.add_argument("--scopes", default="read,write", help="comma-separated: read,write[,admin]")
    kc.add_argument("--user", default="admin", help="user the key belongs to (created on first use)")
    kc.add_argument("--data-dir", default=str(Path.home() / ".runrl"), help="runrl serve's data dir (default: ~/.runrl)")
    kc.set_defaults(func=_keys)
    kl = ks.add_parser("list", help="list API keys (masked), with their scopes, quota, expiry and last use")
    kl.add_argument("--user", help="only this user's keys (default: every user's)")
    kl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    kl.add_argument("--data-dir", default=str(Path.home() / ".runrl"), help="runrl serve's data dir (default: ~/.runrl)")
    kl.set_defaults(func=_keys_list)
    ku = ks.add_parser("update", help="change a key's name, scopes, active flag, quota or expiry")
    ku.add_argument("key", help="the key's id, token or prefix (runrl keys list)")
    ku.add_argument("--name", help="new name")
    ku.add_argument("--scopes", help="comma-separated: read,write[,admin]")
    active = ku.add_mutually_exclusive_group()
    active.add_argument("--activate", dest="active", action="store_const", const=True, help="reactivate the key")
    active.add_argument("--deactivate", dest="active", action="store_const", const=False,
                        help="deactivate the key (as revoke)")
    ku.add_argument("--requests-per-hour", type=int, metavar="N", help="hourly request quota (1-10000000)")
    ku.add_argument("--expires-at", metavar="DATE|never", help="ISO date or datetime (UTC unless it says), or never")
    ku.add_argument("--data-dir", default=str(Path.home() / ".runrl"), help="runrl serve's data dir (default: ~/.runrl)")
    ku.set_defaults(func=_keys_update)
    kr = ks.add_parser("revoke", help="deactivate a key (a running server refuses it within 5 s)")
    kr.add_argument("key", help="the key's id, token or prefix (runrl keys list)")
    kr.add_argument("--data-dir", default=str(Path.home() / ".runrl"), help="runrl serve's data dir (default: ~/.runrl)")
    kr.set_defaults(func=_keys_update)

    p = sub.add_parser("runs", help="list, show, follow or cancel the runs of a running server")
    rs = p.add_subparsers(dest="runs_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", help="the API's base URL (default: $RUNRL_BASE_URL, else "
                                           "http://127.0.0.1:8000/api/v1)")
    common.add_argument("--api-key", help="an API key (default: $RUNRL_API_KEY)")
    rl = rs.add_parser("list", parents=[common], help="the newest runs, as a table")
    rl.add_argument("--status", help="only these statuses, comma-separated (e.g. RUNNING,PENDING)")
    rl.add_argument("--page", type=int, default=1, help="page number (default 1)")
    rl.add_argument("--per-page", type=int, default=20, help="runs per page (default 20)")
    for name, text in (("show", "one run, as JSON"), ("logs", "a run's log lines"), ("cancel", "cancel a run")):
        rp = rs.add_parser(name, parents=[common], help=text)
        rp.add_argument("run_id", type=int, help="the run's id")
        if name == "logs":
            rp.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until the run ends")
    p.set_defaults(func=_runs)


def build_parser() -> argparse.ArgumentParser:
    """The whole `runrl` command line."""
    return engine_cli.build_parser(extend=_add_commands)


def main(argv: Sequence[str] | None = None) -> int:
    """The `runrl` entry point (pyproject.toml)."""
    return engine_cli.main(argv, build=build_parser)


if __name__ == "__main__":
    sys.exit(main())
