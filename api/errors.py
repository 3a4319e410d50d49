"""The one place where domain errors become HTTP: a stable body {code, message, details}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import errors

log = logging.getLogger("cvopt.api")

STATUS = {
    errors.NotFound: 404,
    errors.BadRequest: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.QuotaExceeded: 429,
    errors.InvalidInput: 422,
    errors.UnsupportedMedia: 415,
    errors.PayloadTooLarge: 413,
    errors.Conflict: 409,
    errors.ServiceUnavailable: 503,
    errors.StorageUnavailable: 503,
}


def error_response(status: int, code: str, message: str, details=None, headers=None) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"code": code, "message": message, "details": details if details is not None else {}},
        headers=headers,
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.CvoptError)
    async def _domain(_: Request, exc: errors.CvoptError) -> JSONResponse:
        status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 400)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if isinstance(exc, errors.QuotaExceeded):
            headers = {"Retry-After": str(exc.retry_after)}
        elif status == 503:
            headers = {"Retry-After": "5"}
        return error_response(status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"loc": list(e.get("loc", [])), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        first = problems[0] if problems else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return error_response(
            422, "validation_error", f"{where}: {first['msg']}" if where else first["msg"], {"errors": problems}
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(DataError)
    async def _value_refused(_: Request, exc: DataError) -> JSONResponse:
        # A value the database cannot store or compare (Postgres refuses NUL in text): the
        # request's fault, e.g. an id with a NUL byte in the path or the body.
        reason = (str(exc.orig or exc).strip().splitlines() or [""])[0][:200]
        return error_response(422, "invalid_value", f"a value in the request is not valid here: {reason}")

    @app.exception_handler(OperationalError)
    async def _database_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.error("database error: %s", exc)
        return error_response(
            503, "database_unavailable", "the database is unavailable; retry shortly", headers={"Retry-After": "5"}
        )
