"""The FastAPI app. The current API version is served under /v1 and, as an alias hidden from
the schema, at the root: one router mounted twice."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import APIRouter, FastAPI

from api.errors import install_error_handlers
from api.observability import install_request_context
from api.routes import datasets, jobs, models, system, tenants, workers
from core.db import session_scope
from core.logs import setup as setup_logging
from core.settings import get_settings
from core.storage import get_store
from core.tenants import ensure_default_tenant, ensure_key

log = logging.getLogger("cvopt.api")


def ensure_bootstrap_key() -> None:
    """The bootstrap key is an admin key of the default tenant: the operator's first key, which
    creates the tenants and their keys."""
    key = get_settings().bootstrap_api_key
    if not key:
        return
    with session_scope() as session:
        tenant = ensure_default_tenant(session)
        _, created = ensure_key(session=session, tenant_id=tenant.id, name="bootstrap", plain=key, admin=True)
        if created:
            log.info("created the bootstrap API key")


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    # Sync routes and dependencies run in this pool. Requests are short and CPU-bound under
    # one GIL: a few threads serve more requests per second than 40 that fight for the GIL.
    anyio.to_thread.current_default_thread_limiter().total_tokens = get_settings().api_threads
    if not logging.getLogger().handlers:  # an API process uvicorn started itself (--workers N)
        setup_logging()
    ensure_bootstrap_key()
    get_store()  # built now, to be frozen below: an S3 client is some 50k objects
    # What is imported and built by now lives as long as the process. Frozen, it is no longer
    # walked by each full collection (60-140 ms of GIL held each under load on 2 cores: the p99).
    gc.collect()
    gc.freeze()
    yield


def create_app() -> FastAPI:
    app = FastAPI(
        title="cvopt",
        version="1",
        summary="Optimize computer-vision models: prune, quantize, export, benchmark.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_request_context(app)
    v1 = APIRouter()
    for module in (models, datasets, jobs, workers, tenants):
        v1.include_router(module.router)
    app.include_router(v1, prefix="/v1")
    app.include_router(v1, include_in_schema=False)
    app.include_router(system.router)
    return app


app = create_app()
