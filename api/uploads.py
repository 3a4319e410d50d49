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
from typing import TypeVar

from fastapi import Request
from pydantic import TypeAdapter, ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from core.errors import BadRequest, InvalidInput, PayloadTooLarge
from core.schemas import Name
from core.settings import Settings
from core.storage import safe_filename

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


async def receive_upload(request: Request, *, file_field: str, max_bytes: int, tmp_dir: Path) -> Upload:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise InvalidInput(
            f"send the file as multipart/form-data in the field {file_field!r}", code="multipart_required"
        )
    length = content_length(request)
    if length is not None and length > max_bytes + MULTIPART_SLACK:
        raise _too_large(max_bytes)

    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
    out = os.fdopen(fd, "wb")
    state = {"headers": {}, "header_field": b"", "header_value": b"", "name": None, "filename": None, "text": None}
    digest = hashlib.sha256()
    fields: dict[str, str] = {}
    got_file = {"size": 0, "seen": False, "filename": ""}
    errors: list[Exception] = []

    def on_part_begin() -> None:
        state["headers"] = {}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header_field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header_value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["header_field"].lower()] = state["header_value"]
        state["header_field"] = state["header_value"] = b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        state["name"] = disp.get(b"name", b"").decode("utf-8", "replace")
        filename = disp.get(b"filename")
        state["filename"] = filename.decode("utf-8", "replace") if filename is not None else None
        state["text"] = None if state["name"] == file_field else bytearray()
        if state["name"] == file_field:
            if got_file["seen"]:
                errors.append(InvalidInput(f"send one file in {file_field!r}", code="multiple_files"))
            got_file["seen"] = True
            got_file["filename"] = state["filename"] or "upload"

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if errors:
            return
        chunk = data[start:end]
        if state["text"] is None:
            got_file["size"] += len(chunk)
            if got_file["size"] > max_bytes:
                errors.append(_too_large(max_bytes))
                return
            digest.update(chunk)
            out.write(chunk)
        else:
            state["text"] += chunk
            if len(state["text"]) > MAX_TEXT_FIELD:
                errors.append(InvalidInput(f"form field {state['name']!r} is too long", code="field_too_long"))

    def on_part_end() -> None:
        if state["text"] is not None and state["name"]:
            fields[state["name"]] = bytes(state["text"]).decode("utf-8", "replace")

    parser = MultipartParser(
        params[b"boundary"],
        callbacks={
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                if errors:
                    raise errors[0]
            parser.finalize()
        except (PayloadTooLarge, InvalidInput):
            raise
        except Exception as exc:  # python-multipart's parse errors
            raise InvalidInput(f"the multipart body is malformed: {exc}", code="malformed_multipart") from exc
        finally:
            out.close()
        if errors:
            raise errors[0]
        if not got_file["seen"]:
            raise InvalidInput(f"no file in the multipart field {file_field!r}", code="file_required")
        if got_file["size"] == 0:
            raise InvalidInput("the uploaded file is empty", code="empty_file")
        if "name" in fields:
            fields["name"] = _check_name_field(fields["name"])
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return Upload(
        path=Path(tmp_name),
        filename=_safe_filename(got_file["filename"]),
        size_bytes=got_file["size"],
        sha256=digest.hexdigest(),
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


def multipart_openapi(description: str) -> dict:
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
