"""Processes and jobs across stops, kills and restarts: `cvopt serve` takes its worker with it
however it ends; a worker's death puts its job back in the queue within a few heartbeats; jobs of a
queue start in the order they were submitted; a job that waits for a missing GPU worker names the
step that needs it."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from datetime import timedelta

import psycopg
import pytest

from core.models import Job, JobStatus, JobStep, StepStatus, Worker, new_id, utcnow
from core.queue import make_celery
from tests.conftest import (
    PROCESS_TAG_ENV,
    VENV_BIN,
    assert_all_gone,
    free_port,
    stack_env,
    stop,
    tagged_processes,
    wait_for_http,
)
from tests.test_end_to_end import upload
from tests.test_faults import bench, private_stack, start_worker, wait_for_step
from tests.test_runner_db import (  # noqa: F401 (fixtures)
    broker,
    broker_url,
    engine,
    make_job,
    queued_ids,
    sessions,
    settings_for,
)
from worker.runner import reap_stale_jobs

pytestmark = pytest.mark.integration


# -- cvopt serve and its worker ----------------------------------------------------------------------


def _embedded_worker_is_up(tag: str) -> bool:
    """Celery's main and pool processes are there, and the pool's spare step process."""
    commands = list(tagged_processes(tag).values())
    return sum("cvopt.cli worker" in c for c in commands) >= 2 and any("worker.step_process" in c for c in commands)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["sigterm", "sigint", "sigkill"])
def test_cvopt_serve_takes_its_worker_and_step_processes_with_it(sig, tmp_path):
    env = stack_env(tmp_path)
    env.pop("CVOPT_SECRET_KEY")
    tag = env[PROCESS_TAG_ENV]
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        serve = subprocess.Popen(
            [str(VENV_BIN / "cvopt"), "serve", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout=90, proc=serve)
        deadline = time.monotonic() + 120
        while not _embedded_worker_is_up(tag):
            assert time.monotonic() < deadline, f"the embedded worker did not come up: {tagged_processes(tag)}"
            time.sleep(0.3)

        os.kill(serve.pid, sig)  # the serve process only, as docker stop, systemd and the OOM killer do
        code = serve.wait(timeout=60)
        assert_all_gone(tag, timeout=20)
        if sig != signal.SIGKILL:  # serve stopped by its own hand, after a warm shutdown of its worker
            assert code == 128 + sig
            with sqlite3.connect(tmp_path / "data" / "cvopt.db") as db:
                assert db.execute("SELECT count(*) FROM workers").fetchone() == (0,)  # it said goodbye
    finally:
        stop(serve)
        assert_all_gone(tag)


# -- the reaper ------------------------------------------------------------------------------------


def _alive(session, *queues: str) -> None:
    session.add(Worker(id=f"test:{new_id()}", hostname="test", queues=list(queues), gpu=None))
    session.commit()


def test_a_gpu_job_without_a_gpu_worker_fails_naming_the_gpu_step(sessions, broker):
    url, _ = broker
    settings = settings_for(url, no_worker_timeout_seconds=600)
    with sessions() as s:
        _alive(s, "cpu")
        job = make_job(
            s,
            status=JobStatus.queued,
            queue="gpu",
            enqueued_age=700,
            steps=[
                JobStep(index=0, name="export_onnx", config={}, queue="cpu", status=StepStatus.pending, metrics={}),
                JobStep(index=1, name="build_tensorrt", config={}, queue="gpu", status=StepStatus.pending, metrics={}),
            ],
        )
    reap_stale_jobs(settings=settings, sessions=sessions, celery=make_celery(settings))
    with sessions() as s:
        failed = s.get(Job, job.id)
        assert failed.status == JobStatus.failed and failed.error_code == "no_worker"
        assert failed.error_step == "build_tensorrt"
        assert [st.status for st in failed.steps] == [StepStatus.skipped, StepStatus.skipped]


def test_the_reaper_sends_jobs_again_in_submission_order(sessions, broker):
    url, client = broker
    settings = settings_for(url)
    now = utcnow()
    with sessions() as s:
        _alive(s, "cpu")
        # Written youngest first, so that the table's own order is not the submission order.
        jobs = [make_job(s, status=JobStatus.queued, enqueued_age=3600) for _ in range(3)]
        for age, job in zip((60, 120, 180), jobs, strict=True):
            job.created_at = now - timedelta(seconds=age)
        s.commit()
    reap_stale_jobs(settings=settings, sessions=sessions, celery=make_celery(settings))
    consumed_first = list(reversed(queued_ids(client)))  # pushed on the left, taken from the right
    assert consumed_first == [repr([job.id]) for job in reversed(jobs)]


def test_a_job_whose_worker_stopped_beating_is_requeued_before_it_goes_stale(sessions, broker):
    url, client = broker
    settings = settings_for(url, worker_lost_after_seconds=15)  # stale_after_seconds: 60
    now = utcnow()
    with sessions() as s:
        s.add_all(
            [
                Worker(id="box:1:dead", hostname="box", queues=["cpu"], last_seen_at=now - timedelta(seconds=40)),
                Worker(id="box:2:alive", hostname="box", queues=["cpu"], last_seen_at=now),
            ]
        )
        s.commit()

        def running(worker: str, heartbeat_age: float) -> Job:
            job = make_job(s, status=JobStatus.running, heartbeat_age=heartbeat_age, attempts=1)
            job.worker = worker
            s.commit()
            return job

        died = running("box:1:dead", 20)  # its worker's row went silent with it
        stopped = running("box:3:stopped", 20)  # its worker deleted its row on the way out
        slow = running("box:2:alive", 20)  # a late heartbeat, but its worker is beating: left alone
        recent = running("box:3:stopped", 5)  # beat moments ago: not yet
    counts = reap_stale_jobs(settings=settings, sessions=sessions, celery=make_celery(settings))
    assert counts == {"requeued": 2, "failed": 0}
    with sessions() as s:
        assert s.get(Job, died.id).status == JobStatus.queued
        assert s.get(Job, stopped.id).status == JobStatus.queued
        assert s.get(Job, slow.id).status == JobStatus.running
        assert s.get(Job, recent.id).status == JobStatus.running
    assert sorted(queued_ids(client)) == sorted([repr([died.id]), repr([stopped.id])])


# -- a real worker, killed and replaced --------------------------------------------------------------


def test_jobs_start_in_submission_order_and_a_killed_workers_job_comes_back_within_seconds(
    tmp_path, s3_server, digit_assets
):
    """One worker (concurrency 1) runs a long job while four more are submitted; it is SIGKILLed and
    another takes over: the queued jobs start in the order they were submitted, and the killed
    worker's job is queued again a few heartbeats after the kill, not after stale_after_seconds."""
    with private_stack(
        tmp_path,
        s3_server,
        CVOPT_STALE_AFTER_SECONDS="600",
        CVOPT_WORKER_LOST_AFTER_SECONDS="5",
        CVOPT_REQUEUE_AFTER_SECONDS="900",
    ) as stack:
        client = stack.client
        model = upload(client, "/v1/models", digit_assets.models["onnx"])

        def submit(step: dict) -> str:
            resp = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [step]})
            assert resp.status_code == 202, resp.text
            return resp.json()["id"]

        first = start_worker(stack, "worker-1.log")
        second = None
        try:
            long_job = {"name": "benchmark", "config": {"runs": 10_000, "max_seconds": 20, "batch_sizes": [1, 1024]}}
            ids = [submit(long_job)]
            wait_for_step(client, ids[0], "benchmark")
            ids += [submit(bench(0.5)) for _ in range(4)]
            with psycopg.connect(stack.env["CVOPT_DATABASE_URL"].replace("+psycopg", "")) as conn:
                (worker_of_job,) = conn.execute("SELECT worker FROM jobs WHERE id = %s", (ids[0],)).fetchone()
            # The job names the worker row whose heartbeat tells whether that worker still runs.
            assert worker_of_job in [w["id"] for w in client.get("/v1/workers").json()["data"]]

            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
            killed_at = time.monotonic()
            assert client.get(f"/v1/jobs/{ids[0]}").json()["status"] == "running"
            second = start_worker(stack, "worker-2.log")
            while (job := client.get(f"/v1/jobs/{ids[0]}").json())["status"] == "running" and job["attempts"] < 2:
                assert time.monotonic() - killed_at < 120, "the killed worker's job was not re-queued"
                time.sleep(0.3)
            assert client.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 200  # its second run proves nothing new
            done = [stack.wait_for_job(job_id, timeout=240) for job_id in ids]
        finally:
            for proc in (first, second):
                if proc is not None:
                    stop(proc)
    assert done[0]["status"] == "cancelled"
    assert [j["status"] for j in done[1:]] == ["succeeded"] * 4, [(j["id"], j["error"]) for j in done]
    created = [j["id"] for j in sorted(done, key=lambda j: j["created_at"])]
    started = [j["id"] for j in sorted(done, key=lambda j: j["started_at"])]
    assert started == created == ids
