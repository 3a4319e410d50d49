"""The object store: S3 (any S3-compatible server) or a local directory.

Both stream: objects move between a local file and the store in chunks, never whole in memory.
Local objects are downloaded through HMAC-signed, expiring URLs that the API serves itself; the
signature covers the key, the expiry and the file name the download is saved as.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlencode, urlparse

from core.errors import NotFound, ServiceUnavailable, StorageUnavailable
from core.settings import Settings, get_settings


@dataclass(frozen=True)
class SignedUrl:
    url: str
    expires_at: datetime


class ObjectStore(Protocol):
    def put_file(self, key: str, path: Path) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def download_url(self, key: str, *, filename: str, base_url: str) -> SignedUrl: ...
    def check(self) -> None: ...


def _safe_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


def safe_filename(name: str, default: str) -> str:
    """The last path part of a name a user sent, unicode kept, without control and format
    characters (NUL, newlines, bidi overrides), surrounding spaces or leading dots; ``default``
    if nothing is left."""
    name = "".join(c for c in name if unicodedata.category(c) not in ("Cc", "Cf", "Cs"))
    return name.replace("\\", "/").rsplit("/", 1)[-1].strip().lstrip(".").strip() or default


def content_disposition(filename: str) -> str:
    """``attachment`` with the file name's last path part only (RFC 6266): an ASCII fallback in
    ``filename`` and, when the name is not plain ASCII, the exact name in ``filename*`` (RFC 5987)."""
    name = safe_filename(filename, "download")
    fallback = "".join(c if c.isascii() and c not in '"%' else "_" for c in name)
    header = f'attachment; filename="{fallback}"'
    if fallback != name:
        header += f"; filename*=UTF-8''{quote(name, safe='')}"
    return header


# -- local directory + signed URLs -------------------------------------------------------------


def sign_local(key: str, expires: int, signing_key: bytes, filename: str | None = None) -> str:
    """HMAC of canonical JSON: no two (key, expires, filename) share a message, and a link signed
    without a file name (a report's) is not a download link."""
    msg = json.dumps([key, expires, filename], ensure_ascii=True).encode()
    return hmac.new(signing_key, msg, hashlib.sha256).hexdigest()


def verify_local(key: str, expires: int, signature: str, signing_key: bytes, filename: str | None = None) -> bool:
    if expires < int(time.time()):
        return False
    # As bytes: compare_digest refuses a str with non-ASCII characters (a TypeError, a 500 for a forged link).
    return hmac.compare_digest(sign_local(key, expires, signing_key, filename).encode(), signature.encode())


class LocalStore:
    def __init__(self, root: Path, *, signing_key: bytes, ttl_seconds: int):
        self.root = root
        self.signing_key = signing_key
        self.ttl_seconds = ttl_seconds
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        return self.root / _safe_key(key)

    def put_file(self, key: str, path: Path) -> None:
        dest = self.path_for(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Copy then rename: a reader never sees a half-written object.
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, 1024 * 1024)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_file(self, key: str, path: Path) -> None:
        src = self.path_for(key)
        if not src.exists():
            raise NotFound(f"object {key} is missing from storage")
        shutil.copyfile(src, path)

    def delete(self, key: str) -> None:
        self.path_for(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self.path_for(key).exists()

    def download_url(self, key: str, *, filename: str, base_url: str) -> SignedUrl:
        expires = int(time.time()) + self.ttl_seconds
        sig = sign_local(key, expires, self.signing_key, filename)
        query = urlencode({"expires": expires, "sig": sig, "filename": filename})
        url = f"{base_url.rstrip('/')}/files/{quote(key)}?{query}"
        return SignedUrl(url=url, expires_at=datetime.fromtimestamp(expires, UTC))

    def check(self) -> None:
        probe = self.root / ".readyz"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise ServiceUnavailable(f"storage directory {self.root} is not writable: {exc}") from exc


# -- S3 ----------------------------------------------------------------------------------------


class S3Store:
    def __init__(self, bucket: str, prefix: str, settings: Settings):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.ttl_seconds = settings.download_url_ttl_seconds
        cfg = Config(
            signature_version="s3v4",
            # A few quick tries per request; the worker retries longer outages itself
            # (CVOPT_STORAGE_RETRY_SECONDS) and the API answers 503 with Retry-After.
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"},
        )
        self.client = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region, config=cfg
        )
        public = settings.s3_public_endpoint_url or settings.s3_endpoint_url
        self.presign_client = (
            self.client
            if public == settings.s3_endpoint_url
            else boto3.client("s3", endpoint_url=public, region_name=settings.s3_region, config=cfg)
        )

    def _key(self, key: str) -> str:
        key = _safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, path: Path) -> None:
        # upload_file switches to multipart uploads for large files: bounded memory.
        with _unavailable_on_network_errors(key):
            self.client.upload_file(str(path), self.bucket, self._key(key))

    def get_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            with _unavailable_on_network_errors(key):
                self.client.download_file(self.bucket, self._key(key), str(path))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise NotFound(f"object {key} is missing from storage") from exc
            raise

    def delete(self, key: str) -> None:
        with _unavailable_on_network_errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def download_url(self, key: str, *, filename: str, base_url: str) -> SignedUrl:
        expires_at = datetime.fromtimestamp(int(time.time()) + self.ttl_seconds, UTC)
        url = self.presign_client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": self._key(key),
                "ResponseContentDisposition": content_disposition(filename),
            },
            ExpiresIn=self.ttl_seconds,
        )
        return SignedUrl(url=url, expires_at=expires_at)

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # any failure means "not ready"; the message says which
            raise ServiceUnavailable(f"S3 bucket {self.bucket} is not reachable: {exc}") from exc


@contextmanager
def _unavailable_on_network_errors(key: str) -> Iterator[None]:
    """The server unreachable (after the client's own retries) or failing with a 5xx is
    StorageUnavailable: the API answers 503, the worker retries and then fails the step."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except BotoCoreError as exc:
        raise StorageUnavailable(f"object storage is unreachable ({type(exc).__name__}) for {key}") from exc
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if status >= 500 or exc.response.get("Error", {}).get("Code") == "SlowDown":
            raise StorageUnavailable(f"object storage failed with HTTP {status} for {key}") from exc
        raise


def make_store(settings: Settings) -> ObjectStore:
    url = settings.resolved_storage_url
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(
            Path(parsed.path),
            signing_key=settings.signing_key(),
            ttl_seconds=settings.download_url_ttl_seconds,
        )
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"CVOPT_STORAGE_URL {url!r} names no bucket (s3://bucket/prefix)")
        return S3Store(parsed.netloc, parsed.path, settings)
    raise ValueError(f"CVOPT_STORAGE_URL {url!r}: scheme must be file:// or s3://")


@lru_cache
def get_store() -> ObjectStore:
    return make_store(get_settings())
