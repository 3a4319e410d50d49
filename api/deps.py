"""Injected dependencies: sessions, the store, settings and the caller's API key."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import get_sessionmaker
from core.errors import Unauthorized
from core.models import ApiKey
from core.settings import Settings, get_settings
from core.storage import ObjectStore, get_store


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def hash_key(key: str) -> str:
    # Keys are 256-bit random tokens, so a plain sha256 is enough (no salt or slow hash needed).
    return hashlib.sha256(key.encode()).hexdigest()


def current_key(request: Request, session: SessionDep) -> ApiKey:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send the API key as 'Authorization: Bearer <key>'", code="missing_api_key")
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(token.strip())))
    if key is None or key.revoked_at is not None:
        raise Unauthorized("the API key is not valid", code="invalid_api_key")
    return key


CurrentKey = Annotated[ApiKey, Depends(current_key)]


def public_base_url(request: Request, settings: SettingsDep) -> str:
    return settings.public_url or str(request.base_url)


BaseUrlDep = Annotated[str, Depends(public_base_url)]
