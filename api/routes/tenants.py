"""Tenants and API keys: admin keys manage them; any key reads its own tenant (usage, quotas)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from api.deps import (
    AdminKey,
    CurrentKey,
    Limit,
    Offset,
    SessionDep,
    SettingsDep,
    released,
)
from api.key_cache import API_KEYS
from core import tenants as svc
from core.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyRead,
    ApiKeysRead,
    TenantCreate,
    TenantCreated,
    TenantRead,
    TenantsRead,
    WebhookSecret,
)

router = APIRouter(tags=["tenants"])


@router.post("/tenants", status_code=201, response_model=TenantCreated)
def create_tenant(
    tenant_in: TenantCreate,
    request: Request,
    response: Response,
    _admin: AdminKey,
    session: SessionDep,
    settings: SettingsDep,
) -> TenantCreated:
    """Create a tenant (admin keys only); then give it keys with POST /v1/keys."""
    tenant = svc.create_tenant(session=session, tenant_in=tenant_in)
    session.commit()
    response.headers["Location"] = str(request.url_for("read_tenant", tenant_id=tenant.id).path)
    read = svc.tenant_to_read(session, tenant, settings)
    return released(session, TenantCreated(**read.model_dump(), webhook_secret=tenant.webhook_secret))


@router.get("/tenants", response_model=TenantsRead)
def list_tenants(
    _admin: AdminKey, session: SessionDep, settings: SettingsDep, limit: Limit = 50, offset: Offset = 0
) -> TenantsRead:
    rows, count = svc.list_tenants(session=session, limit=limit, offset=offset)
    data = [svc.tenant_to_read(session, t, settings, with_usage=False) for t in rows]
    return released(session, TenantsRead(data=data, count=count))


@router.get("/tenant", response_model=TenantRead)
def read_own_tenant(key: CurrentKey, session: SessionDep, settings: SettingsDep) -> TenantRead:
    """The caller's own tenant: its quotas and what it uses of them now."""
    tenant = svc.get_tenant(session=session, tenant_id=key.tenant_id)
    return released(session, svc.tenant_to_read(session, tenant, settings))


@router.get("/tenant/webhook-secret", response_model=WebhookSecret)
def read_webhook_secret(key: CurrentKey, session: SessionDep) -> WebhookSecret:
    """The secret the caller's tenant's webhooks are signed with."""
    tenant = svc.get_tenant(session=session, tenant_id=key.tenant_id)
    return released(session, WebhookSecret(webhook_secret=tenant.webhook_secret))


@router.post("/tenant/webhook-secret", response_model=WebhookSecret)
def rotate_webhook_secret(key: CurrentKey, session: SessionDep) -> WebhookSecret:
    """A new secret for the caller's tenant; webhooks sent from now on are signed with it."""
    tenant = svc.rotate_webhook_secret(session=session, tenant_id=key.tenant_id)
    session.commit()
    return WebhookSecret(webhook_secret=tenant.webhook_secret)


@router.get("/tenants/{tenant_id}", response_model=TenantRead)
def read_tenant(tenant_id: str, _admin: AdminKey, session: SessionDep, settings: SettingsDep) -> TenantRead:
    tenant = svc.get_tenant(session=session, tenant_id=tenant_id)
    return released(session, svc.tenant_to_read(session, tenant, settings))


@router.post("/keys", status_code=201, response_model=ApiKeyCreated)
def create_key(key_in: ApiKeyCreate, _admin: AdminKey, session: SessionDep) -> ApiKeyCreated:
    """A new key for a tenant (admin keys only). The key is in this answer only."""
    row, plain = svc.create_key(session=session, tenant_id=key_in.tenant_id, name=key_in.name, admin=key_in.admin)
    session.commit()
    return ApiKeyCreated(**ApiKeyRead.model_validate(row).model_dump(), key=plain)


@router.get("/keys", response_model=ApiKeysRead)
def list_keys(
    _admin: AdminKey, session: SessionDep, tenant_id: str | None = None, limit: Limit = 50, offset: Offset = 0
) -> ApiKeysRead:
    rows, count = svc.list_keys(session=session, tenant_id=tenant_id, limit=limit, offset=offset)
    return released(session, ApiKeysRead(data=[ApiKeyRead.model_validate(r) for r in rows], count=count))


@router.delete("/keys/{key_id}", status_code=204)
def revoke_key(key_id: str, _admin: AdminKey, session: SessionDep) -> Response:
    """Revoke a key (admin keys only): it stops working at once in this API process, and within
    CVOPT_API_KEY_CACHE_SECONDS in the others."""
    svc.revoke_key(session=session, key_id=key_id)
    session.commit()
    # Once committed: a lookup in flight read it unrevoked and must not keep it (API_KEYS'
    # generation); other API processes drop it within CVOPT_API_KEY_CACHE_SECONDS.
    API_KEYS.forget(key_id)
    return Response(status_code=204)
