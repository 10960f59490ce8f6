"""Webhooks: signed JSON deliveries of run and deployment status changes, sent from the server process.

Events (a webhook subscribes to any of them):
- `run.status_changed`: every queue transition of a run after it was created (SETTING_UP, RUNNING, the terminal
  states, PENDING again when a shutdown released it unstarted);
- `run.completed`, `run.failed`: also sent when a run reaches COMPLETED or FAILED;
- `deployment.status_changed`: a deployment became pending (created, or restarted with the server), active,
  failed or deleted.

Where events come from: `Store.notify(kind, id, status)` (server/store.py), called by `RunQueue` (queue.py) and
`DeploymentManager` (deploy.py) right after a status is written. `Dispatcher.emit` is that hook's listener: in the
caller's thread it finds the owner's subscribed webhooks (nothing else happens when there are none), builds the
payload with the routes' own functions (`run_object`, `deployment_object`, so `data` is what `GET /runs/{id}` or
`GET /deployments/{id}` answers at the moment of the change) and hands it to the event loop. It never blocks on
the network and never raises into the queue (`Store.notify` swallows and logs listener errors).

A delivery is one POST of `{"event", "created_at", "data"}` (compact JSON, UTF-8) with headers
`X-RunRL-Event`, `X-RunRL-Delivery` (one id per event per webhook, the same on every retry) and
`X-RunRL-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}." + body)>` (`sign`); each
attempt is signed afresh, so a receiver may refuse old timestamps. Each delivery is an asyncio task on the
server's loop: an attempt is bounded by `webhook_timeout_s` in all (connect, send, answer; the answer's body is
not read); a non-2xx answer, a timeout or a connection error is retried up to `webhook_attempts` attempts in all,
waiting `webhook_backoff_s` * 1, 2, 4, ... between them. Redirects (3xx) and destinations the policy refuses are
recorded and not retried: a retry cannot change them. At most `webhook_concurrency` attempts are in flight at
once, and at most two per webhook, so one hanging receiver holds two slots, never the queue or the API. Every
attempt is a row in `webhook_deliveries` (`GET /webhooks/{id}/deliveries`); the last one of a failed delivery
stays recorded as failed. Deliveries are concurrent, so they may arrive out of order: a receiver orders them by
`created_at` (or the object's `updated_at`).

Outbound destinations: the operator's policy (`runrl_engine.netpolicy`, settings `allow_private_destinations`
and `allowed_destinations`, as for MCP URLs): checked at registration (server/routes/webhooks.py) and again at
every connect (`AsyncGuardedTransport`: the resolved address is checked and connected to; no redirect is
followed; no environment proxy).

Not covered: persistence of pending deliveries. They live in memory: on shutdown (or beyond
`webhook_max_pending` at once) a delivery not yet done is dropped, and recorded as one failed attempt saying so;
nothing is resent after a restart. Events of runs created before a webhook existed are not replayed. The secret
is stored in the database as given (the server must sign with it); it is shown once, at creation.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from runrl_engine.netpolicy import AsyncGuardedTransport, DestinationDenied, DestinationPolicy, RedirectRefused
from server.routes.deployments import deployment_object
from server.routes.runs import run_object
from server.routes.tools import SERVER_HINT
from server.services import Services
from server.settings import Settings
from server.store import Store, now_iso

log = logging.getLogger("runrl.server.webhooks")

EVENTS = ("run.status_changed", "run.completed", "run.failed", "deployment.status_changed")
SIGNATURE_HEADER = "X-RunRL-Signature"
EVENT_HEADER = "X-RunRL-Event"
DELIVERY_HEADER = "X-RunRL-Delivery"
PER_WEBHOOK = 2  # attempts in flight at once to one webhook
DROPPED = "not delivered: the server shut down before this attempt (pending deliveries are not persisted)"
QUEUE_FULL = "not delivered: too many deliveries pending on this server (webhook_max_pending)"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `v1` signature: hex HMAC-SHA256 with key `secret` (UTF-8) over `f"{timestamp}."` + the raw body.

    A receiver recomputes it over the bytes it received (before parsing them) and the `t` of the header."""
    message = str(int(timestamp)).encode() + b"." + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """The `X-RunRL-Signature` value: `t=<unix seconds>,v1=<hex>`."""
    return f"t={int(timestamp)},v1={sign(secret, timestamp, body)}"


def events_for(kind: str, status: str) -> list[str]:
    """The events one status change raises."""
    if kind == "deployment":
        return ["deployment.status_changed"]
    return ["run.status_changed"] + {"COMPLETED": ["run.completed"], "FAILED": ["run.failed"]}.get(status, [])


@dataclass(frozen=True)
class Delivery:
    webhook_id: int
    delivery_id: str
    event: str
    body: bytes


@dataclass(frozen=True)
class Attempt:
    status_code: int | None
    success: bool
    error: str | None
    duration_ms: int
    retryable: bool


class Dispatcher:
    """Turns status changes into webhook deliveries. `start(services)` on the event loop, `stop()` at shutdown."""

    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings
        self.policy = DestinationPolicy(allow_private=settings.allow_private_destinations,
                                        allowed=tuple(settings.allowed_destinations), hint=SERVER_HINT)
        self._services: Services | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._transport: AsyncGuardedTransport | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._slots: asyncio.Semaphore | None = None
        self._per_hook: dict[int, asyncio.Semaphore] = {}

    async def start(self, services: Services) -> None:
        import httpx

        self._services = services
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(max(1, self.settings.webhook_concurrency))
        self._transport = AsyncGuardedTransport(self.policy)
        self._client = httpx.AsyncClient(transport=self._transport, trust_env=False,
                                         follow_redirects=False, timeout=httpx.Timeout(self.settings.webhook_timeout_s))
        self._closing = False
        self.store.listeners.append(self.emit)

    async def stop(self) -> None:
        """Drop what is pending (each recorded as a failed attempt) and close the client."""
        self._closing = True
        if self.emit in self.store.listeners:
            self.store.listeners.remove(self.emit)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    # ---- from any thread ---------------------------------------------------------------------------------
    def emit(self, kind: str, obj_id: int, status: str) -> None:
        """The `Store.notify` listener: queue a delivery to each of the owner's webhooks subscribed to the
        events of this change. Cheap when the owner has none (two indexed reads)."""
        if self._loop is None or self._services is None or kind not in ("run", "deployment"):
            return
        row = self.store.runs.get(obj_id) if kind == "run" else self.store.deployments.get(obj_id)
        if row is None:
            return
        events = events_for(kind, status)
        hooks = [h for h in self.store.webhooks.subscriptions(row["user_id"]) if set(h["events"]) & set(events)]
        if not hooks:
            return
        if kind == "run":
            data = run_object(self._services, row)
        else:
            data = deployment_object(self._services, row, self.settings.public_url.rstrip("/"))
        created = now_iso()
        for event in events:
            body = json.dumps({"event": event, "created_at": created, "data": data}, ensure_ascii=False,
                              separators=(",", ":"), default=str).encode("utf-8", errors="backslashreplace")
            for hook in hooks:
                if event in hook["events"]:
                    self._submit(Delivery(hook["id"], uuid.uuid4().hex, event, body))

    def _submit(self, delivery: Delivery) -> None:
        try:
            if self._closing or self._loop is None:
                raise RuntimeError("closing")
            self._loop.call_soon_threadsafe(self._spawn, delivery)
        except RuntimeError:  # the loop is closed or closing
            self._record(delivery, 1, Attempt(None, False, DROPPED, 0, False))

    def _record(self, d: Delivery, attempt: int, result: Attempt, retrying: bool = False) -> None:
        values = {"webhook_id": d.webhook_id, "delivery_id": d.delivery_id, "event": d.event, "attempt": attempt,
                  "status_code": result.status_code, "success": int(result.success), "error": result.error,
                  "duration_ms": result.duration_ms, "retrying": int(retrying), "delivered_at": now_iso()}
        try:  # not for a webhook deleted meanwhile (its deliveries went with it)
            self.store.webhooks.record_delivery(values)
        except Exception:  # a closed or busy database must not end the delivery task with a traceback
            log.exception("could not record webhook delivery %s attempt %s", d.delivery_id, attempt)

    # ---- on the event loop -------------------------------------------------------------------------------
    def _spawn(self, delivery: Delivery) -> None:
        if self._closing:
            self._record(delivery, 1, Attempt(None, False, DROPPED, 0, False))
            return
        if len(self._tasks) >= self.settings.webhook_max_pending:
            self._record(delivery, 1, Attempt(None, False, QUEUE_FULL, 0, False))
            return
        task = asyncio.get_running_loop().create_task(self._deliver(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, d: Delivery) -> None:
        attempts = max(1, self.settings.webhook_attempts)
        attempt = 1
        try:
            for attempt in range(1, attempts + 1):
                if attempt > 1:
                    await asyncio.sleep(self.settings.webhook_backoff_s * 2 ** (attempt - 2))
                result = await self._attempt(d)
                if result is None:
                    return  # the webhook was deleted meanwhile (its deliveries went with it)
                last = result.success or not result.retryable or attempt == attempts
                self._record(d, attempt, result, retrying=not last)
                if last:
                    return
        except asyncio.CancelledError:
            self._record(d, attempt, Attempt(None, False, DROPPED, 0, False))
            raise

    async def _attempt(self, d: Delivery) -> Attempt | None:
        """One POST; None when the webhook no longer exists (read once the slots are held, so a delivery that
        waited behind a hanging receiver is not sent after its webhook was deleted)."""
        timeout = self.settings.webhook_timeout_s
        hook_slots = self._per_hook.setdefault(d.webhook_id, asyncio.Semaphore(PER_WEBHOOK))
        assert self._slots is not None
        async with hook_slots, self._slots:  # waiting on a busy webhook holds no global slot
            hook = self.store.webhooks.get(d.webhook_id)
            if hook is None:
                return None
            url, secret = hook["url"], hook["secret"]
            headers = {"Content-Type": "application/json", "User-Agent": "RunRL-Webhooks/1",
                       SIGNATURE_HEADER: signature_header(secret, int(time.time()), d.body),
                       EVENT_HEADER: d.event, DELIVERY_HEADER: d.delivery_id}
            started = time.monotonic()

            def took() -> int:
                return int((time.monotonic() - started) * 1000)

            async def post() -> int:
                async with self._client.stream("POST", url, content=d.body, headers=headers) as response:
                    return response.status_code  # the body is not read

            import httpx

            try:
                code = await asyncio.wait_for(post(), timeout)
            except RedirectRefused as exc:
                return Attempt(exc.status, False, str(exc), took(), False)
            except DestinationDenied as exc:
                return Attempt(None, False, str(exc), took(), False)
            except (asyncio.TimeoutError, httpx.TimeoutException):
                return Attempt(None, False, f"timed out after {timeout:g} s", took(), True)
            except httpx.HTTPError as exc:
                return Attempt(None, False, f"connection failed: {type(exc).__name__}: {exc}"[:500], took(), True)
            except Exception as exc:  # noqa: BLE001 -- recorded, never raised into the loop
                log.exception("webhook delivery %s failed unexpectedly", d.delivery_id)
                return Attempt(None, False, f"delivery failed: {type(exc).__name__}"[:500], took(), True)
            finally:  # refusals are caught above; the transport's own list of them would only grow
                if self._transport is not None:
                    self._transport.refusals.clear()
        ok = 200 <= code < 300
        return Attempt(code, ok, None if ok else f"HTTP {code}", took(), True)
