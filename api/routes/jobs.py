from __future__ import annotations

import logging
import math
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from api import idempotency, services
from api.deps import (
    BaseUrlDep,
    CurrentKey,
    Limit,
    Offset,
    SessionDep,
    StoreDep,
    current_key_in_thread,
    released,
    rendered,
)
from api.report_html import render as render_report
from core.errors import NotFound, Unauthorized
from core.models import Job, JobStatus
from core.queue import enqueue_job
from core.schemas import ArtifactsRead, JobCreate, JobRead, JobsRead, ReportRead
from core.settings import get_settings
from core.views import job_to_read, report_link_valid
from core.workers import live_queues

router = APIRouter(prefix="/jobs", tags=["jobs"])
log = logging.getLogger("cvopt.api")


# The live queues change only as workers start and stop, and their rows are refreshed every few
# seconds anyway (CVOPT_HEARTBEAT_SECONDS): polls of queued jobs share one read a second.
LIVE_QUEUES_TTL_S = 1.0
_live_queues_read: tuple[float, set[str]] = (-math.inf, set())


def _live_queues_for(session: Session, *jobs: Job) -> set[str] | None:
    """The live workers' queues, which only a queued job's view needs (to say what it waits for)."""
    global _live_queues_read
    if not any(job.status == JobStatus.queued for job in jobs):
        return None
    read_at, queues = _live_queues_read
    if time.monotonic() - read_at > LIVE_QUEUES_TTL_S:
        queues = live_queues(session, get_settings())
        _live_queues_read = (time.monotonic(), queues)
    return queues


@router.post("", status_code=202, response_model=JobRead)
def create_job(
    job_in: JobCreate, request: Request, response: Response, key: CurrentKey, session: SessionDep, base_url: BaseUrlDep
) -> JobRead:
    """Validate the recipe, write the job, then queue its id. A recipe that cannot run is a 422
    here, before anything is queued. With an ``Idempotency-Key``, a retry returns the same job."""
    idem = idempotency.key_of(request)
    job, replayed = idempotency.create_once(
        session,
        key,
        "POST /jobs",
        idem,
        idempotency.request_hash(job_in.model_dump(mode="json")) if idem else "",
        make=lambda: services.create_job(
            session=session, job_in=job_in, tenant_id=key.tenant_id, settings=get_settings()
        ),
        load=lambda job_id: services.get_job(session=session, job_id=job_id, tenant_id=key.tenant_id),
        status_code=202,
        response=response,
    )
    response.headers["Location"] = str(request.url_for("read_job", job_id=job.id).path)
    if replayed:
        return released(session, job_to_read(job, live_queues(session, get_settings()), base_url))
    try:
        enqueue_job(job.id, job.queue)
    except Exception:  # the broker is down: the job is safe in the database, the reaper re-sends it
        log.exception("could not queue job %s now; the reaper will send it", job.id)
    return job_to_read(job, base_url=base_url)


@router.get("", response_model=JobsRead)
def list_jobs(
    key: CurrentKey,
    session: SessionDep,
    base_url: BaseUrlDep,
    status: JobStatus | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> JobsRead:
    rows, count = services.list_jobs(
        session=session, tenant_id=key.tenant_id, status=status, limit=limit, offset=offset
    )
    live = _live_queues_for(session, *rows)
    # No report per job: `recommended` is null in the list (one query per succeeded job otherwise).
    data = [job_to_read(j, live, base_url, recommended=False) for j in rows]
    return rendered(session, JobsRead(data=data, count=count))


@router.get("/{job_id}", response_model=JobRead)
def read_job(job_id: str, key: CurrentKey, session: SessionDep, base_url: BaseUrlDep) -> JobRead:
    job = services.get_job(session=session, job_id=job_id, tenant_id=key.tenant_id)
    return rendered(session, job_to_read(job, _live_queues_for(session, job), base_url))


@router.post("/{job_id}/cancel", response_model=JobRead)
def cancel_job(job_id: str, key: CurrentKey, session: SessionDep, base_url: BaseUrlDep) -> JobRead:
    job = services.cancel_job(session=session, job_id=job_id, tenant_id=key.tenant_id)
    session.commit()
    return job_to_read(job, base_url=base_url)


@router.get("/{job_id}/artifacts", response_model=ArtifactsRead)
def list_artifacts(
    job_id: str, key: CurrentKey, session: SessionDep, store: StoreDep, base_url: BaseUrlDep
) -> ArtifactsRead:
    job = services.get_job(session=session, job_id=job_id, tenant_id=key.tenant_id)
    data = services.list_artifacts(session=session, store=store, job=job, base_url=base_url)
    return rendered(session, ArtifactsRead(data=data, count=len(data)))


@router.get("/{job_id}/report", response_model=ReportRead)
def read_report(job_id: str, key: CurrentKey, session: SessionDep) -> ReportRead:
    job = services.get_job(session=session, job_id=job_id, tenant_id=key.tenant_id)
    return rendered(session, services.build_report(session=session, job=job))


@router.get(
    "/{job_id}/report.html",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}, "description": "The report page."}},
)
def read_report_html(
    job_id: str, request: Request, session: SessionDep, expires: int | None = None, sig: str | None = None
) -> HTMLResponse:
    """The job's report as one self-contained page (charts inline). Send the API key, or open
    the signed link in the job's ``report_url`` (no key needed until it expires)."""
    if sig is not None or expires is not None:
        if expires is None or sig is None or not report_link_valid(job_id, expires, sig):
            raise Unauthorized("the report link is invalid or expired", code="invalid_signature")
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found", code="job_not_found", details={"job_id": job_id})
    else:
        key = current_key_in_thread(request, session)
        job = services.get_job(session=session, job_id=job_id, tenant_id=key.tenant_id)
    page = render_report(job, services.build_report(session=session, job=job))
    session.commit()
    # The page carries its own styles and charts; it may not load or run anything else.
    return HTMLResponse(
        page,
        headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
            "Cache-Control": "private, no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )
