"""The domain's errors. No HTTP here: api/errors.py maps each kind to a status code."""

from __future__ import annotations

from typing import Any


class CvoptError(Exception):
    """An error a user can act on. ``code`` is stable; ``message`` is for people."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details if details is not None else {}


class NotFound(CvoptError):
    code = "not_found"


class Unauthorized(CvoptError):
    code = "unauthorized"


class BadRequest(CvoptError):
    """The request itself is malformed (a header that is not what HTTP says it is)."""

    code = "bad_request"


class InvalidInput(CvoptError):
    """The request is well-formed but cannot be acted on (bad recipe, bad shapes, ...)."""

    code = "invalid_input"


class UnsupportedMedia(CvoptError):
    """An upload whose content is not a format we accept (random bytes, a pickle, ...)."""

    code = "unsupported_format"


class PayloadTooLarge(CvoptError):
    code = "payload_too_large"


class Conflict(CvoptError):
    code = "conflict"


class Forbidden(CvoptError):
    """The key is valid but may not do this (a tenant key on an admin route)."""

    code = "forbidden"


class QuotaExceeded(CvoptError):
    """A tenant's quota is used up; ``retry_after`` seconds is when trying again makes sense."""

    code = "quota_exceeded"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None, details: Any = None):
        super().__init__(message, code=code, details=details)
        self.retry_after = max(1, int(retry_after))


class StorageUnavailable(CvoptError):
    """The object store could not be reached for longer than the retries allow."""

    code = "storage_unavailable"


class ServiceUnavailable(CvoptError):
    code = "service_unavailable"


class PassError(CvoptError):
    """A step failed for a reason the user can act on (bad model, bad data, unsupported op)."""

    code = "step_failed"


class JobCancelled(Exception):
    """Raised inside the runner when the user cancelled the job; not a failure."""
