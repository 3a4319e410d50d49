"""The worker's Celery app: the shared queue contract plus this package's tasks.

Run with ``cvopt worker --queues cpu,gpu`` (or ``celery -A worker.celery_app worker``).
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from core.queue import get_celery
from core.settings import get_settings

app = get_celery()
app.conf.include = ["worker.tasks"]

log = logging.getLogger("cvopt.worker")
_reaper_stop = threading.Event()


def _reaper_loop() -> None:
    from core.db import get_sessionmaker
    from worker.runner import reap_stale_jobs

    settings = get_settings()
    while not _reaper_stop.wait(settings.reaper_interval_seconds):
        try:
            counts = reap_stale_jobs(settings=settings, sessions=get_sessionmaker(), celery=app)
            if any(counts.values()):
                log.warning("reaper: %s", counts)
        except Exception:  # the database may be down for a while; try again next round
            log.warning("reaper round failed", exc_info=True)


@worker_ready.connect
def _start_reaper(**_kwargs) -> None:
    threading.Thread(target=_reaper_loop, name="cvopt-reaper", daemon=True).start()


@worker_shutdown.connect
def _stop_reaper(**_kwargs) -> None:
    _reaper_stop.set()


@worker_process_init.connect
def _fresh_connections(**_kwargs) -> None:
    # A pool child forked from a parent that already opened database connections must not
    # share their sockets.
    from core.db import get_engine

    get_engine().dispose(close=False)
