"""A job as the API shows it: the one rendering GET /v1/jobs/{id}, the job list and webhooks
share. core.webhooks imports this module (a webhook's body is the job's view); nothing here
imports core.webhooks, so the view of a webhook's delivery lives here too."""

from __future__ import annotations

import time

from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from core.models import Artifact, Job, JobStatus, Model, StepStatus, WebhookDelivery
from core.recommend import ArtifactFacts, StepFacts, report_for
from core.schemas import JobError, JobRead, ReportRead, StepRead, TensorSpec, WebhookRead
from core.settings import get_settings
from core.storage import sign_local, verify_local
from core.tasks import DEFAULT_TOLERANCE
from core.workers import waiting_for


def report_link(job_id: str, base_url: str | None = None) -> str:
    """A link to the job's HTML report that works without the API key until it expires
    (CVOPT_DOWNLOAD_URL_TTL_SECONDS); absolute when the service's base URL is known."""
    settings = get_settings()
    expires = int(time.time()) + settings.download_url_ttl_seconds
    sig = sign_local(f"reports/{job_id}", expires, settings.signing_key())
    base = (base_url or settings.public_url or "").rstrip("/")
    return f"{base}/v1/jobs/{job_id}/report.html?expires={expires}&sig={sig}"  # digits and hex: nothing to quote


def report_link_valid(job_id: str, expires: int, sig: str) -> bool:
    """Whether a report link's signature is ours and it has not expired."""
    return verify_local(f"reports/{job_id}", expires, sig, get_settings().signing_key())


def job_report(session: Session, job: Job) -> ReportRead:
    """The job's report (each artifact against the original, its verdict, the recommendation)
    from one query: the original model's row and the artifacts'. The steps come with the job."""
    rows = session.execute(
        select(Model, Artifact)
        .select_from(Model)
        .outerjoin(Artifact, Artifact.job_id == job.id)
        .where(Model.id == job.model_id)
        .order_by(Artifact.step_index)
    ).all()
    model = rows[0][0]
    return report_for(
        job_id=job.id,
        status=job.status,
        task=job.task or "auto",
        task_options=job.task_options,
        steps=[
            StepFacts(
                s.name,
                s.status == StepStatus.succeeded,
                s.metrics or {},
                index=s.index,
                optional=s.optional,
                failed=s.status == StepStatus.failed,
                config=dict(s.config or {}),
                message=s.message,
            )
            for s in job.steps
        ],
        original=ArtifactFacts(model.filename, None, model.format, model.size_bytes, dict(model.details or {})),
        artifacts=[
            ArtifactFacts(a.name, a.step, a.format, a.size_bytes, dict(a.meta or {})) for _, a in rows if a is not None
        ],
    )


def delivery_to_read(delivery: WebhookDelivery | None) -> WebhookRead | None:
    """A job's webhook delivery as the job's view shows it: its attempts so far and what is next."""
    if delivery is None:
        return None
    return WebhookRead.model_validate(
        {
            "url": delivery.url,
            "event": delivery.event,
            "status": delivery.status,
            "attempts": list(delivery.attempts or []),
            "next_attempt_at": delivery.next_attempt_at if delivery.status == "pending" else None,
            "finished_at": delivery.finished_at,
        }
    )


def job_to_read(
    job: Job, live_queues: set[str] | None = None, base_url: str | None = None, *, recommended: bool = True
) -> JobRead:
    """``live_queues``: the queues live workers consume; a queued job on another queue says
    what it waits for. ``base_url``: where clients reach the API (for the report link).
    ``recommended``: compute the recommendation (one query for a succeeded job); the job list
    passes False so that a page of jobs is not one report query per job."""
    steps = []
    for st in job.steps:
        read = StepRead.model_validate(st)
        if st.started_at and st.finished_at:
            read.duration_s = round((st.finished_at - st.started_at).total_seconds(), 3)
        steps.append(read)
    recommendation = None
    session = object_session(job)
    if recommended and job.status == JobStatus.succeeded and session is not None:
        recommendation = job_report(session, job).recommended
    error = None
    if job.error_code:
        error = JobError(code=job.error_code, message=job.error_message or "", step=job.error_step)
    return JobRead(
        id=job.id,
        name=job.name,
        status=job.status,
        model_id=job.model_id,
        preset=job.preset,
        calibration_dataset_id=job.calibration_dataset_id,
        evaluation_dataset_id=job.evaluation_dataset_id,
        queue=job.queue,
        input_spec=[TensorSpec(**s) for s in job.input_spec],
        preprocessing=job.preprocessing,
        task=job.task or "auto",
        max_accuracy_drop=(job.task_options or {}).get("max_accuracy_drop", DEFAULT_TOLERANCE),
        detection=(job.task_options or {}).get("detection"),
        target=(job.task_options or {}).get("target"),
        constraints=(job.task_options or {}).get("constraints"),
        progress=job.progress,
        current_step=job.current_step,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        steps=steps,
        error=error,
        log_tail=job.log_tail,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        webhook_url=job.webhook_url,
        report_url=report_link(job.id, base_url),
        webhook=delivery_to_read(job.webhook_delivery) if job.webhook_url else None,
        waiting_for=(
            waiting_for(job.queue)
            if job.status == JobStatus.queued and live_queues is not None and job.queue not in live_queues
            else None
        ),
        recommended=recommendation,
    )
