"""Stream a multipart upload to a temporary file, hashing and counting on the way.

The body is parsed as it arrives (python-multipart's push parser): memory stays at one chunk
whatever the file's size, and the size limit is enforced while streaming, before the whole
body has been read.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from fastapi import Request
from pydantic import TypeAdapter, ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from core.errors import BadRequest, CvoptError, InvalidInput, PayloadTooLarge
from core.schemas import Name
from core.settings import Settings
from core.storage import safe_filename

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_TEXT_FIELD = 4096
# A file system's limit for one path part is 255 bytes; the object key ends with the file name.
MAX_FILENAME_BYTES = 200
# What a multipart body may hold beyond its file: boundaries, part headers, a few text fields.
MULTIPART_SLACK = 64 * 1024


@dataclass
class Upload:
    path: Path
    filename: str
    size_bytes: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def _safe_filename(name: str) -> str:
    """The user's file name, unicode kept (it is also the object's key and a file name on disk):
    no path, no control characters, at most MAX_FILENAME_BYTES of UTF-8 with its suffix kept."""
    name = unicodedata.normalize("NFC", safe_filename(name, "upload"))
    stem, dot, suffix = name.rpartition(".")
    if not stem or len(suffix.encode()) > 32:
        stem, dot, suffix = name, "", ""
    room = MAX_FILENAME_BYTES - len((dot + suffix).encode())
    return stem.encode()[:room].decode("utf-8", "ignore") + dot + suffix


def content_length(request: Request) -> int | None:
    """The body's declared size, None when not declared. uvicorn answers a malformed Content-Length
    itself (a plain-text 400) before the app; one that gets here (another server, a test client) is
    refused in the JSON error shape rather than read as "unknown"."""
    values = request.headers.getlist("content-length")
    if not values:
        return None
    if len(set(values)) > 1 or not re.fullmatch(r"[0-9]{1,18}", values[0].strip()):
        raise BadRequest(
            f"the Content-Length header {', '.join(values)!r} is not a number of bytes", code="invalid_content_length"
        )
    return int(values[0])


_NAME = TypeAdapter(Name)


def _check_name_field(value: str) -> str:
    """The form's display name, held to the rules of a JSON ``name`` and refused in the shape of a
    JSON body's validation error."""
    try:
        return _NAME.validate_python(value)
    except ValidationError as exc:
        errors = [{"loc": ["body", "name"], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise InvalidInput(f"name: {errors[0]['msg']}", code="validation_error", details={"errors": errors}) from None


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the upload exceeds the limit of {limit} bytes (CVOPT_MAX_UPLOAD_BYTES)",
        code="upload_too_large",
        details={"max_upload_bytes": limit},
    )


class _FormReader:
    """python-multipart's callbacks for one body: the file field streams into ``out`` (hashed,
    counted, held to ``max_bytes``); every other field is kept as a short text. The callbacks run
    inside the parser, so an error is recorded there and raised by the caller between chunks."""

    def __init__(self, out: BinaryIO, *, file_field: str, max_bytes: int) -> None:
        self.out = out
        self.file_field = file_field
        self.max_bytes = max_bytes
        self.digest = hashlib.sha256()
        self.fields: dict[str, str] = {}
        self.file_seen = False
        self.file_size = 0
        self.filename = ""
        self.errors: list[CvoptError] = []
        # The part being read: its headers so far, its field name, and its text (None for the file).
        self._headers: dict[bytes, bytes] = {}
        self._header_field = b""
        self._header_value = b""
        self._name = ""
        self._text: bytearray | None = None

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
        }

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _on_headers_finished(self) -> None:
        _, disposition = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = disposition.get(b"name", b"").decode("utf-8", "replace")
        if self._name != self.file_field:
            self._text = bytearray()
            return
        self._text = None
        if self.file_seen:
            self.errors.append(InvalidInput(f"send one file in {self.file_field!r}", code="multiple_files"))
        self.file_seen = True
        filename = disposition.get(b"filename")
        self.filename = filename.decode("utf-8", "replace") if filename else "upload"

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.errors:
            return
        chunk = data[start:end]
        if self._text is not None:
            self._text += chunk
            if len(self._text) > MAX_TEXT_FIELD:
                self.errors.append(InvalidInput(f"form field {self._name!r} is too long", code="field_too_long"))
            return
        self.file_size += len(chunk)
        if self.file_size > self.max_bytes:
            self.errors.append(_too_large(self.max_bytes))
            return
        self.digest.update(chunk)
        self.out.write(chunk)

    def _on_part_end(self) -> None:
        if self._text is not None and self._name:
            self.fields[self._name] = bytes(self._text).decode("utf-8", "replace")

    def checked_fields(self) -> dict[str, str]:
        """The form's text fields, once the whole body is read and holds one non-empty file."""
        if self.errors:
            raise self.errors[0]
        if not self.file_seen:
            raise InvalidInput(f"no file in the multipart field {self.file_field!r}", code="file_required")
        if self.file_size == 0:
            raise InvalidInput("the uploaded file is empty", code="empty_file")
        if "name" in self.fields:
            self.fields["name"] = _check_name_field(self.fields["name"])
        return self.fields


def _multipart_boundary(request: Request, *, file_field: str, max_bytes: int) -> bytes:
    """The body's boundary, once its headers say it is a multipart form that may fit the limit."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise InvalidInput(
            f"send the file as multipart/form-data in the field {file_field!r}", code="multipart_required"
        )
    length = content_length(request)
    if length is not None and length > max_bytes + MULTIPART_SLACK:
        raise _too_large(max_bytes)
    return params[b"boundary"]


async def _read_body(request: Request, boundary: bytes, reader: _FormReader) -> None:
    """Push the body through the parser as it arrives, stopping at the first error."""
    parser = MultipartParser(boundary, callbacks=reader.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if reader.errors:
                raise reader.errors[0]
        parser.finalize()
    except (PayloadTooLarge, InvalidInput):
        raise
    except Exception as exc:  # python-multipart's parse errors
        raise InvalidInput(f"the multipart body is malformed: {exc}", code="malformed_multipart") from exc


async def receive_upload(request: Request, *, file_field: str, max_bytes: int, tmp_dir: Path) -> Upload:
    """The multipart body's file, in a temporary file under ``tmp_dir`` (removed again if the body
    is refused), with its size, sha256 and the form's other fields."""
    boundary = _multipart_boundary(request, file_field=file_field, max_bytes=max_bytes)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
    try:
        with os.fdopen(fd, "wb") as out:
            reader = _FormReader(out, file_field=file_field, max_bytes=max_bytes)
            await _read_body(request, boundary, reader)
        fields = reader.checked_fields()
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return Upload(
        path=Path(tmp_name),
        filename=_safe_filename(reader.filename),
        size_bytes=reader.file_size,
        sha256=reader.digest.hexdigest(),
        fields=fields,
    )


T = TypeVar("T")


async def handle_upload(
    request: Request, settings: Settings, create: Callable[[Upload], T], admit: Callable[[int], None] | None = None
) -> T:
    """Receive the ``file`` field, hand it to ``create`` (in a thread: it inspects and stores
    it), and remove the temporary file whatever happens. ``admit(file_bytes)`` runs first, before
    any of the body is read (quotas), with the file's size as far as Content-Length tells it (the
    body less its multipart framing and form fields; 0 when unknown)."""
    if admit is not None:
        length = content_length(request) or 0
        await run_in_threadpool(admit, max(0, length - MULTIPART_SLACK))
    upload = await receive_upload(
        request, file_field="file", max_bytes=settings.max_upload_bytes, tmp_dir=settings.upload_tmp_dir
    )
    try:
        return await run_in_threadpool(create, upload)
    finally:
        upload.discard()


def multipart_openapi(description: str) -> dict[str, Any]:
    """The request body for docs: the route reads the stream itself, so FastAPI can't infer it."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary", "description": description},
                            "name": {"type": "string", "description": "A display name (default: the file name)."},
                            "architecture": {
                                "type": "string",
                                "description": (
                                    "Models only: the torchvision architecture of a state_dict upload (e.g. resnet18)."
                                ),
                            },
                        },
                    }
                }
            },
        }
    }
