"""Per-key hourly request quota (spec §1.5), and the per-address throttle of failed authentications.

`RateLimiter`: fixed windows aligned to the clock hour: a key may make `requests_per_hour` requests per hour,
the window resets at the top of the next hour (`X-RateLimit-Reset`, unix seconds), and a request over the quota
is answered 429 `rate_limit_exceeded` with `Retry-After`. Counters live in memory (one server process per data
dir); lifetime totals are flushed to the store in batches so that counting never costs a write per request.

`FailureThrottle`: failed authentications counted per client address in a 60-second window that opens at the
address's first failure; past `limit` failures in the window the address is over (see auth.py for what that
does). Only in memory; at most `MAX_ADDRESSES` addresses are tracked (stale windows are dropped first).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from server.store import Store, now_iso

WINDOW_S = 3600


@dataclass
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset: int  # unix seconds when the window ends

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil(self.reset - time.time()))

    def headers(self) -> dict[str, str]:
        h = {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
             "X-RateLimit-Reset": str(self.reset)}
        if not self.allowed:
            h["Retry-After"] = str(self.retry_after)
        return h


class RateLimiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[int, tuple[int, int]] = {}  # key id -> (window start, count)
        self._unflushed: dict[int, tuple[int, str]] = {}

    def hit(self, key_id: int, limit: int, now: float | None = None) -> Decision:
        now = time.time() if now is None else now
        start = int(now // WINDOW_S * WINDOW_S)
        with self._lock:
            w_start, count = self._windows.get(key_id, (start, 0))
            if w_start != start:
                count = 0
            allowed = count < limit
            if allowed:
                count += 1
                n, _ = self._unflushed.get(key_id, (0, ""))
                self._unflushed[key_id] = (n + 1, now_iso())
            self._windows[key_id] = (start, count)
        return Decision(allowed, limit, max(0, limit - count), start + WINDOW_S)

    def used(self, key_id: int, now: float | None = None) -> tuple[int, int]:
        """(requests in the current window, window reset time)."""
        now = time.time() if now is None else now
        start = int(now // WINDOW_S * WINDOW_S)
        with self._lock:
            w_start, count = self._windows.get(key_id, (start, 0))
        return (count if w_start == start else 0), start + WINDOW_S

    def unflushed(self, key_id: int) -> int:
        with self._lock:
            return self._unflushed.get(key_id, (0, ""))[0]

    def flush(self, store: Store) -> None:
        with self._lock:
            pending, self._unflushed = self._unflushed, {}
        if not pending:
            return
        try:
            store.keys.add_usage(pending)
        except Exception:  # keep the counts for the next flush (e.g. "database is locked")
            with self._lock:
                for key_id, (n, last) in pending.items():
                    m, newer = self._unflushed.get(key_id, (0, last))
                    self._unflushed[key_id] = (n + m, max(last, newer))
            raise


FAILURE_WINDOW_S = 60.0
MAX_ADDRESSES = 10_000


class FailureThrottle:
    """Failed authentications per client address per minute; `limit <= 0` turns the throttle off."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}  # address -> (window start, failures in it)

    def fail(self, address: str, now: float | None = None) -> int | None:
        """Count one failure from `address`; returns the seconds to wait when the address is over the limit."""
        if self.limit <= 0:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            start, count = self._windows.get(address, (now, 0))
            if now - start >= FAILURE_WINDOW_S:
                start, count = now, 0
            if address not in self._windows and len(self._windows) >= MAX_ADDRESSES:
                self._windows = {a: w for a, w in self._windows.items() if now - w[0] < FAILURE_WINDOW_S}
                if len(self._windows) >= MAX_ADDRESSES:
                    self._windows.clear()
            count += 1
            self._windows[address] = (start, count)
        if count <= self.limit:
            return None
        return max(1, math.ceil(start + FAILURE_WINDOW_S - now))
