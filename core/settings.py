"""One typed settings object for the API, the worker and the CLI.

Everything comes from the environment (prefix ``CVOPT_``; nested sections use ``__``).
The defaults are the embedded deployment: a SQLite file, a local storage directory and a
broker transport that needs no server, all under ``CVOPT_DATA_DIR``.
"""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "please-change"}


# A GPU kind: the suffix of its queue, gpu.<kind> (a worker setting and a step option).
GPU_KIND_PATTERN = r"^[a-z0-9][a-z0-9-]{0,40}$"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CVOPT_", env_nested_delimiter="__", extra="ignore", frozen=True)

    env: Literal["local", "production"] = "local"
    data_dir: Path = Path(".cvopt")

    # Empty means "the embedded default under data_dir".
    database_url: str = ""
    broker_url: str = ""
    storage_url: str = ""

    s3_endpoint_url: str | None = None
    # Host clients use for presigned URLs when it differs from the one the service uses
    # (compose: the API reaches minio:9000, a laptop reaches localhost:9000).
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"

    secret_key: str = ""
    bootstrap_api_key: str | None = None
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)
    download_url_ttl_seconds: int = Field(default=900, gt=0, le=7 * 24 * 3600)
    # Base URL that clients use to reach this API; local download links are built on it.
    # Empty: taken from the request.
    public_url: str = ""

    api_threads: int = Field(default=4, ge=1, le=256)
    # How long an API process keeps an API key it looked up (no query, no hash lookup in the
    # database per request). A key revoked through this process stops at once; through another
    # API process, within this many seconds. 0: look the key up on every request.
    api_key_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    worker_concurrency: int = Field(default=1, ge=1)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    # A running job whose heartbeat is older than this is taken to have lost its worker.
    stale_after_seconds: float = Field(default=120.0, gt=0)
    # Sooner than that when its worker is known to be gone: a running job is re-queued at the
    # reaper's next round once neither it nor its worker's row (refreshed every heartbeat_seconds,
    # deleted when the worker stops) has beaten for this long. A few heartbeats, so that a busy
    # database does not make a live worker look dead.
    worker_lost_after_seconds: float = Field(default=30.0, gt=0)
    # A queued job that no worker has picked up after this long is sent to the broker again.
    requeue_after_seconds: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    reaper_interval_seconds: float = Field(default=30.0, gt=0)
    # A queued job whose queue no live worker consumes (a GPU job with no GPU worker up) fails
    # after this long, saying what it waited for, instead of waiting forever.
    no_worker_timeout_seconds: float = Field(default=1800.0, gt=0)
    # This GPU worker's kind, the queue suffix jobs target it by (gpu.<kind>). Empty: derived
    # from the GPU's name, e.g. "NVIDIA H100 80GB HBM3" -> "h100".
    gpu_kind: str = Field(default="", pattern=GPU_KIND_PATTERN + "|^$")
    benchmark_threads: int = Field(default=1, ge=1)
    # How long an Idempotency-Key is remembered: a retry within it returns the first result.
    idempotency_ttl_seconds: int = Field(default=24 * 3600, gt=0)

    # How long a worker retries the database and the object store before the job fails.
    db_retry_seconds: float = Field(default=60.0, ge=0)
    storage_retry_seconds: float = Field(default=60.0, ge=0)

    # Logs: one JSON object per line (request_id / job_id on each), or text; an access-log line
    # per API request. /metrics needs this bearer token when set.
    log_format: Literal["json", "text"] = "json"
    access_log: bool = True
    metrics_token: str = ""

    # Webhooks (core/webhooks.py): comma-separated host patterns a webhook may call (empty: any
    # public host); loopback and private addresses only when allowed.
    webhook_allowed_hosts: str = ""
    webhook_allow_private: bool = False
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_backoff_seconds: float = Field(default=5.0, gt=0)  # first retry; doubles, at most 1 h
    webhook_retry_seconds: float = Field(default=24 * 3600.0, gt=0)  # then the delivery is failed

    # Per-tenant quotas, for tenants that set none of their own (0: no limit).
    quota_concurrent_jobs: int = Field(default=100, ge=0)
    quota_storage_bytes: int = Field(default=200 * 1024**3, ge=0)
    quota_uploads_per_minute: int = Field(default=600, ge=0)

    # Each step runs in a child process with these limits (0: no limit); a step past one fails
    # its job with "out of memory at step X" / "step X exceeded N s" and the worker goes on.
    step_isolation: Literal["process", "inline"] = "process"
    # None: 80% of the machine's memory shared among the worker's concurrent jobs.
    step_memory_limit_mb: int | None = Field(default=None, ge=0)
    step_cpu_limit_seconds: int = Field(default=0, ge=0)
    step_timeout_seconds: int = Field(default=3 * 3600, ge=0)
    # Keep one step process started ahead, its imports done, so that a step starts at once.
    step_prewarm: bool = True
    # The step processes' niceness (read by the step process from the environment).
    step_nice: int = Field(default=10, ge=0, le=19)

    @model_validator(mode="after")
    def _lost_workers_are_silent_for_several_heartbeats(self) -> Settings:
        # Otherwise the ordinary gap between two beats would look like a dead worker, and a live
        # worker's job would be given to another (its run then stops: see worker.runner).
        if self.worker_lost_after_seconds < 3 * self.heartbeat_seconds:
            raise ValueError(
                f"CVOPT_WORKER_LOST_AFTER_SECONDS ({self.worker_lost_after_seconds:g}) must be at least 3 x "
                f"CVOPT_HEARTBEAT_SECONDS ({self.heartbeat_seconds:g})"
            )
        return self

    @model_validator(mode="after")
    def _production_needs_real_secrets(self) -> Settings:
        if self.env == "production":
            if self.secret_key.strip().lower() in PLACEHOLDER_SECRETS or len(self.secret_key) < 32:
                raise ValueError(
                    "CVOPT_SECRET_KEY must be set to a random value of at least 32 characters when CVOPT_ENV=production"
                )
            if not self.database_url or not self.broker_url or not self.storage_url:
                raise ValueError(
                    "CVOPT_DATABASE_URL, CVOPT_BROKER_URL and CVOPT_STORAGE_URL must be set "
                    "when CVOPT_ENV=production (the embedded defaults are for one machine)"
                )
        return self

    # -- resolved values -------------------------------------------------------------------

    @property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'cvopt.db'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{self.data_path / 'objects'}"

    @property
    def broker_folder(self) -> Path:
        return self.data_path / "broker"

    @property
    def is_embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")

    @property
    def upload_tmp_dir(self) -> Path:
        return self.data_path / "tmp"

    @property
    def work_dir(self) -> Path:
        return self.data_path / "work"

    _signing_key: bytes | None = PrivateAttr(default=None)

    def signing_key(self) -> bytes:
        """The key for HMAC-signed download URLs.

        Production requires CVOPT_SECRET_KEY (checked at load). Locally an unset key is
        generated once and kept in the data directory, so URLs survive restarts and the API
        and the worker agree on it.
        """
        if self.secret_key:
            return self.secret_key.encode()
        if self._signing_key is not None:  # read once: every job in a listing signs its report link
            return self._signing_key
        path = self.data_path / "secret_key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process of this deployment made it first
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_urlsafe(48))
        self._signing_key = path.read_text().strip().encode()
        return self._signing_key


@lru_cache
def get_settings() -> Settings:
    return Settings()
