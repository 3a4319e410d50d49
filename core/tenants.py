"""Tenants, their API keys and their quotas.

Every model, dataset and job belongs to the tenant of the key that made it, and a key reaches
only its own tenant's rows (another tenant's id is a 404, exactly like an id that never existed).
Admin keys also create tenants and keys; their data access stays within their own tenant.

Quotas are checked where the work is admitted, under a lock on the tenant's row so that two
concurrent requests cannot both take the last slot: queued+running jobs at POST /jobs, stored
bytes and uploads per minute at POST /models and /datasets (before the body is read, and again
with the real size). Each refusal is a 429 with ``Retry-After``.

The API's routes and the ``cvopt tenants`` / ``cvopt keys`` commands both call these functions
(keyword-only, session passed in; the caller commits), so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import func, select, union_all
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from core.models import (
    DEFAULT_TENANT_ID,
    ApiKey,
    Dataset,
    Job,
    JobStatus,
    Model,
    Tenant,
    utcnow,
)
from core.schemas import Quotas, TenantCreate, TenantRead, TenantUsage
from core.settings import Settings

# How long a client should wait before retrying when its concurrent-jobs quota is full: jobs
# take seconds to minutes, so a short, fixed hint is better than none.
JOBS_RETRY_AFTER_S = 30
STORAGE_RETRY_AFTER_S = 300  # storage frees only when the tenant deletes something


def hash_key(key: str) -> str:
    # Keys are 256-bit random tokens, so a plain sha256 is enough (no salt or slow hash needed).
    return hashlib.sha256(key.encode()).hexdigest()


def ensure_key(*, session: Session, tenant_id: str, name: str, plain: str, admin: bool) -> tuple[ApiKey, bool]:
    """The key ``plain`` for the tenant and whether it was added now (it is unless a key with its
    hash exists): the operator's bootstrap key, given at every start-up."""
    key_hash = hash_key(plain)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))
    if row is not None:
        return row, False
    row = ApiKey(tenant_id=tenant_id, name=name, prefix=plain[:8], key_hash=key_hash, is_admin=admin)
    session.add(row)
    session.flush()
    return row, True


def load_live_key(*, session: Session, key_hash: str) -> ApiKey | None:
    """The unrevoked key with this hash, detached from the session (ready for ``API_KEYS``);
    the transaction is ended, so no connection stays held."""
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))
    session.commit()
    if key is None or key.revoked_at is not None:
        return None
    session.expunge(key)
    return key


# -- tenants -------------------------------------------------------------------------------------


def ensure_default_tenant(session: Session) -> Tenant:
    tenant = session.get(Tenant, DEFAULT_TENANT_ID)
    if tenant is None:
        tenant = Tenant(id=DEFAULT_TENANT_ID, name=DEFAULT_TENANT_ID)
        session.add(tenant)
        session.flush()
    return tenant


def create_tenant(*, session: Session, tenant_in: TenantCreate) -> Tenant:
    tenant = Tenant(name=tenant_in.name, **tenant_in.model_dump(exclude={"name"}))
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError as exc:  # the name is unique: taken before, or by a concurrent request
        session.rollback()
        raise Conflict(
            f"a tenant named {tenant_in.name!r} exists", code="tenant_exists", details={"name": tenant_in.name}
        ) from exc
    return tenant


def list_tenants(*, session: Session, limit: int | None = None, offset: int = 0) -> tuple[list[Tenant], int]:
    """A page of tenants, oldest first, and how many there are in all."""
    query = select(Tenant).order_by(Tenant.created_at, Tenant.id).limit(limit).offset(offset)
    count = session.scalar(select(func.count()).select_from(Tenant)) or 0
    return list(session.scalars(query)), count


def rotate_webhook_secret(*, session: Session, tenant_id: str) -> Tenant:
    """A new secret for the tenant's webhooks; those sent from the commit on are signed with it."""
    tenant = get_tenant(session=session, tenant_id=tenant_id)
    tenant.webhook_secret = secrets.token_hex(32)
    session.flush()
    return tenant


def get_tenant(*, session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"tenant {tenant_id} not found", code="tenant_not_found", details={"tenant_id": tenant_id})
    return tenant


def effective_quotas(tenant: Tenant, settings: Settings) -> dict[str, int]:
    def pick(own: int | None, default: int) -> int:
        return default if own is None else own

    return {
        "max_concurrent_jobs": pick(tenant.max_concurrent_jobs, settings.quota_concurrent_jobs),
        "max_storage_bytes": pick(tenant.max_storage_bytes, settings.quota_storage_bytes),
        "max_uploads_per_minute": pick(tenant.max_uploads_per_minute, settings.quota_uploads_per_minute),
    }


def _active_jobs(session: Session, tenant_id: str) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.tenant_id == tenant_id, Job.status.in_([JobStatus.queued, JobStatus.running]))
        )
        or 0
    )


def _stored_bytes(session: Session, tenant_id: str) -> int:
    return int(
        sum(
            session.scalar(
                select(func.coalesce(func.sum(table.size_bytes), 0)).where(
                    table.tenant_id == tenant_id, table.deleted_at.is_(None)
                )
            )
            or 0
            for table in (Model, Dataset)
        )
    )


def usage(session: Session, tenant_id: str) -> TenantUsage:
    return TenantUsage(
        active_jobs=_active_jobs(session, tenant_id),
        storage_bytes=_stored_bytes(session, tenant_id),
        uploads_last_minute=len(_recent_uploads(session, tenant_id)),
    )


def tenant_to_read(session: Session, tenant: Tenant, settings: Settings, *, with_usage: bool = True) -> TenantRead:
    return TenantRead(
        id=tenant.id,
        name=tenant.name,
        created_at=tenant.created_at,
        quotas=Quotas(
            max_concurrent_jobs=tenant.max_concurrent_jobs,
            max_storage_bytes=tenant.max_storage_bytes,
            max_uploads_per_minute=tenant.max_uploads_per_minute,
        ),
        effective_quotas=effective_quotas(tenant, settings),
        usage=usage(session, tenant.id) if with_usage else None,
    )


# -- keys ------------------------------------------------------------------------------------------


def create_key(*, session: Session, tenant_id: str, name: str, admin: bool) -> tuple[ApiKey, str]:
    """A new key for the tenant: (row, the key in clear, to show once)."""
    if session.get(Tenant, tenant_id) is None:
        raise InvalidInput(f"tenant {tenant_id} not found", code="tenant_not_found", details={"tenant_id": tenant_id})
    plain = "cvopt_" + secrets.token_urlsafe(32)
    row = ApiKey(tenant_id=tenant_id, name=name, prefix=plain[:12], key_hash=hash_key(plain), is_admin=admin)
    session.add(row)
    session.flush()
    return row, plain


def list_keys(
    *, session: Session, tenant_id: str | None = None, limit: int | None = None, offset: int = 0
) -> tuple[list[ApiKey], int]:
    """A page of keys (all tenants', or one tenant's), oldest first, and how many there are in all."""
    query, count_query = select(ApiKey), select(func.count()).select_from(ApiKey)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
        count_query = count_query.where(ApiKey.tenant_id == tenant_id)
    rows = session.scalars(query.order_by(ApiKey.created_at, ApiKey.id).limit(limit).offset(offset))
    return list(rows), session.scalar(count_query) or 0


def revoke_key(*, session: Session, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"API key {key_id} not found", code="key_not_found", details={"key_id": key_id})
    row.revoked_at = row.revoked_at or utcnow()
    session.flush()
    return row


# -- quotas ----------------------------------------------------------------------------------------


def _lock_tenant(session: Session, tenant_id: str) -> Tenant:
    """The tenant's row, locked until the transaction ends: quota checks of one tenant are
    serialized, so that the count and the insert it admits are one step."""
    return session.execute(select(Tenant).where(Tenant.id == tenant_id).with_for_update()).scalar_one()


def _recent_uploads(session: Session, tenant_id: str) -> list[datetime]:
    since = utcnow() - timedelta(seconds=60)
    made = union_all(
        select(Model.created_at.label("at")).where(Model.tenant_id == tenant_id, Model.created_at >= since),
        select(Dataset.created_at.label("at")).where(Dataset.tenant_id == tenant_id, Dataset.created_at >= since),
    ).subquery()
    return list(session.scalars(select(made.c.at).order_by(made.c.at)))


def admit_upload(session: Session, tenant_id: str, settings: Settings) -> Callable[[int], None]:
    """The upload routes' check before the body is read: the quotas against the declared size;
    the transaction ends at once (the body may take minutes to arrive)."""

    def admit(file_bytes: int) -> None:
        check_upload_quota(session, tenant_id, settings, file_bytes)
        session.commit()

    return admit


def check_job_quota(session: Session, tenant_id: str, settings: Settings) -> None:
    tenant = _lock_tenant(session, tenant_id)
    limit = effective_quotas(tenant, settings)["max_concurrent_jobs"]
    if not limit:
        return
    active = _active_jobs(session, tenant_id)
    if active >= limit:
        raise QuotaExceeded(
            f"tenant {tenant.name!r} has {active} queued or running jobs, its limit; wait for one to end or cancel one",
            code="quota_concurrent_jobs",
            retry_after=JOBS_RETRY_AFTER_S,
            details={"limit": limit, "active_jobs": active},
        )


def check_upload_quota(session: Session, tenant_id: str, settings: Settings, incoming_bytes: int) -> None:
    """Before an upload is read (``incoming_bytes`` from Content-Length, 0 if unknown) and again
    in the transaction that stores it (its real size): the rate, then the storage."""
    tenant = _lock_tenant(session, tenant_id)
    quotas = effective_quotas(tenant, settings)
    rate = quotas["max_uploads_per_minute"]
    if rate:
        recent = _recent_uploads(session, tenant_id)
        if len(recent) >= rate:
            oldest = recent[-rate]
            wait = 60 - (utcnow() - oldest).total_seconds()
            raise QuotaExceeded(
                f"tenant {tenant.name!r} made {len(recent)} uploads in the last minute, its limit",
                code="quota_upload_rate",
                retry_after=math.ceil(wait),
                details={"limit_per_minute": rate, "uploads_last_minute": len(recent)},
            )
    cap = quotas["max_storage_bytes"]
    if cap:
        used = _stored_bytes(session, tenant_id)
        if used + incoming_bytes > cap:
            raise QuotaExceeded(
                f"tenant {tenant.name!r} stores {used} bytes; {incoming_bytes} more would pass its limit of "
                f"{cap} bytes; delete models or datasets it no longer needs",
                code="quota_storage",
                retry_after=STORAGE_RETRY_AFTER_S,
                details={"limit_bytes": cap, "used_bytes": used, "incoming_bytes": incoming_bytes},
            )
