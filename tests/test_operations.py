"""Operations on the real stack: /metrics in Prometheus format (jobs by state, step durations,
queue depth, workers, upload bytes, HTTP latency by route), and JSON logs in which every line
of the API and the worker parses, with the request id or the job id on the lines that belong to
one."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_end_to_end import upload

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def finished_job(stack, digit_assets):
    model = upload(stack.client, "/v1/models", digit_assets.models["onnx"])
    job = stack.client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"}).json()
    assert stack.wait_for_job(job["id"])["status"] == "succeeded"
    return job


def scrape(stack) -> dict[str, list]:
    text = httpx.get(stack.base_url + "/metrics").text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_cover_jobs_steps_queues_workers_uploads_and_http(stack, finished_job):
    stack.client.get(f"/v1/jobs/{finished_job['id']}")
    families = scrape(stack)
    jobs = {s.labels["state"]: s.value for s in families["cvopt_jobs"]}
    assert set(jobs) == {"queued", "running", "succeeded", "failed", "cancelled"} and jobs["succeeded"] >= 1
    steps = [s for s in families["cvopt_step_duration_seconds"] if s.labels.get("step") == "export_onnx"]
    counts = {s.labels["le"]: s.value for s in steps if s.name.endswith("_bucket")}
    total = next(s.value for s in steps if s.name.endswith("_count"))
    assert counts["+Inf"] == total >= 1 and sorted(counts.values()) == [
        counts[k] for k in sorted(counts, key=lambda le: float(le))
    ]  # cumulative buckets
    assert any(s.labels["queues"] == "cpu" and s.value < 60 for s in families["cvopt_worker_heartbeat_age_seconds"])
    assert families["cvopt_workers_alive"][0].value >= 1
    uploads = {s.labels["kind"]: s.value for s in families["cvopt_upload_bytes"] if s.name.endswith("_total")}
    assert uploads["model"] > 0
    assert "cvopt_queue_depth" in families and "cvopt_broker_queue_length" in families
    http = [
        s
        for s in families["cvopt_http_request_duration_seconds"]
        if s.name.endswith("_count") and s.labels["route"] == "/v1/jobs/{job_id}" and s.labels["status"] == "200"
    ]
    assert http and http[0].value >= 1
    # No raw ids in labels: routes are templates.
    assert not any(finished_job["id"] in str(s.labels) for f in families.values() for s in f)


def _json_lines(path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"{path.name}: a line that is not JSON: {line[:300]}")
    return parsed


def test_api_and_worker_logs_are_json_with_request_and_job_ids(stack, finished_job):
    rid = "test-" + uuid.uuid4().hex[:12]
    resp = stack.client.get(f"/v1/jobs/{finished_job['id']}", headers={"X-Request-ID": rid})
    assert resp.headers["x-request-id"] == rid
    generated = stack.client.get("/v1/jobs").headers["x-request-id"]
    assert len(generated) == 32
    api = _json_lines(stack.logs / "api.log")
    mine = [r for r in api if r.get("request_id") == rid]
    assert mine and mine[-1]["route"] == "/v1/jobs/{job_id}" and mine[-1]["status"] == 200
    assert {"ts", "level", "logger", "message"} <= set(mine[-1])
    worker = _json_lines(stack.logs / "worker.log")
    of_job = [r for r in worker if r.get("job_id") == finished_job["id"]]
    messages = " | ".join(r["message"] for r in of_job)
    assert "step 0 export_onnx started" in messages and "step 1 benchmark finished" in messages
    # The step process's own lines come through the worker, with the job's id too.
    assert any(r["logger"] == "cvopt.step" and "runs in process" in r["message"] for r in of_job), messages[:2000]
    assert any("(nice 10," in r["message"] for r in of_job)  # steps yield the CPU to the API
