"""Which workers are alive and which queues they consume.

Each worker process upserts its row when it starts and refreshes ``last_seen_at`` every
``heartbeat_seconds`` while it runs, and deletes it when it stops; a worker not seen for
``stale_after_seconds`` counts as gone. The API uses this to tell a user what a queued job is
waiting for; the reaper to fail jobs nobody can run, and to re-queue at once a running job whose
worker stopped beating (``worker_lost_after_seconds``).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core.models import Worker, utcnow
from core.settings import Settings

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
# Set by the worker's main process; its pool processes inherit it, so that a job names the
# workers row whose heartbeat says whether the worker running it is alive.
WORKER_ID_ENV = "CVOPT_WORKER_ID"


def new_worker_identity() -> str:
    """A name for a worker that starts now. The random part tells a restarted worker from the
    one before it: a container restarts with the same hostname and, often, the same pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def worker_identity() -> str:
    """This worker, as jobs and the workers table name it (outside a worker: this process)."""
    return os.environ.get(WORKER_ID_ENV) or f"{socket.gethostname()}:{os.getpid()}"


def gpu_queue(kind: str | None) -> str:
    """The queue for work on any GPU (kind None) or on one GPU kind."""
    return f"{GPU_QUEUE}.{kind}" if kind else GPU_QUEUE


def is_gpu_queue(queue: str) -> bool:
    return queue == GPU_QUEUE or queue.startswith(GPU_QUEUE + ".")


def gpu_kind_from_name(name: str) -> str:
    """A short, stable slug of a GPU's marketing name: "NVIDIA H100 80GB HBM3" -> "h100",
    "NVIDIA GeForce RTX 4090" -> "rtx-4090", "Tesla T4" -> "t4", "NVIDIA L40S" -> "l40s"."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    words = [w for w in words if w not in {"nvidia", "geforce", "tesla", "quadro"}]
    if not words:
        return "unknown"
    if words[0] in {"rtx", "gtx", "titan"} and len(words) > 1:
        return f"{words[0]}-{words[1]}"
    if len(words) > 1 and words[0] in {"a", "l", "h", "b"} and words[1].isdigit():  # "A 100" spellings
        return words[0] + words[1]
    return words[0]


def waiting_for(queue: str) -> str:
    if queue == GPU_QUEUE:
        return "gpu worker"
    if is_gpu_queue(queue):
        return f"gpu worker ({queue.split('.', 1)[1]})"
    return f"{queue} worker"


def live_queues(session: Session, settings: Settings) -> set[str]:
    since = utcnow() - timedelta(seconds=settings.stale_after_seconds)
    rows = session.scalars(select(Worker.queues).where(Worker.last_seen_at >= since))
    return {q for queues in rows for q in queues}


def heartbeat(
    session: Session, *, worker_id: str, hostname: str, queues: list[str], gpu: dict[str, Any] | None
) -> None:
    row = session.get(Worker, worker_id)
    now = utcnow()
    if row is None:
        session.add(Worker(id=worker_id, hostname=hostname, queues=queues, gpu=gpu, started_at=now, last_seen_at=now))
    else:
        row.queues, row.gpu, row.last_seen_at = queues, gpu, now
    # Rows of workers gone for a day are history nobody reads.
    session.execute(delete(Worker).where(Worker.last_seen_at < now - timedelta(days=1)))
    session.commit()


def forget(session: Session, worker_id: str) -> None:
    session.execute(delete(Worker).where(Worker.id == worker_id))
    session.commit()
