"""Live workers: which queues are served, and by which GPUs (what a queued GPU job waits for)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import select

from api.deps import CurrentKey, SessionDep, released
from core.models import Worker, utcnow
from core.settings import get_settings

router = APIRouter(prefix="/workers", tags=["workers"])


class WorkerRead(BaseModel):
    id: str
    hostname: str
    queues: list[str]
    gpu: dict[str, Any] | None
    started_at: datetime
    last_seen_at: datetime


class WorkersRead(BaseModel):
    data: list[WorkerRead]
    count: int


@router.get("", response_model=WorkersRead)
def list_workers(_key: CurrentKey, session: SessionDep) -> WorkersRead:
    """Workers seen within CVOPT_STALE_AFTER_SECONDS."""
    since = utcnow() - timedelta(seconds=get_settings().stale_after_seconds)
    rows = session.scalars(select(Worker).where(Worker.last_seen_at >= since).order_by(Worker.started_at)).all()
    data = [
        WorkerRead(
            id=w.id,
            hostname=w.hostname,
            queues=list(w.queues),
            gpu=w.gpu,
            started_at=w.started_at,
            last_seen_at=w.last_seen_at,
        )
        for w in rows
    ]
    return released(session, WorkersRead(data=data, count=len(data)))
