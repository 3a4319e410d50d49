"""``Idempotency-Key`` on the creating POSTs (jobs, models, datasets).

A pipeline that retries a POST after a timeout must not get a second job. The first request
stores (key, request hash, what it made) in the same transaction as the resource, under a primary
key of (API key, route, idempotency key): a retry finds it and gets that resource back with the
original status code and ``Idempotent-Replayed: true``; two retries racing each other collide on
the primary key and the loser returns the winner's resource. The same key with a different
request is a 422; keys are forgotten after ``CVOPT_IDEMPOTENCY_TTL_SECONDS``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from fastapi import Request, Response
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import InvalidInput, NotFound
from core.models import ApiKey, IdempotencyRecord, utcnow
from core.settings import get_settings

HEADER = "Idempotency-Key"
T = TypeVar("T")


def key_of(request: Request) -> str | None:
    value = request.headers.get(HEADER)
    if value is None:
        return None
    value = value.strip()
    if not 1 <= len(value) <= 255 or not value.isprintable():
        raise InvalidInput(f"{HEADER} must be 1 to 255 printable characters", code="invalid_idempotency_key")
    return value


def request_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def find(session: Session, api_key: ApiKey, route: str, key: str, digest: str) -> IdempotencyRecord | None:
    """The live record for this key, or None; the same key with another request is a 422."""
    record = session.get(IdempotencyRecord, (api_key.id, route, key))
    ttl = timedelta(seconds=get_settings().idempotency_ttl_seconds)
    if record is None or record.created_at < utcnow() - ttl:
        return None
    if record.request_hash != digest:
        raise InvalidInput(
            f"{HEADER} {key!r} was already used with a different request; use a new key for a new request",
            code="idempotency_key_reused",
            details={"resource_id": record.resource_id},
        )
    return record


def remember(
    session: Session, api_key: ApiKey, route: str, key: str, digest: str, resource_id: str, status_code: int
) -> None:
    """Add the record to the resource's transaction (and drop this key's expired one)."""
    ttl = timedelta(seconds=get_settings().idempotency_ttl_seconds)
    session.execute(
        delete(IdempotencyRecord).where(
            IdempotencyRecord.api_key_id == api_key.id,
            IdempotencyRecord.route == route,
            IdempotencyRecord.key == key,
            IdempotencyRecord.created_at < utcnow() - ttl,
        )
    )
    session.add(
        IdempotencyRecord(
            api_key_id=api_key.id,
            route=route,
            key=key,
            request_hash=digest,
            resource_id=resource_id,
            status_code=status_code,
        )
    )


def mark_replayed(response: Response, record: IdempotencyRecord) -> None:
    response.status_code = record.status_code
    response.headers["Idempotent-Replayed"] = "true"


def create_once(
    session: Session,
    api_key: ApiKey,
    route: str,
    key: str | None,
    digest: str,
    *,
    make: Callable[[], T],
    load: Callable[[str], T],
    status_code: int,
    response: Response,
    discard: Callable[[T], None] | None = None,
) -> tuple[T, bool]:
    """Make and commit a resource, once per idempotency key: (the resource, whether it is a
    replay). ``make`` adds the row (id set, not committed), ``load`` reads one back by id,
    ``discard`` undoes what ``make`` did outside the database (a stored object) when a
    concurrent request with the same key won the commit."""
    if key and (record := find(session, api_key, route, key, digest)):
        try:
            resource = load(record.resource_id)
        except NotFound:  # deleted before deleting freed its keys: the key is free
            session.delete(record)
            session.flush()
        else:
            mark_replayed(response, record)
            return resource, True
    row = make()
    if key:
        remember(session, api_key, route, key, digest, row.id, status_code)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        if discard is not None:
            discard(row)
        if not key:
            raise
        record = find(session, api_key, route, key, digest)
        mark_replayed(response, record)
        return load(record.resource_id), True
    return row, False
