"""The Python client for pipelines: upload, submit, wait, download, with the retries a pipeline
would otherwise write itself.

    from cvopt.client import Client

    with Client("http://cvopt:8000", api_key) as cv:
        model = cv.upload_model("model.onnx")
        data = cv.upload_dataset("calibration.zip")
        job = cv.submit_job(model_id=model["id"], preset="onnx-int8", calibration_dataset_id=data["id"])
        job = cv.wait(job["id"], timeout=3600)            # raises JobFailed with the job's error
        files = cv.download_artifacts(job["id"], "out/")  # the recommended one (all_artifacts=True: every one)

Every request is retried on connection errors, 5xx and 429 with exponential back-off and jitter,
honouring ``Retry-After``; a POST that creates something carries an ``Idempotency-Key``, so a
retried POST never makes a second model, dataset or job. 4xx errors raise ``ApiError`` with the
service's ``code``, ``message`` and ``details``. Only httpx is needed (no torch).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class CvoptClientError(Exception):
    """Base of every error this client raises."""


class ApiError(CvoptClientError):
    """The service refused the request: ``status``, and its ``code``, ``message``, ``details``."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details or {}


class JobFailed(CvoptClientError):
    """The job ended failed or cancelled; ``job`` is its last state, ``error`` its error."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.error = job.get("error") or {}
        if job["status"] == "cancelled":
            text = f"job {job['id']} was cancelled"
        else:
            text = (
                f"job {job['id']} failed at step {self.error.get('step')}: {self.error.get('code')}: "
                f"{self.error.get('message')}"
            )
        super().__init__(text)


class WaitTimeout(CvoptClientError):
    def __init__(self, job: dict[str, Any], timeout: float) -> None:
        self.job = job
        super().__init__(f"job {job['id']} is still {job['status']} after {timeout:.0f} s")


class ChecksumMismatch(CvoptClientError):
    pass


class Client:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base_url = base_url or os.environ.get("CVOPT_URL") or "http://127.0.0.1:8000"
        api_key = api_key or os.environ.get("CVOPT_API_KEY")
        if not api_key:
            raise CvoptClientError("an API key is needed: pass api_key or set CVOPT_API_KEY")
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "cvopt-client/1"},
        )
        self._sleep = time.sleep

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport -------------------------------------------------------------------------------

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None and (after := response.headers.get("retry-after", "")).strip().isdigit():
            return min(float(after), self.max_backoff * 4)
        return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)

    def request(
        self,
        method: str,
        path: str,
        *,
        idempotent_key: str | None = None,
        body: Callable[[], dict[str, Any]] | None = None,
        **kwargs,
    ) -> httpx.Response:
        """One API call with retries. ``body()`` makes fresh request arguments for each try (an
        upload's file must be reopened); ``idempotent_key`` goes into ``Idempotency-Key``."""
        headers = dict(kwargs.pop("headers", {}) or {})
        if idempotent_key:
            headers["Idempotency-Key"] = idempotent_key
        for attempt in range(self.max_retries + 1):
            extra = body() if body is not None else {}
            response = None
            try:
                response = self._http.request(method, path, headers=headers, **kwargs, **extra)
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    raise CvoptClientError(f"{method} {path}: {exc}") from exc
            finally:
                for handle in (extra.get("files") or {}).values():
                    if hasattr(handle[1], "close"):
                        handle[1].close()
            if response is not None and response.status_code not in RETRY_STATUSES:
                break
            if response is not None and attempt == self.max_retries:
                break
            self._sleep(self._delay(attempt, response))
        if response.status_code >= 400:
            try:
                err = response.json()
            except ValueError:
                err = {}
            raise ApiError(
                response.status_code,
                err.get("code", "http_error"),
                err.get("message", response.text[:300]),
                err.get("details"),
            )
        return response

    # -- resources -------------------------------------------------------------------------------

    def _upload(self, route: str, path: str | os.PathLike, fields: dict[str, str]) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise CvoptClientError(f"{path} is not a file")
        # The same request on a retry (file, its name, fields): the same key, so at most one object
        # is made; a request that differs in any of them (the same bytes under another name) gets
        # its own key, as the service hashes all of them.
        request = repr((path.name, sorted(fields.items())))
        key = "sdk-" + _sha256(path) + "-" + hashlib.sha256(request.encode()).hexdigest()[:16]
        return self.request(
            "POST",
            route,
            idempotent_key=key,
            data=fields,
            body=lambda: {"files": {"file": (path.name, open(path, "rb"))}},
        ).json()

    def upload_model(
        self, path: str | os.PathLike, *, name: str | None = None, architecture: str | None = None
    ) -> dict[str, Any]:
        fields = {k: v for k, v in {"name": name, "architecture": architecture}.items() if v}
        return self._upload("/v1/models", path, fields)

    def upload_dataset(self, path: str | os.PathLike, *, name: str | None = None) -> dict[str, Any]:
        return self._upload("/v1/datasets", path, {"name": name} if name else {})

    def submit_job(
        self,
        *,
        model_id: str,
        preset: str | None = None,
        steps: list | None = None,
        calibration_dataset_id: str | None = None,
        evaluation_dataset_id: str | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """POST /v1/jobs. ``extra`` goes into the body as given (None values dropped): input_shape,
        preprocessing, overrides, name, webhook_url, task, max_accuracy_drop, detection, target
        ("x86-cpu", "arm-cpu", "nvidia-gpu") and constraints ({"max_latency_ms": 5, "max_size_mb": 20};
        max_accuracy_drop there or top-level, not both with different values), allow_training (auto may
        add candidates that train: quantization-aware INT8). With preset="auto" the
        job builds every candidate the target allows and recommends the fastest that meets the
        tolerance and constraints; when none does, the recommendation's artifact is null and
        ``closest`` names the nearest miss."""
        body = {
            "model_id": model_id,
            "preset": preset,
            "steps": steps,
            "calibration_dataset_id": calibration_dataset_id,
            "evaluation_dataset_id": evaluation_dataset_id,
            **extra,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return self.request(
            "POST", "/v1/jobs", json=body, idempotent_key=idempotency_key or f"sdk-{uuid.uuid4().hex}"
        ).json()

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/jobs/{job_id}/artifacts").json()["data"]

    def report(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/report").json()

    def wait(
        self,
        job_id: str,
        timeout: float = 3600.0,
        poll_interval: float = 1.0,
        *,
        max_interval: float = 15.0,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job ends, backing off from ``poll_interval`` to ``max_interval``. Returns
        the succeeded job; raises JobFailed (failed or cancelled) or WaitTimeout."""
        deadline = time.monotonic() + timeout
        interval = poll_interval
        while True:
            job = self.get_job(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL:
                if job["status"] != "succeeded":
                    raise JobFailed(job)
                return job
            if time.monotonic() >= deadline:
                raise WaitTimeout(job, timeout)
            self._sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(max_interval, interval * 1.5)

    def recommendation(self, job_id: str) -> dict[str, Any] | None:
        """The job's ``recommended``: {artifact (null when nothing beats the original), reason,
        metrics, ...}; None until the job succeeded."""
        return self.get_job(job_id).get("recommended")

    def download_artifacts(self, job_id: str, dest: str | os.PathLike, *, all_artifacts: bool = False) -> list[Path]:
        """Stream the recommended artifact into ``dest`` (every artifact with ``all_artifacts=True``)
        and check its sha256 against the artifact list. Returns [] when nothing is recommended (the
        job has not succeeded, or no artifact beats the original: ``recommendation(job_id)["reason"]``
        says why). A file whose digest differs is removed and raises ChecksumMismatch."""
        if all_artifacts:
            chosen = self.artifacts(job_id)
        else:
            name = (self.recommendation(job_id) or {}).get("artifact")
            if not name:
                return []
            chosen = [a for a in self.artifacts(job_id) if a["name"] == name]
            if not chosen:
                raise CvoptClientError(f"job {job_id} recommends {name}, which is not in its artifact list")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        return [self._download(artifact, dest) for artifact in chosen]

    def _download(self, artifact: dict[str, Any], dest: Path) -> Path:
        target = dest / Path(artifact["name"]).name
        partial = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        for attempt in range(self.max_retries + 1):
            try:
                # A presigned URL carries its own permission: no API key goes to the store.
                with httpx.stream("GET", artifact["url"], timeout=self._http.timeout, follow_redirects=True) as r:
                    r.raise_for_status()
                    digest = hashlib.sha256()
                    with open(partial, "wb") as fh:
                        for chunk in r.iter_bytes(1024 * 1024):
                            digest.update(chunk)
                            fh.write(chunk)
                break
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                if attempt == self.max_retries:
                    partial.unlink(missing_ok=True)
                    raise CvoptClientError(f"downloading {artifact['name']}: {exc}") from exc
                self._sleep(self._delay(attempt, None))
        if digest.hexdigest() != artifact["sha256"]:
            partial.unlink(missing_ok=True)
            raise ChecksumMismatch(f"{artifact['name']}: sha256 {digest.hexdigest()} != {artifact['sha256']}")
        partial.replace(target)
        return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()
