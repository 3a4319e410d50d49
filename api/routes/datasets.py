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
from core.models import Dataset
from core.schemas import DatasetRead, DatasetsRead
from core.tenants import admit_upload

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post(
    "",
    status_code=201,
    response_model=DatasetRead,
    openapi_extra=multipart_openapi(
        "A zip or tar of images (one folder per class = labeled, flat = unlabeled) or an .npz with x and optional y"
    ),
)
async def upload_dataset(
    request: Request, response: Response, key: CurrentKey, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> DatasetRead:
    idem = idempotency.key_of(request)

    def create(upload: Upload) -> DatasetRead:
        dataset, _ = idempotency.create_once(
            session,
            key,
            "POST /datasets",
            idem,
            idempotency.request_hash({"sha256": upload.sha256, "filename": upload.filename, **upload.fields}),
            make=lambda: services.create_dataset(
                session=session, store=store, upload=upload, tenant_id=key.tenant_id, settings=settings
            ),
            load=lambda dataset_id: services.get_dataset(
                session=session, dataset_id=dataset_id, tenant_id=key.tenant_id
            ),
            status_code=201,
            response=response,
            discard=lambda row: store.delete(row.storage_key),
        )
        return released(session, DatasetRead.model_validate(dataset))

    return await handle_upload(request, settings, create, admit_upload(session, key.tenant_id, settings))


@router.get("", response_model=DatasetsRead)
def list_datasets(key: CurrentKey, session: SessionDep, limit: Limit = 50, offset: Offset = 0) -> DatasetsRead:
    live = Dataset.deleted_at.is_(None) & (Dataset.tenant_id == key.tenant_id)
    rows = session.scalars(
        select(Dataset).where(live).order_by(Dataset.created_at.desc()).limit(limit).offset(offset)
    ).all()
    count = session.scalar(select(func.count()).select_from(Dataset).where(live)) or 0
    return released(session, DatasetsRead(data=[DatasetRead.model_validate(r) for r in rows], count=count))


@router.get("/{dataset_id}", response_model=DatasetRead)
def read_dataset(dataset_id: str, key: CurrentKey, session: SessionDep) -> DatasetRead:
    dataset = services.get_dataset(session=session, dataset_id=dataset_id, tenant_id=key.tenant_id)
    return released(session, DatasetRead.model_validate(dataset))


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: str, key: CurrentKey, session: SessionDep, store: StoreDep) -> Response:
    services.delete_dataset(session=session, store=store, dataset_id=dataset_id, tenant_id=key.tenant_id)
    session.commit()
    return Response(status_code=204)
