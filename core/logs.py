"""Logging for the API and the worker: one JSON object per line (CVOPT_LOG_FORMAT=json, the
default) or plain text, every line carrying the request id (API) or the job id (worker) that it
belongs to, taken from context variables set where a request or a job starts."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("cvopt_request_id", default=None)
job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("cvopt_job_id", default=None)


class ContextFilter(logging.Filter):
    """Puts the current request and job ids on every record (also on records of libraries)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id.get()
        return True


class JsonFormatter(logging.Formatter):
    FIELDS = ("request_id", "job_id", "method", "route", "status", "duration_ms", "step")

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in self.FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(ids)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = [f"{k}={getattr(record, k)}" for k in ("request_id", "job_id") if getattr(record, k, None)]
        record.ids = f" [{' '.join(ids)}]" if ids else ""
        return super().format(record)


def setup(level: str = "INFO", fmt: str | None = None) -> None:
    """Configure the root logger once per process (uvicorn's and Celery's loggers propagate to it)."""
    if fmt is None:
        from core.settings import get_settings

        fmt = get_settings().log_format
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # library warnings become records too, not bare stderr lines
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.worker"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
