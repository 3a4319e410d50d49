"""``GET /metrics`` in Prometheus' text format.

What the database knows is read at scrape time, so every API replica reports the same numbers and
a restart loses nothing: jobs by state, queued jobs by queue, step durations (a histogram per
step over every step that ended), workers and the age of their last heartbeat, upload bytes. The
broker's own queue lengths come from Redis when it is the broker. HTTP latency by route is
observed by this process (with several API processes, each reports its own requests).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from sqlalchemy import case, func, literal, select

from core.db import get_sessionmaker
from core.models import (
    Dataset,
    Job,
    JobStatus,
    JobStep,
    Model,
    StepStatus,
    Worker,
    utcnow,
)
from core.settings import get_settings

REGISTRY = CollectorRegistry()
STEP_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 10800)
HTTP_LATENCY = Histogram(
    "cvopt_http_request_duration_seconds",
    "API request latency by route template, method and status.",
    ["method", "route", "status"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
)


def _duration_seconds(dialect: str):
    if dialect == "sqlite":
        return (func.julianday(JobStep.finished_at) - func.julianday(JobStep.started_at)) * 86400.0
    return func.extract("epoch", JobStep.finished_at - JobStep.started_at)


class DatabaseCollector:
    def describe(self):
        return []  # registering it must not query the database (the API imports this at start)

    def collect(self):
        sessions = get_sessionmaker()
        settings = get_settings()
        with sessions() as s:
            jobs = GaugeMetricFamily("cvopt_jobs", "Jobs by state.", labels=["state"])
            counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            for state in JobStatus:
                jobs.add_metric([state.value], counts.get(state, 0))
            yield jobs

            queued = GaugeMetricFamily(
                "cvopt_queue_depth", "Queued jobs by queue (the database's view).", labels=["queue"]
            )
            for queue, n in s.execute(
                select(Job.queue, func.count()).where(Job.status == JobStatus.queued).group_by(Job.queue)
            ).all():
                queued.add_metric([queue], n)
            yield queued

            duration = _duration_seconds(s.get_bind().dialect.name)
            ended = (
                JobStep.status.in_([StepStatus.succeeded, StepStatus.failed])
                & JobStep.started_at.is_not(None)
                & JobStep.finished_at.is_not(None)
            )
            columns = [func.count(), func.coalesce(func.sum(duration), 0.0)]
            columns += [func.sum(case((duration <= le, 1), else_=0)) for le in STEP_BUCKETS]
            hist = HistogramMetricFamily(
                "cvopt_step_duration_seconds", "Duration of every step that ended.", labels=["step"]
            )
            for name, count, total, *below in s.execute(
                select(JobStep.name, *columns).where(ended).group_by(JobStep.name)
            ).all():
                buckets = [(str(le), int(n or 0)) for le, n in zip(STEP_BUCKETS, below, strict=True)]
                hist.add_metric([name], buckets + [("+Inf", int(count))], sum_value=float(total or 0))
            yield hist

            workers = GaugeMetricFamily(
                "cvopt_worker_heartbeat_age_seconds",
                "Seconds since each worker last announced itself.",
                labels=["worker", "queues"],
            )
            alive = 0
            now = utcnow()
            for w in s.scalars(select(Worker)).all():
                age = (now - w.last_seen_at).total_seconds()
                workers.add_metric([w.id, ",".join(w.queues)], age)
                alive += age < settings.stale_after_seconds
            yield workers
            yield GaugeMetricFamily(
                "cvopt_workers_alive", "Workers seen within CVOPT_STALE_AFTER_SECONDS.", value=alive
            )

            uploads = CounterMetricFamily(
                "cvopt_upload_bytes", "Bytes of models and datasets uploaded.", labels=["kind"]
            )
            for kind, table in (("model", Model), ("dataset", Dataset)):
                total = s.scalar(select(func.coalesce(func.sum(table.size_bytes), literal(0))))
                uploads.add_metric([kind], float(total or 0))
            yield uploads
        yield from _broker_queues(settings)


def _broker_queues(settings):
    if not settings.resolved_broker_url.startswith("redis"):
        return
    import redis  # a library (no cycle), needed only when the broker is Redis

    family = GaugeMetricFamily(
        "cvopt_broker_queue_length", "Messages waiting in the broker, by queue.", labels=["queue"]
    )
    try:
        client = redis.Redis.from_url(settings.resolved_broker_url, socket_timeout=2)
        for key in client.scan_iter(match="*", count=200, _type="list"):
            name = key.decode()
            if name == "cpu" or name.startswith("gpu"):
                family.add_metric([name], client.llen(key))
    except Exception:  # the broker being down shows in /readyz; the scrape still answers
        return
    yield family


REGISTRY.register(DatabaseCollector())


def render() -> bytes:
    return generate_latest(REGISTRY)


def observe(method: str, route: str, status: int, started: float) -> None:
    HTTP_LATENCY.labels(method, route, str(status)).observe(time.perf_counter() - started)
