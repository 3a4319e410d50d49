from __future__ import annotations

from fastapi import APIRouter, Request, Response
from sqlalchemy import func, select

from api import idempotency, services
from api.deps import (
    CurrentKey,
    Limit,
    Offset,
    SessionDep,
    SettingsDep,
    StoreDep,
    released,
)
from api.uploads import Upload, handle_upload, multipart_openapi
from core.models import Model
from core.schemas import ModelRead, ModelsRead
from core.tenants import admit_upload

router = APIRouter(prefix="/models", tags=["models"])


@router.post(
    "",
    status_code=201,
    response_model=ModelRead,
    openapi_extra=multipart_openapi("ONNX, TorchScript (torch.jit.save) or torch.export .pt2"),
)
async def upload_model(
    request: Request, response: Response, key: CurrentKey, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> ModelRead:
    """Stream a model file to storage; its format and inputs/outputs are read from its content."""

    idem = idempotency.key_of(request)

    def create(upload: Upload) -> ModelRead:
        model, _ = idempotency.create_once(
            session,
            key,
            "POST /models",
            idem,
            idempotency.request_hash({"sha256": upload.sha256, "filename": upload.filename, **upload.fields}),
            make=lambda: services.create_model(
                session=session, store=store, upload=upload, tenant_id=key.tenant_id, settings=settings
            ),
            load=lambda model_id: services.get_model(session=session, model_id=model_id, tenant_id=key.tenant_id),
            status_code=201,
            response=response,
            discard=lambda row: store.delete(row.storage_key),
        )
        return released(session, ModelRead.model_validate(model))

    return await handle_upload(request, settings, create, admit_upload(session, key.tenant_id, settings))


@router.get("", response_model=ModelsRead)
def list_models(key: CurrentKey, session: SessionDep, limit: Limit = 50, offset: Offset = 0) -> ModelsRead:
    live = Model.deleted_at.is_(None) & (Model.tenant_id == key.tenant_id)
    rows = session.scalars(
        select(Model).where(live).order_by(Model.created_at.desc()).limit(limit).offset(offset)
    ).all()
    count = session.scalar(select(func.count()).select_from(Model).where(live)) or 0
    return released(session, ModelsRead(data=[ModelRead.model_validate(r) for r in rows], count=count))


@router.get("/{model_id}", response_model=ModelRead)
def read_model(model_id: str, key: CurrentKey, session: SessionDep) -> ModelRead:
    model = services.get_model(session=session, model_id=model_id, tenant_id=key.tenant_id)
    return released(session, ModelRead.model_validate(model))


@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, key: CurrentKey, session: SessionDep, store: StoreDep) -> Response:
    services.delete_model(session=session, store=store, model_id=model_id, tenant_id=key.tenant_id)
    session.commit()
    return Response(status_code=204)
