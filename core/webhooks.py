"""Webhooks: when a job that names a ``webhook_url`` ends, its JSON (what GET /v1/jobs/{id}
answers) is POSTed there, signed, and retried with exponential back-off until a 2xx or until
CVOPT_WEBHOOK_RETRY_SECONDS have passed. The delivery row is written in the transaction that ends
the job (core.models), so no path that ends a job can forget it and a crash cannot lose it; every
worker process runs ``deliver_due`` in a loop, rows taken with SKIP LOCKED so that each attempt is
made once.

Signature (Stripe's scheme): ``Cvopt-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<body>" with the tenant's webhook secret>``. A receiver recomputes it, compares in constant
time, and refuses a ``t`` older than a few minutes (replays).

SSRF: only http(s); the host must match CVOPT_WEBHOOK_ALLOWED_HOSTS when that is set; and every
address the host resolves to must be public, unless CVOPT_WEBHOOK_ALLOW_PRIVATE (loopback and
private ranges; cloud metadata addresses are refused always). Checked when the job is submitted
(422) and again before each attempt (DNS may have changed).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.errors import InvalidInput
from core.models import Job, Tenant, WebhookDelivery, utcnow
from core.settings import Settings

log = logging.getLogger("cvopt.webhooks")

SIGNATURE_HEADER = "Cvopt-Signature"
# Instance metadata services: never a webhook target, whatever the settings.
METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"),
            ipaddress.ip_address("100.100.100.200")}
MAX_BACKOFF_S = 3600.0


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, tolerance_s: int = 300, now: float | None = None) -> bool:
    """For receivers (and the tests): the signature is ours and not older than ``tolerance_s``."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now or time.time()) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), f"t={timestamp},v1={parts.get('v1', '')}")


def _refused(address: ipaddress._BaseAddress, settings: Settings) -> str | None:
    if address in METADATA:
        return "a cloud metadata address"
    if settings.webhook_allow_private:
        return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private or address.is_reserved or address.is_multicast or address.is_unspecified:
        return "a private or reserved address"
    return None


def check_url(url: str, settings: Settings, *, resolve: bool) -> None:
    """Raise InvalidInput (code ``webhook_url_refused``) for a URL the service must not call."""

    def refuse(why: str) -> InvalidInput:
        return InvalidInput(f"webhook_url {url!r} is refused: {why}", code="webhook_url_refused",
                            details={"webhook_url": url, "reason": why})

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # "http://[::1", "http://host:99999"
        raise refuse(f"it is not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise refuse("only http and https URLs are called")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise refuse("it names no host")
    if parts.username or parts.password:
        raise refuse("credentials in the URL are not allowed")
    allowed = [p.strip().lower() for p in settings.webhook_allowed_hosts.split(",") if p.strip()]
    if allowed and not any(fnmatch.fnmatchcase(host, p) for p in allowed):
        raise refuse(f"its host is not in CVOPT_WEBHOOK_ALLOWED_HOSTS ({', '.join(allowed)})")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is None and (host == "localhost" or host.endswith(".localhost")):
        literal = ipaddress.ip_address("127.0.0.1")
    addresses = [literal] if literal is not None else []
    if literal is None and resolve:
        try:
            infos = socket.getaddrinfo(host, port or (443 if parts.scheme == "https" else 80),
                                       type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise refuse(f"its host does not resolve ({exc.strerror})") from exc
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        if why := _refused(address, settings):
            raise refuse(f"{host} is {why} (CVOPT_WEBHOOK_ALLOW_PRIVATE allows loopback and private ones)")


def delivery_to_read(delivery: WebhookDelivery | None) -> dict | None:
    if delivery is None:
        return None
    return {"url": delivery.url, "event": delivery.event, "status": delivery.status,
            "attempts": list(delivery.attempts or []),
            "next_attempt_at": delivery.next_attempt_at if delivery.status == "pending" else None,
            "finished_at": delivery.finished_at}


def _attempt(delivery: WebhookDelivery, job: Job, secret: str, settings: Settings) -> dict:
    from core.views import job_to_read

    body = job_to_read(job).model_dump_json().encode()
    started = time.perf_counter()
    record: dict = {"at": utcnow().isoformat(), "status_code": None, "error": None}
    try:
        check_url(delivery.url, settings, resolve=True)
        timestamp = int(time.time())
        response = httpx.post(
            delivery.url, content=body, timeout=settings.webhook_timeout_seconds, follow_redirects=False,
            headers={"Content-Type": "application/json", "User-Agent": "cvopt-webhooks/1",
                     "Cvopt-Event": delivery.event, "Cvopt-Delivery": delivery.id,
                     SIGNATURE_HEADER: sign(secret, body, timestamp)},
        )
        record["status_code"] = response.status_code
        if not 200 <= response.status_code < 300:
            record["error"] = f"HTTP {response.status_code}"
    except InvalidInput as exc:
        record["error"] = exc.message
    except httpx.HTTPError as exc:
        record["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    record["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return record


def deliver_due(sessions: sessionmaker[Session], settings: Settings, *, limit: int = 20) -> int:
    """Make one attempt for each delivery that is due; returns how many were attempted."""
    done = 0
    for _ in range(limit):
        with sessions() as s:
            delivery = s.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= utcnow())
                .order_by(WebhookDelivery.next_attempt_at).limit(1).with_for_update(skip_locked=True)
            ).first()
            if delivery is None:
                s.rollback()
                return done
            job = s.get(Job, delivery.job_id)
            secret = s.scalar(select(Tenant.webhook_secret).where(Tenant.id == job.tenant_id))
            record = _attempt(delivery, job, secret, settings)
            delivery.attempts = [*delivery.attempts, record]
            now = utcnow()
            if record["error"] is None:
                delivery.status, delivery.finished_at = "delivered", now
            elif (now - delivery.created_at).total_seconds() >= settings.webhook_retry_seconds:
                delivery.status, delivery.finished_at = "failed", now
                log.warning("webhook for job %s gave up after %d attempts", job.id, len(delivery.attempts))
            else:
                backoff = min(MAX_BACKOFF_S, settings.webhook_backoff_seconds * 2 ** (len(delivery.attempts) - 1))
                delivery.next_attempt_at = now + timedelta(seconds=backoff)
                log.info("webhook for job %s: attempt %d failed (%s); next in %.0f s", job.id,
                         len(delivery.attempts), record["error"], backoff)
            s.commit()
            done += 1
    return done
