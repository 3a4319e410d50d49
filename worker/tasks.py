"""Celery tasks: thin, like web views. They take a job id and delegate to the runner."""

from __future__ import annotations

from functools import lru_cache

from core.db import get_sessionmaker
from core.queue import RUN_JOB_TASK
from core.settings import get_settings
from core.storage import get_store
from worker.celery_app import app, worker_queues
from worker.runner import JobRunner


@lru_cache
def _runner() -> JobRunner:
    return JobRunner(settings=get_settings(), store=get_store(), sessions=get_sessionmaker(), queues=worker_queues())


# acks_late (set on the app): the message is acknowledged after the job ran, so a worker that
# dies mid-job leaves it to be delivered again; the runner's claim makes that safe.
@app.task(name=RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str) -> None:
    _runner().run(job_id)
