"""API keys: `rl_<8>_<32>` Bearer tokens stored as SHA-256 hashes, scopes, and the auth middleware.

The 8-character part is a public lookup prefix; the 32-character secret never touches the disk. Scopes (spec
§1.2): `read` fetches, `write` creates/changes, `admin` may do everything. Each key belongs to a user; routes
filter every resource by that user, so another user's things answer 404.

`AuthMiddleware` authenticates the key (if one is sent), applies the hourly quota and adds the
`X-RateLimit-*` headers to every response; routes then demand a principal and a scope through `api()`
(routes/__init__.py). A missing key is only an error on routes, so an unknown path still answers 404.

Failed authentications (a malformed, unknown, wrong, inactive or expired key) are throttled per client
address (`Settings.auth_failures_per_minute`, `FailureThrottle` in ratelimit.py): the first N failures in a
minute answer 401 with their reason; past N, every failed attempt from that address answers 429
`rate_limit_exceeded` with `retry_after` (envelope and `Retry-After` header) and no reason, so a prober learns
nothing more (not even that a key exists but is revoked). A valid key from the same address still
authenticates, so a legitimate user behind the same NAT as a prober keeps working; the throttle bounds what
probing costs and reveals, it does not make guessing slower (a secret is 32 base-36 characters, ~165 bits).
A request without any key is not a failure. The address is the ASGI client address, i.e. what uvicorn
reports: with uvicorn's default `proxy_headers` (trusting `X-Forwarded-For` from 127.0.0.1), a client on the
loopback interface can name any address and so spread its failures; remote clients cannot. Counters are in
memory, per server process.

What a key may do to keys (routes/keys.py): a key never creates a key with a scope it lacks, a quota above its
own (the default is min(10 000, its own)) or an expiry later than its own; only an `admin` key raises a quota,
reactivates an inactive key, or extends or removes an expiry. Any `write` key of a user may lower, deactivate,
rename or delete that user's keys.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ApiError, error_response
from server.ratelimit import FAILURE_WINDOW_S, FailureThrottle, RateLimiter
from server.store import Store, now_iso

SCOPES = ("read", "write", "admin")
DEFAULT_REQUESTS_PER_HOUR = 10_000
_ALPHABET = string.ascii_lowercase + string.digits
_CACHE_TTL_S = 5.0


@dataclass(frozen=True)
class Principal:
    user_id: int
    key_id: int
    scopes: tuple[str, ...]

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_scopes(scopes: Any) -> list[str]:
    if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise ApiError(422, "Invalid scopes", details={"scopes": f"a non-empty list drawn from {list(SCOPES)}"})
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise ApiError(422, "Invalid scopes", details={"scopes": f"unknown scope(s) {bad}; use {list(SCOPES)}"})
    return sorted(set(scopes), key=SCOPES.index)


def parse_expiry(value: Any) -> str | None:
    """ISO date or datetime -> ISO UTC datetime string; None stays None."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ApiError(422, "Invalid expires_at", details={"expires_at": "an ISO date such as 2026-12-31"})
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(422, "Invalid expires_at", details={"expires_at": "an ISO date such as 2026-12-31"}) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    try:  # year 1 with a +offset (or 9999 with a -offset) is outside datetime's range in UTC
        utc = dt.astimezone(timezone.utc)
    except OverflowError:
        raise ApiError(422, "Invalid expires_at", details={"expires_at": "a date between years 1 and 9999 in UTC"}
                       ) from None
    return utc.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"  # 4-digit years (strftime gives "1-01-01")


def create_key(store: Store, user_id: int, name: str, scopes: list[str],
               requests_per_hour: int = DEFAULT_REQUESTS_PER_HOUR, expires_at: str | None = None
               ) -> tuple[dict[str, Any], str]:
    """Insert a new key; returns (row, token). The token is shown once and stored only as a hash."""
    for _ in range(5):
        prefix, secret = _random(8), _random(32)
        if store.keys.by_prefix(prefix) is None:
            break
    token = f"rl_{prefix}_{secret}"
    row = store.keys.create({
        "user_id": user_id, "name": name, "prefix": prefix, "key_hash": hash_token(token), "last4": secret[-4:],
        "scopes": scopes, "active": 1, "requests_per_hour": requests_per_hour, "expires_at": expires_at,
        "created_at": now_iso()})
    return row, token


def masked(row: dict[str, Any]) -> str:
    return f"rl_{row['prefix']}_{'*' * 28}{row['last4']}"


def _expired(expires_at: str | None) -> bool:
    if not expires_at:
        return False
    return datetime.fromisoformat(expires_at.replace("Z", "+00:00")) <= datetime.now(timezone.utc)


class Authenticator:
    """Token -> Principal, with a short cache of key rows; `invalidate()` after any key change."""

    def __init__(self, store: Store):
        self.store = store
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        with self._lock:
            self._cache.clear()

    def _row(self, prefix: str) -> dict[str, Any] | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(prefix)
        if hit and now - hit[0] < _CACHE_TTL_S:
            return hit[1]
        row = self.store.keys.by_prefix(prefix)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[prefix] = (now, row)
        return row

    def authenticate(self, token: str) -> tuple[Principal, dict[str, Any]]:
        parts = token.split("_")
        if len(parts) != 3 or parts[0] != "rl" or len(parts[1]) != 8 or len(parts[2]) != 32:
            raise ApiError(401, "Invalid API key format; expected rl_<8 chars>_<32 chars>")
        row = self._row(parts[1])
        if row is None or not hmac.compare_digest(row["key_hash"], hash_token(token)):
            raise ApiError(401, "Invalid API key")
        if not row["active"]:
            raise ApiError(401, "API key is inactive")
        if _expired(row["expires_at"]):
            raise ApiError(401, "API key has expired")
        return Principal(row["user_id"], row["id"], tuple(row["scopes"])), row


class AuthMiddleware:
    """Authenticates `Authorization: Bearer <key>`, throttles failures per address, enforces the hourly quota,
    adds X-RateLimit-* headers."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator, limiter: RateLimiter,
                 auth_failures_per_minute: int = 30):
        self.app = app
        self.authenticator = authenticator
        self.limiter = limiter
        self.failures = FailureThrottle(auth_failures_per_minute)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = ""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value.decode("latin-1").strip()
                break
        scope.setdefault("state", {})["principal"] = None
        if not header:
            await self.app(scope, receive, send)
            return
        token = header[7:].strip() if header[:7].lower() == "bearer " else header
        try:
            principal, row = self.authenticator.authenticate(token)
        except ApiError as exc:
            client = scope.get("client")
            wait = self.failures.fail(client[0] if client else "unknown")
            if wait is not None:
                details = {"retry_after": wait, "limit": self.failures.limit, "window_s": int(FAILURE_WINDOW_S)}
                await error_response(429, "rate_limit_exceeded",
                                     f"Too many failed authentications from this address; retry in {wait} s",
                                     details, headers={"Retry-After": str(wait)}, retry_after=wait
                                     )(scope, receive, send)
                return
            await error_response(exc.status, exc.code, exc.message)(scope, receive, send)
            return
        decision = self.limiter.hit(row["id"], row["requests_per_hour"])
        extra = [(k.lower().encode(), v.encode()) for k, v in decision.headers().items()]
        if not decision.allowed:
            reset_time = datetime.fromtimestamp(decision.reset, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            details = {"retry_after": decision.retry_after, "reset_time": reset_time, "limit": decision.limit}
            # retry_after/reset_time also at the top level, as an older RunRL API answered (spec §1.5)
            await error_response(429, "rate_limit_exceeded", "Rate limit exceeded: hourly quota consumed", details,
                                 headers=decision.headers(), retry_after=details["retry_after"],
                                 reset_time=reset_time)(scope, receive, send)
            return
        scope["state"]["principal"] = principal

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)
