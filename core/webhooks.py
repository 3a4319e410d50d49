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
private ranges; link-local and cloud metadata addresses are refused always). The URL is read by
httpx's own parser (what sends it) and a numeric host as resolvers read it (inet_aton: ``127.1``,
``2130706433``, ``0x7f000001`` and ``0177.0.0.1`` are all 127.0.0.1). Checked when the job is
submitted (422) and again before each attempt (DNS may have changed); a URL refused then ends its
delivery at once as ``refused``: policy does not change by waiting.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import logging
import re
import socket
import time
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.errors import InvalidInput
from core.models import Job, Tenant, WebhookDelivery, utcnow
from core.settings import Settings
from core.views import job_to_read

log = logging.getLogger("cvopt.webhooks")

SIGNATURE_HEADER = "Cvopt-Signature"
# Instance metadata services: never a webhook target, whatever the settings.
METADATA = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
    ipaddress.ip_address("100.100.100.200"),
}
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
    # As bytes: compare_digest refuses a str with non-ASCII characters.
    return hmac.compare_digest(
        sign(secret, body, timestamp).encode(), f"t={timestamp},v1={parts.get('v1', '')}".encode()
    )


# A part of a numeric IPv4 host as inet_aton reads it: hex, octal (leading 0) or decimal.
_INET_ATON_PART = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")
# NAT64's well-known prefix reaches the IPv4 address in its last 32 bits.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _inet_aton(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a resolver reads in ``host``, or None for a name: one to four parts, the
    last filling the bytes the others leave (``127.1`` is 127.0.0.1, ``2130706433`` too)."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_INET_ATON_PART.fullmatch(p) for p in parts):
        return None
    values = [int(p[2:] or "0", 16) if p[:2].lower() == "0x" else int(p, 8 if p.startswith("0") else 10) for p in parts]
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    return ipaddress.IPv4Address(sum(v << 8 * (3 - i) for i, v in enumerate(head)) + last)


def _ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host literal or a resolved address stands for; an IPv6 address that carries an
    IPv4 one (``::ffff:127.0.0.1``, NAT64) stands for that IPv4 address."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # no zone id: it names an interface
    except ValueError:
        return _inet_aton(text)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def _refused(address: ipaddress.IPv4Address | ipaddress.IPv6Address, settings: Settings) -> str | None:
    """Why ``address`` is not called, or None. Only the reasons CVOPT_WEBHOOK_ALLOW_PRIVATE lifts
    name it: a message must not point at a setting that would not help."""
    if address in METADATA:
        return "a cloud metadata address, which webhooks never call"
    if address.is_link_local:  # where metadata services answer (169.254.0.0/16, fe80::/10)
        return "a link-local address, which webhooks never call"
    if settings.webhook_allow_private:
        return None
    hint = "CVOPT_WEBHOOK_ALLOW_PRIVATE allows loopback and private receivers"
    if address.is_loopback:
        return f"a loopback address ({hint})"
    if not address.is_global or address.is_reserved or address.is_multicast or address.is_unspecified:
        return f"a private or reserved address ({hint})"
    return None


def check_url(url: str, settings: Settings, *, resolve: bool) -> None:
    """Raise InvalidInput (code ``webhook_url_refused``) for a URL the service must not call; with
    ``resolve``, code ``webhook_host_unresolved`` when DNS gives no answer (that may pass)."""

    def refuse(why: str, code: str = "webhook_url_refused") -> InvalidInput:
        return InvalidInput(
            f"webhook_url {url!r} is refused: {why}", code=code, details={"webhook_url": url, "reason": why}
        )

    try:
        parts = httpx.URL(url)  # the parser of the client that sends it: no gap between two parsers
    except httpx.InvalidURL as exc:  # "http://[::1", control characters, a bad IDNA name
        raise refuse(f"it is not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise refuse("only http and https URLs are called")
    if parts.port is not None and not 0 < parts.port < 65536:
        raise refuse(f"it is not a valid URL (port {parts.port})")
    # raw_host: the ASCII (IDNA) name httpx connects to; host: the same name as the user wrote it.
    host = parts.raw_host.decode("ascii").lower().rstrip(".")
    if not host:
        raise refuse("it names no host")
    if parts.userinfo:
        raise refuse("credentials in the URL are not allowed")
    allowed = [p.strip().lower() for p in settings.webhook_allowed_hosts.split(",") if p.strip()]
    names = {host, parts.host.lower().rstrip(".")}
    if allowed and not any(fnmatch.fnmatchcase(name, p) for name in names for p in allowed):
        raise refuse(f"its host is not in CVOPT_WEBHOOK_ALLOWED_HOSTS ({', '.join(allowed)})")
    literal = _ip_address(host)
    if literal is None and (host == "localhost" or host.endswith(".localhost")):
        literal = ipaddress.ip_address("127.0.0.1")
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [literal] if literal is not None else []
    if literal is None and resolve:
        try:
            infos = socket.getaddrinfo(
                host, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
            )
        except socket.gaierror as exc:
            raise refuse(f"its host does not resolve ({exc.strerror})", "webhook_host_unresolved") from exc
        for info in infos:
            address = _ip_address(str(info[4][0]))
            if address is None:  # getaddrinfo answers numeric addresses; anything else is not called
                raise refuse(f"its host resolves to {info[4][0]!r}, which is not an IP address")
            addresses.append(address)
    for address in addresses:
        if why := _refused(address, settings):
            shown = host if str(address) == host else f"{host} ({address})"
            raise refuse(f"{shown} is {why}")


def _attempt(delivery: WebhookDelivery, job: Job, secret: str, settings: Settings) -> tuple[dict[str, Any], bool]:
    """One attempt's record, and whether the URL was refused by policy (no retry can succeed)."""
    body = job_to_read(job).model_dump_json().encode()
    started = time.perf_counter()
    record: dict[str, Any] = {"at": utcnow().isoformat(), "status_code": None, "error": None}
    refused = False
    try:
        check_url(delivery.url, settings, resolve=True)
        timestamp = int(time.time())
        response = httpx.post(
            delivery.url,
            content=body,
            timeout=settings.webhook_timeout_seconds,
            follow_redirects=False,
            headers={
                "Content-Type": "application/json",
                "User-Agent": "cvopt-webhooks/1",
                "Cvopt-Event": delivery.event,
                "Cvopt-Delivery": delivery.id,
                SIGNATURE_HEADER: sign(secret, body, timestamp),
            },
        )
        record["status_code"] = response.status_code
        if not 200 <= response.status_code < 300:
            record["error"] = f"HTTP {response.status_code}"
    except InvalidInput as exc:
        record["error"] = exc.message
        refused = exc.code == "webhook_url_refused"
    except httpx.HTTPError as exc:
        record["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    record["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return record, refused


def _settle(delivery: WebhookDelivery, job_id: str, record: dict[str, Any], refused: bool, settings: Settings) -> None:
    """Record an attempt on its delivery: delivered, refused (no retry can succeed), given up once
    CVOPT_WEBHOOK_RETRY_SECONDS have passed, or due again after an exponential back-off."""
    delivery.attempts = [*delivery.attempts, record]
    now = utcnow()
    if record["error"] is None:
        delivery.status, delivery.finished_at = "delivered", now
    elif refused:
        delivery.status, delivery.finished_at = "refused", now
        log.warning("webhook for job %s refused: %s", job_id, record["error"])
    elif (now - delivery.created_at).total_seconds() >= settings.webhook_retry_seconds:
        delivery.status, delivery.finished_at = "failed", now
        log.warning("webhook for job %s gave up after %d attempts", job_id, len(delivery.attempts))
    else:
        backoff = min(MAX_BACKOFF_S, settings.webhook_backoff_seconds * 2 ** (len(delivery.attempts) - 1))
        delivery.next_attempt_at = now + timedelta(seconds=backoff)
        log.info(
            "webhook for job %s: attempt %d failed (%s); next in %.0f s",
            job_id,
            len(delivery.attempts),
            record["error"],
            backoff,
        )


def deliver_due(sessions: sessionmaker[Session], settings: Settings, *, limit: int = 20) -> int:
    """Make one attempt for each delivery that is due; returns how many were attempted."""
    done = 0
    for _ in range(limit):
        with sessions() as s:
            delivery = s.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= utcnow())
                .order_by(WebhookDelivery.next_attempt_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if delivery is None:
                s.rollback()
                return done
            job = s.get_one(Job, delivery.job_id)  # the delivery row goes with its job
            secret = s.execute(select(Tenant.webhook_secret).where(Tenant.id == job.tenant_id)).scalar_one()
            record, refused = _attempt(delivery, job, secret, settings)
            _settle(delivery, job.id, record, refused, settings)
            s.commit()
            done += 1
    return done
