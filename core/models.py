"""Database rows. The wire format lives in core/schemas.py, never here."""

from __future__ import annotations

import enum
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    event,
    false,
    inspect,
    select,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class TZDateTime(TypeDecorator[datetime]):
    """Timezone-aware on Postgres; SQLite keeps no zone, so values are read back as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class StepStatus(str, enum.Enum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    skipped = "skipped"


DEFAULT_TENANT_ID = "default"


class Tenant(Base):
    """A team: owns API keys, models, datasets and jobs; sees nothing of any other tenant.
    A quota left null takes the service-wide default from settings."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_uploads_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Signs the webhooks sent for this tenant's jobs (HMAC-SHA256).
    webhook_secret: Mapped[str] = mapped_column(String(64), default=lambda: secrets.token_hex(32))
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    # Admin keys manage tenants and keys; their data access stays within their own tenant.
    is_admin: Mapped[bool] = mapped_column(default=False)
    name: Mapped[str] = mapped_column(String(200))
    # Only the first characters are kept in clear, to recognise a key in listings.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(512))
    inputs: Mapped[list[Any]] = mapped_column(JSON, default=list)
    outputs: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # What the file alone does not say: e.g. a state_dict's architecture and default input shape.
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow, index=True)
    deleted_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))  # zip | tar | npz
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(512))
    num_samples: Mapped[int] = mapped_column(Integer)
    labeled: Mapped[bool]
    num_classes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    class_names: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    label_type: Mapped[str | None] = mapped_column(String(16), nullable=True)  # classes | boxes
    sample_shape: Mapped[list[Any]] = mapped_column(JSON)
    layout: Mapped[str] = mapped_column(String(8))  # HWC for images; NCHW | NHWC for npz
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow, index=True)
    deleted_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, name="job_status", native_enum=False, length=16), index=True
    )
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    calibration_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), nullable=True)
    evaluation_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), nullable=True)
    preset: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The queue the job waits on or runs from: cpu, gpu, or gpu.<kind> (one GPU model).
    queue: Mapped[str] = mapped_column(String(64))
    # The resolved input spec: [{"name", "shape", "dtype"}] with every dimension concrete.
    input_spec: Mapped[list[Any]] = mapped_column(JSON)
    preprocessing: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # classification | detection | segmentation, or auto (the worker decides from the outputs).
    task: Mapped[str] = mapped_column(String(32), default="auto", server_default="auto")
    # {"max_accuracy_drop": float, "detection": DetectionOptions, and when given "target",
    # "constraints" (core.schemas.Constraints), "left_out" (candidates preset auto could not build)}
    task_options: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    current_step: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_step: Mapped[str | None] = mapped_column(String(64), nullable=True)
    log_tail: Mapped[str | None] = mapped_column(Text, nullable=True)
    # POSTed the job when it ends (core/webhooks.py).
    webhook_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)

    steps: Mapped[list[JobStep]] = relationship(
        back_populates="job", order_by="JobStep.index", cascade="all, delete-orphan", lazy="selectin"
    )
    model: Mapped[Model] = relationship(lazy="select")
    webhook_delivery: Mapped[WebhookDelivery | None] = relationship(lazy="select", uselist=False, viewonly=True)


class JobStep(Base):
    __tablename__ = "job_steps"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Where the step must run (null: any worker of the job's queue); a step for another GPU
    # kind hands the job over to that kind's queue.
    queue: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # A candidate (preset auto): when it refuses its result the step ends failed and the job goes on.
    optional: Mapped[bool] = mapped_column(default=False, server_default=false())
    status: Mapped[StepStatus] = mapped_column(Enum(StepStatus, name="step_status", native_enum=False, length=16))
    started_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    artifact_id: Mapped[str | None] = mapped_column(ForeignKey("artifacts.id"), nullable=True)

    job: Mapped[Job] = relationship(back_populates="steps")


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step_index: Mapped[int] = mapped_column(Integer)
    step: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32))
    storage_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)


class Worker(Base):
    """A live worker process and the queues it consumes, refreshed while it runs. A job whose
    queue no live worker consumes says what it waits for, and fails after a timeout."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    queues: Mapped[list[str]] = mapped_column(JSON)
    # {"name", "kind", "compute_capability", "memory_gib", "cuda", "tensorrt"} on GPU workers.
    gpu: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    started_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow, index=True)


class IdempotencyRecord(Base):
    """What a POST with an ``Idempotency-Key`` made, so that a retry returns it instead of
    making another. Written in the same transaction as the resource itself."""

    __tablename__ = "idempotency_keys"

    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    route: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(32))
    status_code: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow, index=True)


class WebhookDelivery(Base):
    """The webhook of a job that ended: one per job, sent until a 2xx or until its time is up,
    every attempt kept (visible on the job)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    event: Mapped[str] = mapped_column(String(32))  # job.succeeded | job.failed | job.cancelled
    url: Mapped[str] = mapped_column(String(2048))
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed | refused
    attempts: Mapped[list[Any]] = mapped_column(JSON, default=list)
    next_attempt_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow, index=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)


@event.listens_for(Session, "before_flush")
def _schedule_webhooks(session: Session, _context: Any, _instances: Any) -> None:
    """Wherever a job reaches its end (runner, reaper, cancel), in that same transaction: its
    webhook delivery, if it asked for one. One place, so no path can forget it."""
    for obj in list(session.dirty) + list(session.new):
        if not isinstance(obj, Job) or not obj.webhook_url or not obj.status.terminal:
            continue
        if obj in session.dirty and not inspect(obj).attrs.status.history.has_changes():
            continue
        if any(isinstance(o, WebhookDelivery) and o.job_id == obj.id for o in session.new):
            continue
        with session.no_autoflush:  # a job ends once; a second end (a duplicate run) sends nothing more
            if session.scalar(select(WebhookDelivery.id).where(WebhookDelivery.job_id == obj.id)) is not None:
                continue
        session.add(
            WebhookDelivery(
                job_id=obj.id,
                event=f"job.{obj.status.value}",
                url=obj.webhook_url,
                status="pending",
                attempts=[],
                next_attempt_at=utcnow(),
            )
        )
