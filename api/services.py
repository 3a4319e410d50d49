"""Service functions: keyword-only, typed, the session passed in. The route owns the commit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from api.uploads import Upload
from core.datasets import inspect_dataset
from core.errors import Conflict, InvalidInput, NotFound
from core.model_formats import inspect_model
from core.models import (
    Artifact,
    Dataset,
    IdempotencyRecord,
    Job,
    JobStatus,
    JobStep,
    Model,
    StepStatus,
    new_id,
    utcnow,
)
from core.recipes import AUTO_PRESET, DatasetFacts, Recipe, job_recipe, plan_job, resolve_input_spec
from core.schemas import (
    ArtifactRead,
    JobCreate,
    ReportRead,
)
from core.settings import Settings
from core.storage import ObjectStore
from core.targets import DEFAULT_AUTO_TARGET
from core.tasks import resolve_task
from core.tenants import check_job_quota, check_upload_quota
from core.views import job_report
from core.webhooks import check_url

log = logging.getLogger("cvopt.api")


def _store_then_add(*, session: Session, store: ObjectStore, key: str, path: Path, row) -> None:
    """Put the object, then add the row; if the row cannot be written, remove the object."""
    store.put_file(key, path)
    try:
        session.add(row)
        session.flush()
    except BaseException:
        store.delete(key)
        raise


def _soft_delete(*, session: Session, store: ObjectStore, row: Model | Dataset, active_jobs: int, code: str) -> None:
    """Hide the row (jobs keep their history) and remove its object, unless a job still needs it."""
    if active_jobs:
        raise Conflict(
            f"{row.__tablename__[:-1]} {row.id} is used by {active_jobs} queued or running jobs; cancel them first",
            code=code,
            details={"active_jobs": active_jobs},
        )
    row.deleted_at = utcnow()
    # The idempotency keys that made it are free again: a pipeline may upload the same file anew.
    session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.resource_id == row.id))
    session.flush()
    store.delete(row.storage_key)


# -- models ------------------------------------------------------------------------------------


def create_model(*, session: Session, store: ObjectStore, upload: Upload, tenant_id: str, settings: Settings) -> Model:
    # 415 for random bytes, truncated files and pickles (a state_dict only with an architecture)
    info = inspect_model(upload.path, architecture=upload.fields.get("architecture") or None)
    check_upload_quota(session, tenant_id, settings, upload.size_bytes)
    model_id = new_id()
    key = f"models/{model_id}/{upload.filename}"
    row = Model(
        id=model_id,
        tenant_id=tenant_id,
        name=upload.fields.get("name") or upload.filename,
        filename=upload.filename,
        format=info.format,
        sha256=upload.sha256,
        size_bytes=upload.size_bytes,
        storage_key=key,
        inputs=info.inputs,
        outputs=info.outputs,
        details=info.details,
    )
    _store_then_add(session=session, store=store, key=key, path=upload.path, row=row)
    return row


def get_model(*, session: Session, model_id: str, tenant_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is None or model.deleted_at is not None or model.tenant_id != tenant_id:
        raise NotFound(f"model {model_id} not found", code="model_not_found", details={"model_id": model_id})
    return model


def delete_model(*, session: Session, store: ObjectStore, model_id: str, tenant_id: str) -> None:
    model = get_model(session=session, model_id=model_id, tenant_id=tenant_id)
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.model_id == model_id, Job.status.in_([JobStatus.queued, JobStatus.running]))
    )
    _soft_delete(session=session, store=store, row=model, active_jobs=active, code="model_in_use")


# -- datasets ----------------------------------------------------------------------------------


def create_dataset(
    *, session: Session, store: ObjectStore, upload: Upload, tenant_id: str, settings: Settings
) -> Dataset:
    info = inspect_dataset(upload.path)
    check_upload_quota(session, tenant_id, settings, upload.size_bytes)
    dataset_id = new_id()
    key = f"datasets/{dataset_id}/{upload.filename}"
    row = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        name=upload.fields.get("name") or upload.filename,
        filename=upload.filename,
        format=info.format,
        sha256=upload.sha256,
        size_bytes=upload.size_bytes,
        storage_key=key,
        num_samples=info.num_samples,
        labeled=info.labeled,
        num_classes=info.num_classes,
        class_names=info.class_names,
        label_type=info.label_type,
        sample_shape=info.sample_shape,
        layout=info.layout,
    )
    _store_then_add(session=session, store=store, key=key, path=upload.path, row=row)
    return row


def get_dataset(*, session: Session, dataset_id: str, tenant_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.deleted_at is not None or dataset.tenant_id != tenant_id:
        raise NotFound(f"dataset {dataset_id} not found", code="dataset_not_found", details={"dataset_id": dataset_id})
    return dataset


def delete_dataset(*, session: Session, store: ObjectStore, dataset_id: str, tenant_id: str) -> None:
    dataset = get_dataset(session=session, dataset_id=dataset_id, tenant_id=tenant_id)
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            (Job.calibration_dataset_id == dataset_id) | (Job.evaluation_dataset_id == dataset_id),
            Job.status.in_([JobStatus.queued, JobStatus.running]),
        )
    )
    _soft_delete(session=session, store=store, row=dataset, active_jobs=active, code="dataset_in_use")


# -- jobs --------------------------------------------------------------------------------------


def _job_model(*, session: Session, model_id: str, tenant_id: str) -> Model:
    """The job's model; another tenant's reads like one that does not exist (422, not 404: it is
    a field of the body)."""
    model = session.get(Model, model_id)
    if model is None or model.tenant_id != tenant_id:
        raise InvalidInput(f"model {model_id} not found", code="model_not_found", details={"model_id": model_id})
    if model.deleted_at is not None:
        raise InvalidInput(f"model {model_id} was deleted", code="model_deleted", details={"model_id": model_id})
    return model


def _dataset_facts(*, session: Session, dataset_id: str | None, role: str, tenant_id: str) -> DatasetFacts | None:
    """What recipe planning needs to know of the job's ``role`` (calibration or evaluation) dataset."""
    if dataset_id is None:
        return None
    ds = session.get(Dataset, dataset_id)
    if ds is None or ds.deleted_at is not None or ds.tenant_id != tenant_id:
        raise InvalidInput(
            f"{role} dataset {dataset_id} not found",
            code="dataset_not_found",
            details={f"{role}_dataset_id": dataset_id},
        )
    return DatasetFacts(
        id=ds.id,
        layout=ds.layout,
        sample_shape=list(ds.sample_shape),
        # Class labels only: box labels' classes are checked by the worker's detection metrics.
        num_classes=ds.num_classes if ds.labeled and ds.label_type != "boxes" else None,
    )


def create_job(*, session: Session, job_in: JobCreate, tenant_id: str, settings: Settings) -> Job:
    """Validate the recipe against the model and datasets and write the job; nothing is queued
    here (the route commits first, then sends the id to the broker). Another tenant's model or
    dataset reads exactly like one that does not exist."""
    model = _job_model(session=session, model_id=job_in.model_id, tenant_id=tenant_id)
    has_dataset = bool(job_in.calibration_dataset_id or job_in.evaluation_dataset_id)
    default_shape = (model.details or {}).get("default_input_shape")
    input_spec = resolve_input_spec(list(model.inputs), job_in.input_shape, default_shape)
    recipe = job_recipe(
        preset=job_in.preset,
        steps=job_in.step_specs(),
        model_format=model.format,
        has_calibration=job_in.calibration_dataset_id is not None,
        has_dataset=has_dataset,
        overrides=job_in.overrides,
        target=job_in.target,
        batch=input_spec[0]["shape"][0] if input_spec else 1,
        allow_training=job_in.allow_training,
    )
    plan = plan_job(
        model_format=model.format,
        model_inputs=list(model.inputs),
        model_outputs=list(model.outputs),
        steps=recipe.steps,
        default_input_shape=default_shape,
        input_shape=job_in.input_shape,
        calibration=_dataset_facts(
            session=session, dataset_id=job_in.calibration_dataset_id, role="calibration", tenant_id=tenant_id
        ),
        evaluation=_dataset_facts(
            session=session, dataset_id=job_in.evaluation_dataset_id, role="evaluation", tenant_id=tenant_id
        ),
        preprocessing=job_in.preprocessing,
        model_operators=(model.details or {}).get("operators"),
    )
    # Decided now when the file records its output shapes; otherwise by the worker from real outputs.
    task = resolve_task(
        job_in.task,
        [o.get("shape") for o in model.outputs],
        plan.input_spec[0]["shape"] if len(plan.input_spec) == 1 else None,
        job_in.detection.layout,
    )
    if job_in.webhook_url:
        check_url(job_in.webhook_url, settings, resolve=False)  # resolved again before each call
    check_job_quota(session, tenant_id, settings)
    job = Job(
        id=new_id(),
        tenant_id=tenant_id,
        name=job_in.name,
        status=JobStatus.queued,
        model_id=model.id,
        calibration_dataset_id=job_in.calibration_dataset_id,
        evaluation_dataset_id=job_in.evaluation_dataset_id,
        preset=job_in.preset,
        queue=plan.queue,
        input_spec=plan.input_spec,
        preprocessing=job_in.preprocessing.model_dump(mode="json"),
        task=task,
        task_options=_task_options(job_in, recipe),
        progress=0.0,
        attempts=0,
        cancel_requested=False,
        enqueued_at=utcnow(),
        webhook_url=job_in.webhook_url,
        steps=[
            JobStep(
                index=i,
                name=s.name,
                config=s.config,
                queue=s.queue,
                optional=s.optional,
                status=StepStatus.pending,
                metrics={},
            )
            for i, s in enumerate(plan.steps)
        ],
    )
    session.add(job)
    session.flush()
    return job


def _task_options(job_in: JobCreate, recipe: Recipe) -> dict[str, Any]:
    """What the job's gates and report judge by: the tolerance, the detection options, the target and
    the constraints (core.views reads them back), and what preset auto left out."""
    options: dict[str, Any] = {
        "max_accuracy_drop": job_in.tolerance(),
        "detection": job_in.detection.model_dump(mode="json"),
    }
    if job_in.preset == AUTO_PRESET:
        options["target"] = job_in.target or DEFAULT_AUTO_TARGET
        options["left_out"] = recipe.left_out
    elif job_in.target is not None:
        options["target"] = job_in.target
    if job_in.allow_training:
        options["allow_training"] = True
    if job_in.constraints is not None:
        constraints = job_in.constraints.model_dump(exclude_none=True)
        options["constraints"] = {**constraints, "max_accuracy_drop": job_in.tolerance()}
    return options


def get_job(*, session: Session, job_id: str, tenant_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id} not found", code="job_not_found", details={"job_id": job_id})
    return job


def list_jobs(
    *, session: Session, tenant_id: str, status: JobStatus | None, limit: int, offset: int
) -> tuple[list[Job], int]:
    query = select(Job).where(Job.tenant_id == tenant_id)
    count_query = select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status)
        count_query = count_query.where(Job.status == status)
    rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return list(rows), session.scalar(count_query) or 0


def cancel_job(*, session: Session, job_id: str, tenant_id: str) -> Job:
    job = get_job(session=session, job_id=job_id, tenant_id=tenant_id)
    if job.status.terminal:
        raise Conflict(
            f"job {job_id} already ended ({job.status.value})",
            code="job_finished",
            details={"status": job.status.value},
        )
    job.cancel_requested = True
    if job.status == JobStatus.queued:
        # Nobody runs it yet: end it now; a worker that receives its id later skips it.
        job.status = JobStatus.cancelled
        job.finished_at = utcnow()
        for step in job.steps:
            step.status = StepStatus.skipped
    session.flush()
    return job


def list_artifacts(*, session: Session, store: ObjectStore, job: Job, base_url: str) -> list[ArtifactRead]:
    rows = session.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.step_index)).all()
    out = []
    for row in rows:
        signed = store.download_url(row.storage_key, filename=row.name, base_url=base_url)
        out.append(
            ArtifactRead(
                id=row.id,
                name=row.name,
                step=row.step,
                step_index=row.step_index,
                format=row.format,
                size_bytes=row.size_bytes,
                sha256=row.sha256,
                meta=row.meta,
                url=signed.url,
                expires_at=signed.expires_at,
            )
        )
    return out


def build_report(*, session: Session, job: Job) -> ReportRead:
    """Each artifact against the original, from the benchmark and evaluate steps' metrics, with
    its verdict, and the artifact to ship (core.recommend's rules; the job's view shows the same)."""
    return job_report(session, job)
