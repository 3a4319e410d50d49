"""Webhooks: the URL checks (SSRF) and the signature as functions, then delivery through the
whole stack to a local receiver that fails twice before it accepts: three attempts, each
recorded on the job, each signed with the tenant's secret."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from sqlalchemy.orm import sessionmaker

from core.db import make_engine
from core.errors import InvalidInput
from core.models import Base, Job, JobStatus, Model, Tenant, WebhookDelivery, new_id
from core.schemas import WebhookRead
from core.settings import Settings
from core.views import delivery_to_read
from core.webhooks import check_url, deliver_due, sign, verify
from tests.test_api import assert_error
from tests.test_end_to_end import upload


def settings(**kw) -> Settings:
    return Settings(storage_url="file:///tmp/unused", **kw)


@pytest.mark.parametrize(
    "url, reason",
    [
        ("ftp://example.com/hook", "only http and https"),
        ("http://user:pw@example.com/hook", "credentials"),
        ("http://127.0.0.1:8000/hook", "loopback"),
        ("http://localhost/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http:///nohost", "no host"),
        ("http://[::1/hook", "not a valid URL"),
        ("http://example.com:99999/hook", "not a valid URL"),
    ],
)
def test_webhook_urls_the_service_must_not_call_are_refused(url, reason):
    with pytest.raises(InvalidInput) as refused:
        check_url(url, settings(), resolve=False)
    assert refused.value.code == "webhook_url_refused" and reason in refused.value.message


def test_private_receivers_only_when_allowed_and_metadata_never():
    check_url("http://127.0.0.1:9/hook", settings(webhook_allow_private=True), resolve=False)
    with pytest.raises(InvalidInput, match="metadata"):
        check_url("http://169.254.169.254/", settings(webhook_allow_private=True), resolve=False)
    allow = settings(webhook_allowed_hosts="hooks.example.com, *.ci.example.org")
    check_url("https://hooks.example.com/x", allow, resolve=False)
    check_url("https://build.ci.example.org/x", allow, resolve=False)
    with pytest.raises(InvalidInput, match="ALLOWED_HOSTS"):
        check_url("https://evil.example.net/x", allow, resolve=False)
    check_url("https://93.184.216.34/x", settings(), resolve=False)  # a public address


@pytest.mark.parametrize(
    "url",
    [
        "http://127.1/x",
        "http://127.0.1/x",
        "http://2130706433/x",
        "http://0x7f000001/x",
        "http://0x7f.1/x",
        "http://0177.0.0.1/x",
        "http://017700000001/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://[::ffff:7f00:1]/x",
        "http://localhost./x",
        "http://0/x",
        "http://10.1/x",
        "http://0xa.0x1.0x2.0x3/x",
    ],
)
def test_every_spelling_of_a_private_address_is_refused_at_submission(url):
    # Resolvers read a numeric host with inet_aton: all of these are 127.0.0.1, 0.0.0.0 or 10.x.
    with pytest.raises(InvalidInput) as refused:
        check_url(url, settings(), resolve=False)
    assert refused.value.code == "webhook_url_refused"


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://0xa9fea9fe/",
        "http://2852039166/",
        "http://169.254.43518/",
        "http://[::ffff:169.254.169.254]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[fd00:ec2::254]/",
        "http://100.100.100.200/",
        "http://169.254.1.1/",
        "http://[fe80::1]/",
    ],
)
def test_metadata_and_link_local_addresses_are_refused_whatever_the_settings(url):
    for allow_private in (False, True):
        with pytest.raises(InvalidInput) as refused:
            check_url(url, settings(webhook_allow_private=allow_private), resolve=False)
        # No hint at a setting: none allows these.
        assert "never call" in refused.value.message and "CVOPT_" not in refused.value.message


def test_numeric_spellings_of_a_public_address_and_numeric_looking_names_pass():
    check_url("http://0x5db8d822/x", settings(), resolve=False)  # 93.184.216.34
    check_url("http://1password.example.com/x", settings(), resolve=False)
    check_url("http://0x.example.com/x", settings(), resolve=False)
    with pytest.raises(InvalidInput, match=r"127\.0\.0\.1"):  # the refusal says which address it read
        check_url("http://2130706433/x", settings(), resolve=False)


def test_the_signature_verifies_and_resists_tampering_and_replay():
    body = b'{"id": "job"}'
    now = int(time.time())
    header = sign("s3cret", body, now)
    assert verify("s3cret", body, header)
    assert not verify("s3cret", body + b" ", header)
    assert not verify("other", body, header)
    assert not verify("s3cret", body, sign("s3cret", body, now - 3600))  # too old: a replay
    assert not verify("s3cret", body, header.replace("v1=", "v1=\u00e9"))  # non-ASCII: False, not a TypeError


class Receiver:
    """A local HTTP server that answers 500 to the first ``fail_first`` requests, then 200."""

    def __init__(self, fail_first: int) -> None:
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"headers": dict(self.headers), "body": body})
                code = 500 if len(outer.requests) <= fail_first else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/cvopt-hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def wait_for_webhook(client, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["webhook"] and job["webhook"]["status"] != "pending":
            return job
        time.sleep(0.3)
    raise TimeoutError(f"webhook of job {job_id} still pending: {job['webhook']}")


@pytest.mark.integration
def test_a_job_webhook_is_signed_retried_and_every_attempt_recorded(stack, digit_assets):
    client = stack.client
    secret = client.get("/v1/tenant/webhook-secret").json()["webhook_secret"]
    receiver = Receiver(fail_first=2)
    try:
        model = upload(client, "/v1/models", digit_assets.models["onnx"])
        job = client.post(
            "/v1/jobs", json={"model_id": model["id"], "steps": ["export_onnx"], "webhook_url": receiver.url}
        ).json()
        assert job["webhook_url"] == receiver.url and job["webhook"] is None
        assert stack.wait_for_job(job["id"])["status"] == "succeeded"
        done = wait_for_webhook(client, job["id"])
    finally:
        receiver.close()
    hook = done["webhook"]
    assert hook["status"] == "delivered" and hook["event"] == "job.succeeded"
    assert [a["status_code"] for a in hook["attempts"]] == [500, 500, 200]
    assert [a["error"] for a in hook["attempts"]] == ["HTTP 500", "HTTP 500", None]
    assert len(receiver.requests) == 3
    for request in receiver.requests:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert verify(secret, request["body"], headers["cvopt-signature"])
        assert headers["cvopt-event"] == "job.succeeded" and headers["content-type"] == "application/json"
        sent = json.loads(request["body"])
        assert sent["id"] == job["id"] and sent["status"] == "succeeded" and sent["steps"][0]["status"] == "succeeded"
    # Back-off: the attempts are spread out, not fired at once.
    times = [a["at"] for a in hook["attempts"]]
    assert times == sorted(times) and len(set(times)) == 3


@pytest.mark.integration
def test_a_cancelled_job_sends_its_webhook_and_bad_urls_are_422(stack, digit_assets):
    client = stack.client
    receiver = Receiver(fail_first=0)
    try:
        model = upload(client, "/v1/models", digit_assets.models["pt2"])
        # No GPU worker here: the job waits queued, and the API itself ends it.
        job = client.post(
            "/v1/jobs", json={"model_id": model["id"], "preset": "gpu-fp16", "webhook_url": receiver.url}
        ).json()
        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        done = wait_for_webhook(client, job["id"])
    finally:
        receiver.close()
    assert done["webhook"]["status"] == "delivered" and done["webhook"]["event"] == "job.cancelled"
    assert json.loads(receiver.requests[0]["body"])["status"] == "cancelled"
    for url in ("ftp://example.com/x", "http://169.254.169.254/latest/meta-data/"):
        assert_error(
            client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx", "webhook_url": url}),
            422,
            "webhook_url_refused",
        )
    rotated = client.post("/v1/tenant/webhook-secret").json()["webhook_secret"]
    assert rotated == client.get("/v1/tenant/webhook-secret").json()["webhook_secret"]


@pytest.fixture
def sessions(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'cvopt.db'}")
    Base.metadata.create_all(engine)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


def ended_job(sessions, webhook_url: str) -> str:
    """A succeeded job that asked for ``webhook_url``: ending it schedules its delivery."""
    with sessions() as s:
        tenant = Tenant(name=f"t-{new_id()}")
        s.add(tenant)
        s.flush()
        model = Model(
            id=new_id(),
            tenant_id=tenant.id,
            name="m",
            filename="m.onnx",
            format="onnx",
            sha256="0" * 64,
            size_bytes=1,
            storage_key="models/x/m.onnx",
            inputs=[],
            outputs=[],
        )
        job = Job(
            id=new_id(),
            tenant_id=tenant.id,
            status=JobStatus.running,
            model_id=model.id,
            queue="cpu",
            input_spec=[],
            preprocessing={},
            webhook_url=webhook_url,
            steps=[],
        )
        s.add_all([model, job])
        s.commit()
        job.status = JobStatus.succeeded
        s.commit()
        return job.id


def delivery_of(sessions, job_id: str) -> WebhookDelivery:
    with sessions() as s:
        return s.query(WebhookDelivery).filter_by(job_id=job_id).one()


def test_a_url_refused_at_delivery_ends_at_once_as_refused_and_dns_failures_are_retried(sessions, monkeypatch):
    """Policy does not change by waiting: a refused URL (DNS now points it at loopback or at the
    metadata service, or a spelling accepted before the checks knew it) is one attempt, status
    ``refused``; a host that does not resolve may later, so it stays pending."""
    answers = {"rebound.example.com": "127.0.0.1", "meta.example.com": "169.254.169.254"}

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]

    def no_request(*args, **kwargs):
        raise AssertionError("a refused URL must not be called")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(httpx, "post", no_request)
    urls = (
        "http://rebound.example.com/x",
        "http://meta.example.com/x",
        "http://0x7f000001/x",
        "http://down.example.com/x",
    )
    jobs = {url: ended_job(sessions, url) for url in urls}

    assert deliver_due(sessions, settings()) == 4
    assert deliver_due(sessions, settings()) == 0  # nothing due again: the refused are done, the other waits
    for url in list(jobs)[:3]:
        delivery = delivery_of(sessions, jobs[url])
        assert delivery.status == "refused" and delivery.finished_at is not None, url
        [attempt] = delivery.attempts
        # Recorded as every attempt is: when, no status code, why, how long.
        assert set(attempt) == {"at", "status_code", "error", "duration_ms"} and attempt["status_code"] is None
        assert "is refused" in attempt["error"]
        read = WebhookRead.model_validate(delivery_to_read(delivery))
        assert read.status == "refused" and read.next_attempt_at is None
    assert "metadata" in delivery_of(sessions, jobs["http://meta.example.com/x"]).attempts[0]["error"]
    unresolved = delivery_of(sessions, jobs["http://down.example.com/x"])
    assert unresolved.status == "pending" and unresolved.finished_at is None
    assert "does not resolve" in unresolved.attempts[0]["error"]


def test_allowing_private_receivers_never_allows_the_metadata_service_at_delivery(sessions, monkeypatch):
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, port, *a, **kw: [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::ffff:169.254.169.254", port, 0, 0))
        ],
    )
    monkeypatch.setattr(httpx, "post", lambda *a, **kw: pytest.fail("the metadata service was called"))
    job_id = ended_job(sessions, "http://hooks.example.com/x")
    assert deliver_due(sessions, settings(webhook_allow_private=True)) == 1
    delivery = delivery_of(sessions, job_id)
    assert delivery.status == "refused"
    assert "metadata" in delivery.attempts[0]["error"] and "CVOPT_" not in delivery.attempts[0]["error"]
