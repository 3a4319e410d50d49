"""Faults on a private stack (its own Postgres database and Redis database, short timeouts):
a worker killed with SIGKILL in the middle of a step. The job is taken up again by the next
worker and finishes, with exactly one result recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from contextlib import contextmanager

import httpx
import pytest

from tests.conftest import (
    API_KEY,
    PG_ADMIN_URL,
    VENV_BIN,
    claim_redis_db,
    free_port,
    release_redis_db,
    stack_env,
    stop,
)
from tests.proxy import TcpProxy
from tests.test_end_to_end import upload

pytestmark = pytest.mark.integration


@contextmanager
def private_stack(tmp_path, s3_server, *, db_url: str | None = None, **env_extra: str):
    """API only (the tests start and kill workers themselves) on its own Postgres database and
    Redis database, with short timeouts. ``db_url`` reaches the new database another way (a
    proxy); env_extra overrides settings."""
    import psycopg

    from core.migrate import upgrade
    from tests.conftest import _running_stack

    name = f"cvopt_fault_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    direct = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    upgrade(direct)
    redis_url = claim_redis_db()
    settings = {
        "CVOPT_DATABASE_URL": (db_url or direct).replace("{db}", name),
        "CVOPT_BROKER_URL": redis_url,
        "CVOPT_STORAGE_URL": f"s3://{s3_server.bucket}/faults-{uuid.uuid4().hex[:6]}",
        "CVOPT_S3_ENDPOINT_URL": s3_server.endpoint,
        "CVOPT_STALE_AFTER_SECONDS": "6",
        "CVOPT_REAPER_INTERVAL_SECONDS": "1",
        **s3_server.env,
    }
    env = stack_env(tmp_path, **{**settings, **env_extra})
    try:
        yield from _running_stack(env, tmp_path, with_worker=False)
    finally:
        release_redis_db(redis_url)
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fault_stack(tmp_path, s3_server):
    with private_stack(tmp_path, s3_server) as stack:
        yield stack


def start_worker(stack, log_name: str, **env: str) -> subprocess.Popen:
    log = open(stack.logs / log_name, "wb")
    # Its own session, so that the kill takes the Celery pool child with it.
    return subprocess.Popen(
        [str(VENV_BIN / "cvopt"), "worker", "--queues", "cpu"],
        env={**stack.env, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@contextmanager
def workers_running(stack, *names: str, **env: str):
    procs = [start_worker(stack, f"{name}.log", **env) for name in names]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                stop(proc)


def wait_for_step(client, job_id: str, step: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/v1/jobs/{job_id}").json())["current_step"] != step:
        assert job["status"] in ("queued", "running"), job
        assert time.monotonic() < deadline, f"job {job_id} never reached step {step}: {job}"
        time.sleep(0.2)


def wait_for_log(stack, name: str, text: str, *, job_id: str, timeout: float = 120) -> None:
    """Until a JSON log line of that job contains ``text``."""
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in (stack.logs / name).read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("job_id") == job_id and text in record.get("message", ""):
                return
        time.sleep(0.3)
    raise AssertionError(f"no {text!r} in {name} for job {job_id} after {timeout} s")


def bench(seconds: float) -> dict:
    return {"name": "benchmark", "config": {"runs": 10_000, "max_seconds": seconds, "batch_sizes": [1]}}


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


# -- the broker ------------------------------------------------------------------------------------


def start_redis(port: int, tmp_path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.1)
    return proc


def test_a_restarted_broker_that_lost_its_queue_loses_no_job(tmp_path, s3_server, digit_assets):
    """A private redis-server is SIGKILLed with jobs waiting in it and restarted empty; jobs
    posted while it is down are accepted too. The reaper re-sends every job still queued in the
    database: all end succeeded, each with one result per step."""
    port = free_port()
    redis = start_redis(port, tmp_path)
    try:
        with (
            private_stack(
                tmp_path, s3_server, CVOPT_BROKER_URL=f"redis://127.0.0.1:{port}/0", CVOPT_REQUEUE_AFTER_SECONDS="4"
            ) as stack,
            workers_running(stack, "worker"),
        ):
            client = stack.client
            model = upload(client, "/v1/models", digit_assets.models["pt2"])
            steps = ["export_onnx", bench(1.5)]
            ids = [
                client.post("/v1/jobs", json={"model_id": model["id"], "steps": steps}).json()["id"] for _ in range(4)
            ]
            wait_for_step(client, ids[0], "benchmark")
            redis.kill()
            redis.wait()
            during = [client.post("/v1/jobs", json={"model_id": model["id"], "steps": steps}) for _ in range(2)]
            assert [r.status_code for r in during] == [202, 202]  # safe in the database; sent later
            ready = httpx.get(stack.base_url + "/readyz").json()
            assert ready["checks"]["broker"].startswith("error") and ready["checks"]["database"] == "ok"
            time.sleep(2)
            redis = start_redis(port, tmp_path)  # empty: the queue is gone
            ids += [r.json()["id"] for r in during]
            done = [stack.wait_for_job(job_id, timeout=240) for job_id in ids]
            assert [j["status"] for j in done] == ["succeeded"] * 6, [(j["id"], j["error"]) for j in done]
            for job in done:
                artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
                assert [a["step"] for a in artifacts] == ["export_onnx"]
            assert client.get("/v1/jobs", params={"status": "succeeded"}).json()["count"] == 6
    finally:
        redis.kill()
        redis.wait()


# -- object storage ------------------------------------------------------------------------------------


def test_storage_outages_are_ridden_out_or_fail_the_step_that_needed_storage(tmp_path, s3_server, digit_assets):
    """S3 behind a proxy that is cut: a short outage while a step's artifact is uploaded is
    retried and the job succeeds; an outage longer than CVOPT_STORAGE_RETRY_SECONDS fails the
    job at that step with the reason, and lists no artifact. Uploads to the API during the
    outage are 503 with Retry-After and store nothing."""
    from urllib.parse import urlparse

    target = urlparse(s3_server.endpoint)
    proxy = TcpProxy(target.hostname, target.port)
    proxy.up()
    try:
        with (
            private_stack(
                tmp_path,
                s3_server,
                CVOPT_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}",
                CVOPT_STORAGE_RETRY_SECONDS="20",
            ) as stack,
            workers_running(stack, "worker"),
        ):
            client = stack.client
            model = upload(client, "/v1/models", digit_assets.models["pt2"])
            steps = [bench(1), "export_onnx"]  # the model is fetched first; the upload comes after

            short = client.post("/v1/jobs", json={"model_id": model["id"], "steps": steps}).json()
            wait_for_step(client, short["id"], "benchmark")
            proxy.down()
            refused = client.post("/v1/models", files={"file": ("m.pt2", digit_assets.models["pt2"].read_bytes())})
            assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
            assert refused.json()["code"] == "storage_unavailable"
            # Up again only once the worker has met the outage (its retry is in its log), however
            # long the benchmark before it took on this machine.
            wait_for_log(stack, "worker.log", "storage failed while", job_id=short["id"])
            proxy.up()
            job = stack.wait_for_job(short["id"], timeout=120)
            assert job["status"] == "succeeded" and job["attempts"] == 1, (job["error"], job["log_tail"])
            # The outage was met (looking for a cached result or storing the artifact) and ridden out.
            assert "step export_onnx" in job["log_tail"] and "storage failed while" in job["log_tail"]
            artifacts = client.get(f"/v1/jobs/{short['id']}/artifacts").json()["data"]
            assert len(artifacts) == 1 and httpx.get(artifacts[0]["url"], timeout=30).status_code == 200

            long = client.post("/v1/jobs", json={"model_id": model["id"], "steps": steps}).json()
            wait_for_step(client, long["id"], "benchmark")
            proxy.down()
            job = stack.wait_for_job(long["id"], timeout=180)
            proxy.up()
            assert job["status"] == "failed"
            assert job["error"]["step"] == "export_onnx" and job["error"]["code"] == "storage_unavailable"
            assert job["error"]["message"].startswith("storage failed while")
            assert "step export_onnx" in job["error"]["message"]
            assert [s["status"] for s in job["steps"]] == ["succeeded", "failed"]
            assert client.get(f"/v1/jobs/{long['id']}/artifacts").json()["count"] == 0
            assert client.get("/v1/models").json()["count"] == 1  # the refused upload left no row
    finally:
        proxy.down()


# -- the database ----------------------------------------------------------------------------------


def test_a_database_outage_is_503_with_retry_after_and_a_running_job_rides_it_out(tmp_path, s3_server, digit_assets):
    """Postgres behind a proxy that is cut for a few seconds while a job runs: the API answers
    503 with Retry-After and /readyz names the database; when it is back the API recovers by
    itself and the job finishes on its first attempt."""
    from urllib.parse import urlparse

    pg = urlparse(PG_ADMIN_URL)
    proxy = TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432)
    proxy.up()
    via_proxy = f"postgresql+psycopg://{pg.username or 'postgres'}@127.0.0.1:{proxy.port}/{{db}}"
    try:
        with (
            private_stack(tmp_path, s3_server, db_url=via_proxy, CVOPT_STALE_AFTER_SECONDS="60") as stack,
            workers_running(stack, "worker"),
        ):
            client = stack.client
            model = upload(client, "/v1/models", digit_assets.models["pt2"])
            job = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [bench(2), "export_onnx"]}).json()
            wait_for_step(client, job["id"], "benchmark")
            proxy.down()
            down = client.get(f"/v1/jobs/{job['id']}")
            assert down.status_code == 503 and down.headers["retry-after"] == "5", down.text
            assert down.json()["code"] == "database_unavailable"
            ready = httpx.get(stack.base_url + "/readyz", timeout=30)
            assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("error")
            # The step ends meanwhile and its result waits for the database: up again only once the
            # worker says it is waiting, however long the step took on this machine.
            wait_for_log(stack, "worker.log", "database unavailable while", job_id=job["id"])
            proxy.up()
            deadline = time.monotonic() + 30
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the API did not recover"
                time.sleep(0.5)
            done = stack.wait_for_job(job["id"], timeout=120)
            assert done["status"] == "succeeded" and done["attempts"] == 1, (done["error"], done["log_tail"])
            assert [s["status"] for s in done["steps"]] == ["succeeded", "succeeded"]
            assert "database unavailable while" in done["log_tail"]  # the runner waited for it
            assert client.get(f"/v1/jobs/{job['id']}/artifacts").json()["count"] == 1
    finally:
        proxy.down()


# -- untrusted models against the step limits ----------------------------------------------------------


def test_models_that_blow_up_memory_or_hang_fail_their_job_and_the_worker_goes_on(tmp_path, s3_server, digit_assets):
    """Through the whole service: the memory bomb ends "out of memory at step benchmark", the
    endless loop "step benchmark exceeded 8 s", and the same worker process then runs a normal
    job to success."""
    from tests.hostile_models import endless_loop, memory_bomb

    with (
        private_stack(tmp_path, s3_server) as stack,
        workers_running(
            stack,
            "worker",
            CVOPT_STEP_MEMORY_LIMIT_MB="3072",
            CVOPT_STEP_TIMEOUT_SECONDS="8",
        ) as (worker,),
    ):
        client = stack.client
        bomb = upload(client, "/v1/models", memory_bomb(tmp_path / "bomb.onnx"))
        loop = upload(client, "/v1/models", endless_loop(tmp_path / "loop.onnx"))
        good = upload(client, "/v1/models", digit_assets.models["onnx"])
        ids = [
            client.post("/v1/jobs", json={"model_id": m["id"], "steps": ["benchmark"]}).json()["id"]
            for m in (bomb, loop, good)
        ]
        bombed, hung, fine = (stack.wait_for_job(job_id, timeout=180) for job_id in ids)
        assert bombed["status"] == "failed" and bombed["error"]["code"] == "out_of_memory"
        assert bombed["error"]["message"].startswith("out of memory at step benchmark"), bombed["error"]
        assert hung["status"] == "failed" and hung["error"]["code"] == "step_timeout"
        assert hung["error"]["message"].startswith("step benchmark exceeded 8 s"), hung["error"]
        assert fine["status"] == "succeeded", fine["error"]
        assert worker.poll() is None  # the same worker process throughout
        assert {j["attempts"] for j in (bombed, hung, fine)} == {1}
