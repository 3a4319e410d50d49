"""Health, readiness and the signed download route for local storage (no API key: the
signature is the permission)."""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import text

from api import metrics
from api.deps import SessionDep, StoreDep
from core.errors import NotFound, Unauthorized
from core.queue import get_celery
from core.settings import get_settings
from core.storage import LocalStore, content_disposition, verify_local

router = APIRouter(tags=["system"])
STATIC = Path(__file__).resolve().parents[1] / "static"
UI_FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
UI_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@router.get("/ui", include_in_schema=False)
def dashboard() -> FileResponse:
    """The tenant's jobs with links to their reports (the page asks for the API key)."""
    return FileResponse(STATIC / "dashboard.html", media_type="text/html", headers=UI_HEADERS)


@router.get("/ui/{name}", include_in_schema=False)
def dashboard_asset(name: str) -> FileResponse:
    if name not in UI_FILES:
        raise NotFound("no such file", code="not_found")
    return FileResponse(STATIC / name, media_type=UI_FILES[name], headers=UI_HEADERS)


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics(request: Request) -> Response:
    """Prometheus text format; with CVOPT_METRICS_TOKEN set, only for that bearer token."""
    token = get_settings().metrics_token
    if token and not hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {token}"):
        raise Unauthorized("send CVOPT_METRICS_TOKEN as 'Authorization: Bearer <token>'", code="invalid_metrics_token")
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(session: SessionDep, store: StoreDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; say which
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {type(exc).__name__}"
    try:
        store.check()
        checks["storage"] = "ok"
    except Exception as exc:
        checks["storage"] = f"error: {exc}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        status_code=200 if ready else 503,
        content={"status": "ready" if ready else "unavailable", "checks": checks},
        headers=None if ready else {"Retry-After": "5"},
    )


@router.get("/files/{key:path}", include_in_schema=False)
def download(
    key: str, store: StoreDep, expires: int = Query(...), sig: str = Query(...), filename: str = Query(...)
) -> FileResponse:
    if not isinstance(store, LocalStore):
        raise NotFound("downloads are served by the object store", code="not_found")
    if not verify_local(key, expires, sig, store.signing_key, filename):
        raise Unauthorized("the download link is invalid or expired", code="invalid_signature")
    path = store.path_for(key)
    if not path.is_file():
        raise NotFound("the object no longer exists", code="not_found")
    return FileResponse(
        path, media_type="application/octet-stream", headers={"Content-Disposition": content_disposition(filename)}
    )
