"""Webhooks: the URL checks (SSRF) and the signature as functions, then delivery through the
whole stack to a local receiver that fails twice before it accepts: three attempts, each
recorded on the job, each signed with the tenant's secret."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.errors import InvalidInput
from core.settings import Settings
from core.webhooks import check_url, sign, verify
from tests.test_api import assert_error
from tests.test_end_to_end import upload


def settings(**kw) -> Settings:
    return Settings(storage_url="file:///tmp/unused", **kw)


@pytest.mark.parametrize("url, reason", [
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
])
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


def test_the_signature_verifies_and_resists_tampering_and_replay():
    body = b'{"id": "job"}'
    now = int(time.time())
    header = sign("s3cret", body, now)
    assert verify("s3cret", body, header)
    assert not verify("s3cret", body + b" ", header)
    assert not verify("other", body, header)
    assert not verify("s3cret", body, sign("s3cret", body, now - 3600))  # too old: a replay


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
        job = client.post("/v1/jobs", json={"model_id": model["id"], "steps": ["export_onnx"],
                                            "webhook_url": receiver.url}).json()
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
        job = client.post("/v1/jobs", json={"model_id": model["id"], "preset": "gpu-fp16",
                                            "webhook_url": receiver.url}).json()
        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        done = wait_for_webhook(client, job["id"])
    finally:
        receiver.close()
    assert done["webhook"]["status"] == "delivered" and done["webhook"]["event"] == "job.cancelled"
    assert json.loads(receiver.requests[0]["body"])["status"] == "cancelled"
    for url in ("ftp://example.com/x", "http://169.254.169.254/latest/meta-data/"):
        assert_error(client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx", "webhook_url": url}),
                     422, "webhook_url_refused")
    rotated = client.post("/v1/tenant/webhook-secret").json()["webhook_secret"]
    assert rotated == client.get("/v1/tenant/webhook-secret").json()["webhook_secret"]
