"""The worker's Celery app: the shared queue contract plus this package's tasks.

Run with ``cvopt worker --queues cpu,gpu`` (or ``celery -A worker.celery_app worker``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from celery.signals import (
    setup_logging,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)

from core.queue import get_celery
from core.settings import get_settings
from core.workers import WORKER_ID_ENV, new_worker_identity

app = get_celery()
app.conf.include = ["worker.tasks"]

log = logging.getLogger("cvopt.worker")
_reaper_stop = threading.Event()
# Named here, in the worker's main process, before the pool forks: the jobs its pool processes
# run name this row (core.workers.worker_identity).
_WORKER_ID = os.environ[WORKER_ID_ENV] = new_worker_identity()


def worker_queues() -> list[str]:
    """The queues this worker process consumes (set by ``cvopt worker``; plain ``celery worker``
    falls back to what the app was told to consume)."""
    named = os.environ.get("CVOPT_WORKER_QUEUES")
    if named:
        return [q for q in named.split(",") if q]
    consumed = getattr(app.amqp.queues, "consume_from", None) or {}
    return sorted(consumed) or ["cpu"]


def _announce() -> None:
    """Say (again) that this worker is alive and what it consumes."""
    from core.db import get_sessionmaker
    from core.workers import heartbeat

    gpu = json.loads(os.environ.get("CVOPT_WORKER_GPU") or "null")
    with get_sessionmaker()() as session:
        heartbeat(session, worker_id=_WORKER_ID, hostname=socket.gethostname(), queues=worker_queues(), gpu=gpu)


def _reaper_loop() -> None:
    from core.db import get_sessionmaker
    from worker.runner import reap_stale_jobs

    settings = get_settings()
    # Beat as often as jobs do: the reaper takes a worker silent for a few beats as gone.
    interval = min(settings.heartbeat_seconds, settings.reaper_interval_seconds, settings.stale_after_seconds / 4)
    last_reap = 0.0
    while not _reaper_stop.wait(interval):
        try:
            _announce()
            if time.monotonic() - last_reap < settings.reaper_interval_seconds:
                continue
            last_reap = time.monotonic()
            counts = reap_stale_jobs(settings=settings, sessions=get_sessionmaker(), celery=app)
            if any(counts.values()):
                log.warning("reaper: %s", counts)
        except Exception:  # the database may be down for a while; try again next round
            log.warning("reaper round failed", exc_info=True)
            # After an outage every heartbeat is old: wait a full round, so that live workers and
            # their jobs have beaten again before the reaper judges anyone by them.
            last_reap = time.monotonic()


def _webhook_loop() -> None:
    """Send the webhooks that are due (every worker does; each delivery row is taken by one)."""
    from core.db import get_sessionmaker
    from core.webhooks import deliver_due

    settings = get_settings()
    while not _reaper_stop.wait(1.0):
        try:
            deliver_due(get_sessionmaker(), settings)
        except Exception:  # the database may be down for a while; try again next round
            log.warning("webhook round failed", exc_info=True)


@worker_ready.connect
def _start_reaper(**_kwargs) -> None:
    try:
        _announce()
    except Exception:
        log.warning("could not announce this worker yet", exc_info=True)
    threading.Thread(target=_reaper_loop, name="cvopt-reaper", daemon=True).start()
    threading.Thread(target=_webhook_loop, name="cvopt-webhooks", daemon=True).start()


@worker_shutdown.connect
def _stop_reaper(**_kwargs) -> None:
    _reaper_stop.set()
    try:
        from core.db import get_sessionmaker
        from core.workers import forget

        with get_sessionmaker()() as session:
            forget(session, _WORKER_ID)
    except Exception:  # the database may be down; the row goes stale by itself
        log.warning("could not deregister this worker", exc_info=True)


@setup_logging.connect
def _logging(loglevel=None, **_kwargs) -> None:
    # Connected, so Celery leaves the root logger to us: JSON lines with the job id.
    from core.logs import setup

    setup(loglevel or "INFO")


@worker_process_init.connect
def _fresh_connections(**_kwargs) -> None:
    # A pool child forked from a parent that already opened database connections must not
    # share their sockets.
    from core.db import get_engine

    get_engine().dispose(close=False)
    settings = get_settings()
    if settings.step_isolation == "process" and settings.step_prewarm:
        from worker.step_process import prewarm

        prewarm()
