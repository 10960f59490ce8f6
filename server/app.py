"""`create_app(settings)`: the RunRL REST service assembled from data.

Routes come from one list per resource module (`server/routes/*`), all mounted under `/api/v1` (the web dashboard,
server/dashboard, is served at `/` and `/static/`, outside it); middleware
is a list (auth + quota); exception handlers map everything to the envelope (server/errors.py); the lifespan
opens the store, recovers runs left behind by a previous process, starts the worker slots, and keeps house
(key usage counters flushed, runs with expired leases resumed). Importing this module does not import torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount

from server import dashboard
from server.auth import AuthMiddleware, Authenticator
from server.errors import EXCEPTION_HANDLERS
from server.hygiene import HygieneMiddleware
from server.queue import RunQueue
from server.ratelimit import RateLimiter
from server.deploy import DeploymentManager
from server.routes import deployments, files, health, keys, run_model, runs, search, shared, tools, validation, webhooks
from server.routes.validation import ValidationPool
from server import openapi
from server.services import Services
from server.settings import Settings
from server.store import Store
from server.webhooks import Dispatcher
from server.worker import Worker

log = logging.getLogger("runrl.server")
API_PREFIX = "/api/v1"
RESOURCE_ROUTES = [health.ROUTES, keys.ROUTES, files.ROUTES, validation.ROUTES, runs.ROUTES, tools.ROUTES,
                   shared.ROUTES, search.ROUTES, deployments.ROUTES, webhooks.ROUTES, run_model.ROUTES]
USAGE_FLUSH_S = 5.0


def build_services(settings: Settings) -> Services:
    for d in (settings.data_dir, settings.files_dir, settings.runs_dir):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)  # holds user files and run secrets
    store = Store(settings.db_path)
    queue = RunQueue(store, worker_id=uuid.uuid4().hex, lease_s=settings.lease_s, max_resumes=settings.max_resumes)
    return Services(settings=settings, store=store, auth=Authenticator(store), limiter=RateLimiter(), queue=queue,
                    worker=Worker(settings, store, queue),
                    deployments=DeploymentManager(store, settings.runs_dir, settings.deploy_command,
                                                  settings.data_dir / "deployments"),
                    validation=ValidationPool(settings.validation_workers, settings.validation_per_user,
                                              settings.data_dir / "validate"),
                    webhooks=Dispatcher(store, settings))


def create_app(settings: Settings) -> Starlette:
    services = build_services(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await services.webhooks.start(services)  # first: recovery's and the worker's status changes are events
        recovered = services.queue.recover(settings.runs_dir)
        if recovered:
            log.warning("runs left in progress by the previous server, resumed or ended: %s", recovered)
        if settings.start_worker:
            services.worker.start()
        services.deployments.resume_all()

        async def housekeeping() -> None:
            """Flush key-usage counters; resume runs whose lease expired (a worker slot that died)."""
            last_sweep = time.monotonic()
            while True:
                await asyncio.sleep(USAGE_FLUSH_S)
                try:  # a busy database ("database is locked") must not end housekeeping for good
                    services.limiter.flush(services.store)
                    if time.monotonic() - last_sweep > settings.lease_s:
                        last_sweep = time.monotonic()
                        await asyncio.to_thread(services.queue.recover, settings.runs_dir)
                except Exception:
                    log.exception("housekeeping failed; retrying in %s s", USAGE_FLUSH_S)

        flusher = asyncio.create_task(housekeeping())
        try:
            yield
        finally:
            flusher.cancel()
            await asyncio.to_thread(services.worker.stop)
            services.deployments.shutdown()
            await services.webhooks.stop()  # pending deliveries are dropped (each recorded), not persisted
            services.validation.shutdown()
            services.limiter.flush(services.store)
            services.store.close()

    routes = [route for group in RESOURCE_ROUTES for route in group]
    app = Starlette(
        # GET /api/v1/openapi.json (public, built from these routes; before the Mount, which would take its path);
        # the dashboard: `/`, `/static/...`
        routes=[openapi.route(API_PREFIX), Mount(API_PREFIX, routes=routes), *dashboard.routes()],
        middleware=[Middleware(HygieneMiddleware, settings=settings),  # body caps; a 500 that keeps the connection
                    Middleware(AuthMiddleware, authenticator=services.auth, limiter=services.limiter,
                               auth_failures_per_minute=settings.auth_failures_per_minute)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.services = services
    return app
