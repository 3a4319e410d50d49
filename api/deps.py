"""Injected dependencies: sessions, the store, settings and the caller's API key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, TypeVar

from fastapi import Depends, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.key_cache import API_KEYS
from core.db import get_sessionmaker
from core.errors import Forbidden, Unauthorized
from core.models import ApiKey
from core.settings import Settings, get_settings
from core.storage import ObjectStore, get_store
from core.tenants import hash_key, load_live_key


async def get_session() -> AsyncIterator[Session]:
    """A session per request, without a thread of its own.

    Making one does no I/O, so this runs on the event loop. Each sync dependency and the route
    run in separate thread-pool hops; a connection held across hops can deadlock the pool under
    load (requests holding connections while waiting for a thread, threads waiting for a
    connection). So every hop ends its transaction (current_key commits after its lookup,
    routes commit or only read), and the close here is then a no-op or a quick rollback.
    """
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


async def _store() -> ObjectStore:
    # async: FastAPI runs sync dependencies in the thread pool; these are cached lookups and
    # not worth a thread hop on every request.
    return get_store()


async def _settings() -> Settings:
    return get_settings()


SessionDep = Annotated[Session, Depends(get_session)]

T = TypeVar("T")


def released(session: Session, value: T) -> T:
    """Return ``value`` after ending the session's transaction: a sync route's response is
    validated in another thread-pool hop, which must not wait while holding a connection."""
    session.commit()
    return value


def rendered(session: Session, value: BaseModel) -> Response:
    """``value`` as the JSON response, after ending the session's transaction. The body is made
    in the route's own thread-pool hop (what FastAPI would make of the route's response_model);
    returned as a model, it would wait in the pool's queue a second time to be validated."""
    session.commit()
    return Response(value.model_dump_json(by_alias=True), media_type="application/json")


StoreDep = Annotated[ObjectStore, Depends(_store)]
SettingsDep = Annotated[Settings, Depends(_settings)]


def _presented_key_hash(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send the API key as 'Authorization: Bearer <key>'", code="missing_api_key")
    return hash_key(token.strip())


def _look_up_key(session: Session, key_hash: str) -> ApiKey:
    generation = API_KEYS.generation
    key = load_live_key(session=session, key_hash=key_hash)
    if key is None:
        raise Unauthorized("the API key is not valid", code="invalid_api_key")
    API_KEYS.put(key_hash, key, get_settings().api_key_cache_seconds, generation)
    return key


async def current_key(request: Request, session: SessionDep) -> ApiKey:
    """The caller's live key. A key this process looked up within CVOPT_API_KEY_CACHE_SECONDS
    is answered on the event loop; only a lookup takes a thread (and a connection)."""
    key_hash = _presented_key_hash(request)
    return API_KEYS.get(key_hash) or await run_in_threadpool(_look_up_key, session, key_hash)


def current_key_in_thread(request: Request, session: Session) -> ApiKey:
    """``current_key`` for a sync route that needs a key only in some cases (the report page)."""
    key_hash = _presented_key_hash(request)
    return API_KEYS.get(key_hash) or _look_up_key(session, key_hash)


CurrentKey = Annotated[ApiKey, Depends(current_key)]


async def admin_key(key: CurrentKey) -> ApiKey:
    if not key.is_admin:
        raise Forbidden("this route needs an admin API key", code="admin_required")
    return key


AdminKey = Annotated[ApiKey, Depends(admin_key)]

# Paging for every list route; bounded so that a huge offset is a 422, not a database overflow.
Limit = Annotated[int, Query(ge=1, le=500, description="Rows per page.")]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000, description="Rows to skip.")]


async def public_base_url(request: Request, settings: SettingsDep) -> str:
    return settings.public_url or str(request.base_url)


BaseUrlDep = Annotated[str, Depends(public_base_url)]
