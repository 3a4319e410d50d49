"""The queue contract between the API and the workers.

The broker carries only job ids; the database row is the source of truth. The API sends
tasks by name and never imports the worker's code that runs them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from core.settings import Settings, get_settings

RUN_JOB_TASK = "cvopt.run_job"
REAP_TASK = "cvopt.reap_stale_jobs"
QUEUES = ("cpu", "gpu")


def make_celery(settings: Settings) -> Celery:
    app = Celery("cvopt")
    broker_url = settings.resolved_broker_url
    conf: dict[str, Any] = dict(
        broker_url=broker_url,
        # No result backend: results and progress live on the job row.
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        task_default_queue="cpu",
        # Steps are idempotent (deterministic artifact keys), so a task is acknowledged only
        # after it ran, and a task whose worker died is delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    if settings.is_embedded_broker:
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            # kombu's default control folder is ./control, relative to wherever serve was started.
            "control_folder": str(folder / "control"),
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
        }
    else:
        # Redis: a task not acknowledged within this time is delivered again; longer than
        # any step is allowed to run.
        conf["broker_transport_options"] = {"visibility_timeout": 6 * 3600}
    app.conf.update(conf)
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue_job(job_id: str, queue: str, *, celery: Celery | None = None) -> None:
    app = celery or get_celery()
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, routing_key=queue)
