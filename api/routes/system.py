"""Health, readiness and the signed download route for local storage (no API key: the
signature is the permission)."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import text

from api.deps import SessionDep, StoreDep
from core.errors import NotFound, Unauthorized
from core.queue import get_celery
from core.storage import LocalStore, verify_local

router = APIRouter(tags=["system"])


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
def download(key: str, store: StoreDep, expires: int = Query(...), sig: str = Query(...),
             filename: str = Query("download")) -> FileResponse:
    if not isinstance(store, LocalStore):
        raise NotFound("downloads are served by the object store", code="not_found")
    if not verify_local(key, expires, sig, store.signing_key):
        raise Unauthorized("the download link is invalid or expired", code="invalid_signature")
    path = store.path_for(key)
    if not path.is_file():
        raise NotFound("the object no longer exists", code="not_found")
    return FileResponse(path, filename=filename, media_type="application/octet-stream")
