"""`Services`: everything a route needs (settings, the store, the queue and its worker, deployments, webhooks,
the validation pool, auth, rate limits, the response cache), built once per app by `server.app.build_services`
and read by routes through `server.routes.services(request)`.

This module only declares the type. Its field types are imported for type checkers alone, so that route modules
(which those services import back, e.g. webhooks -> routes.runs) can import `Services` without a cycle; it does
not build anything and holds no state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.store import ResponseCache

if TYPE_CHECKING:
    from server.auth import Authenticator
    from server.deploy import DeploymentManager
    from server.queue import RunQueue
    from server.ratelimit import RateLimiter
    from server.routes.validation import ValidationPool
    from server.settings import Settings
    from server.store import Store
    from server.webhooks import Dispatcher
    from server.worker import Worker


@dataclass
class Services:
    """Everything a route needs, built once per app (no module-level state)."""

    settings: Settings
    store: Store
    auth: Authenticator
    limiter: RateLimiter
    queue: RunQueue
    worker: Worker
    deployments: DeploymentManager
    validation: ValidationPool
    webhooks: Dispatcher
    cache: ResponseCache = field(default_factory=ResponseCache)
