"""Faults on a private stack (its own Postgres database and Redis database, short timeouts):
a worker killed with SIGKILL in the middle of a step. The job is taken up again by the next
worker and finishes, with exactly one result recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import httpx
import pytest

from tests.conftest import (
    API_KEY,
    PG_ADMIN_URL,
    VENV_BIN,
    claim_redis_db,
    release_redis_db,
    stack_env,
    stop,
)
from tests.test_end_to_end import upload

pytestmark = pytest.mark.integration


@pytest.fixture
def fault_stack(tmp_path, s3_server):
    import psycopg

    from core.migrate import upgrade
    from tests.conftest import _running_stack

    name = f"cvopt_fault_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    upgrade(db_url)
    redis_url = claim_redis_db()
    env = stack_env(
        tmp_path, CVOPT_DATABASE_URL=db_url, CVOPT_BROKER_URL=redis_url,
        CVOPT_STORAGE_URL=f"s3://{s3_server.bucket}/faults-{uuid.uuid4().hex[:6]}",
        CVOPT_S3_ENDPOINT_URL=s3_server.endpoint, CVOPT_STALE_AFTER_SECONDS="6",
        CVOPT_REAPER_INTERVAL_SECONDS="1", **s3_server.env,
    )
    try:
        yield from _running_stack(env, tmp_path, with_worker=False)
    finally:
        release_redis_db(redis_url)
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_worker(stack, log_name: str) -> subprocess.Popen:
    log = open(stack.logs / log_name, "wb")
    # Its own session, so that the kill takes the Celery pool child with it.
    return subprocess.Popen([str(VENV_BIN / "cvopt"), "worker", "--queues", "cpu"], env=stack.env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_a_worker_killed_mid_step_loses_no_job_and_records_one_result(fault_stack, digit_assets):
    client = fault_stack.client
    assert client.headers["authorization"] == f"Bearer {API_KEY}"
    model = upload(client, "/v1/models", digit_assets.models["pt2"])
    steps = ["export_onnx", {"name": "benchmark", "config": {"runs": 10_000, "max_seconds": 8, "batch_sizes": [1]}}]
    job = client.post("/v1/jobs", json={"model_id": model["id"], "steps": steps}).json()
    first = start_worker(fault_stack, "worker-1.log")
    second = None
    try:
        deadline = time.monotonic() + 120
        while client.get(f"/v1/jobs/{job['id']}").json()["current_step"] != "benchmark":
            assert time.monotonic() < deadline, "the job never reached its benchmark step"
            time.sleep(0.2)
        time.sleep(1.0)
        os.killpg(first.pid, signal.SIGKILL)  # no goodbye: no ack, no status update
        first.wait()
        running = client.get(f"/v1/jobs/{job['id']}").json()
        assert running["status"] == "running" and running["attempts"] == 1
        second = start_worker(fault_stack, "worker-2.log")
        done = fault_stack.wait_for_job(job["id"], timeout=180)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                stop(proc)
    assert done["status"] == "succeeded", (done["error"], done["log_tail"])
    assert done["attempts"] == 2  # taken up again once, by the second worker
    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    assert [a["step"] for a in artifacts] == ["export_onnx"]  # exactly one result per step
    assert httpx.get(artifacts[0]["url"], timeout=30).status_code == 200
    # The benchmark the killed worker was running was run again in full, once.
    bench = done["steps"][1]["metrics"]["results"]
    assert sorted(r["artifact"] for r in bench) == sorted([model["name"], artifacts[0]["name"]])
