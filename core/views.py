"""A job as the API shows it: the one rendering GET /v1/jobs/{id}, the job list and webhooks
share."""

from __future__ import annotations

from core.models import Job, JobStatus
from core.schemas import JobError, JobRead, StepRead, TensorSpec
from core.webhooks import delivery_to_read
from core.workers import waiting_for


def job_to_read(job: Job, live_queues: set[str] | None = None) -> JobRead:
    """``live_queues``: the queues live workers consume; a queued job on another queue says
    what it waits for."""
    steps = []
    for st in job.steps:
        read = StepRead.model_validate(st)
        if st.started_at and st.finished_at:
            read.duration_s = round((st.finished_at - st.started_at).total_seconds(), 3)
        steps.append(read)
    error = None
    if job.error_code:
        error = JobError(code=job.error_code, message=job.error_message or "", step=job.error_step)
    return JobRead(
        id=job.id, name=job.name, status=job.status, model_id=job.model_id, preset=job.preset,
        calibration_dataset_id=job.calibration_dataset_id, evaluation_dataset_id=job.evaluation_dataset_id,
        queue=job.queue, input_spec=[TensorSpec(**s) for s in job.input_spec], preprocessing=job.preprocessing,
        progress=job.progress, current_step=job.current_step, attempts=job.attempts,
        cancel_requested=job.cancel_requested, steps=steps, error=error, log_tail=job.log_tail,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        webhook_url=job.webhook_url,
        webhook=delivery_to_read(job.webhook_delivery) if job.webhook_url else None,
        waiting_for=(
            waiting_for(job.queue)
            if job.status == JobStatus.queued and live_queues is not None and job.queue not in live_queues
            else None
        ),
    )
