"""Soak benchmark (not a test): many jobs from many clients while workers are killed and the
broker is restarted. Nothing may be lost or done twice.

    .venv/bin/python bench/soak.py                      # 1,000 jobs, 20 clients
    .venv/bin/python bench/soak.py --jobs 200 --clients 10 --kill-every 4

Starts a private stack: a new Postgres database on 127.0.0.1:5432, a private redis-server, moto's
S3 server, the API (`cvopt serve --no-worker`) and N worker processes (`cvopt worker`). Clients
submit jobs (a cheap recipe on a tiny model: a cached export_onnx, and in one job out of ten a
short benchmark in a step process) with an Idempotency-Key, retrying on connection errors, 5xx and
429 with the same key, and poll them until they end. Meanwhile
a chaos thread SIGKILLs one worker every few seconds and starts a new one in its place (as a
supervisor would), and SIGKILLs the broker once and starts it again empty. At the end it waits
for every job to end and counts:

- lost: a job the API accepted (202) that its client never saw end (within --drain-timeout);
- duplicated: more jobs in the database than distinct submissions, or a job with more than one
  artifact for its one producing step, or with a step measured twice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from load import free_port, tiny_onnx_model, wait_http

BIN = Path(sys.executable).parent
API_KEY = "cvopt_soak_" + uuid.uuid4().hex
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
TERMINAL = {"succeeded", "failed", "cancelled"}


class Soak:
    def __init__(self, tmp: Path, workers: int) -> None:
        self.tmp, self.n_workers = tmp, workers
        self.log = open(tmp / "soak.log", "wb")
        self.redis_port, self.s3_port, self.api_port = free_port(), free_port(), free_port()
        self.db = f"cvopt_soak_{uuid.uuid4().hex[:8]}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CVOPT_")}
        self.env.update(
            {
                "CVOPT_DATA_DIR": str(tmp / "data"),
                "CVOPT_BOOTSTRAP_API_KEY": API_KEY,
                "CVOPT_SECRET_KEY": "soak-" + "s" * 40,
                "CVOPT_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.db}",
                "CVOPT_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "CVOPT_STORAGE_URL": "s3://soak/cvopt",
                "CVOPT_S3_ENDPOINT_URL": f"http://127.0.0.1:{self.s3_port}",
                "AWS_ACCESS_KEY_ID": "soak",
                "AWS_SECRET_ACCESS_KEY": "soak",
                "AWS_DEFAULT_REGION": "us-east-1",
                # Fast failure detection: a killed worker's job is taken up again within seconds.
                "CVOPT_HEARTBEAT_SECONDS": "1",
                "CVOPT_STALE_AFTER_SECONDS": "6",
                "CVOPT_REAPER_INTERVAL_SECONDS": "2",
                "CVOPT_REQUEUE_AFTER_SECONDS": "15",
                "CVOPT_MAX_ATTEMPTS": "5",
                # The storm is the point here, not the tenant's quota.
                "CVOPT_QUOTA_CONCURRENT_JOBS": "0",
                "CVOPT_QUOTA_UPLOADS_PER_MINUTE": "0",
            }
        )
        self.redis: subprocess.Popen | None = None
        self.others: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        self.faults = {"workers_killed": 0, "broker_restarts": 0}

    # -- processes -------------------------------------------------------------------------------

    def start_redis(self) -> None:
        self.redis = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(100):
            if (
                subprocess.run(["redis-cli", "-p", str(self.redis_port), "ping"], capture_output=True).stdout.strip()
                == b"PONG"
            ):
                return
            time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def start_worker(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            [str(BIN / "cvopt"), "worker", "--queues", "cpu"],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(proc)
        return proc

    def start(self) -> str:
        import boto3
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        self.start_redis()
        self.others.append(
            subprocess.Popen(
                [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.s3_port)],
                env=self.env,
                stdout=self.log,
                stderr=subprocess.STDOUT,
            )
        )
        wait_http(f"http://127.0.0.1:{self.s3_port}/moto-api/")
        boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.s3_port}",
            aws_access_key_id="soak",
            aws_secret_access_key="soak",
            region_name="us-east-1",
        ).create_bucket(Bucket="soak")
        subprocess.run(
            [str(BIN / "cvopt"), "migrate"], env=self.env, check=True, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.others.append(
            subprocess.Popen(
                [str(BIN / "cvopt"), "serve", "--port", str(self.api_port), "--no-worker"],
                env=self.env,
                cwd=self.tmp,
                stdout=self.log,
                stderr=subprocess.STDOUT,
            )
        )
        for _ in range(self.n_workers):
            self.start_worker()
        base = f"http://127.0.0.1:{self.api_port}"
        wait_http(base + "/healthz")
        return base

    def stop(self) -> None:
        for proc in [*self.workers, *self.others, self.redis]:
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM) if proc in self.workers else proc.terminate()
                except ProcessLookupError:
                    pass
        for proc in [*self.workers, *self.others, self.redis]:
            if proc is None:
                continue
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')

    # -- chaos -----------------------------------------------------------------------------------

    def chaos(self, stop: threading.Event, kill_every: float, broker_at: float) -> None:
        rng = random.Random(7)
        started = time.monotonic()
        broker_done = False
        while not stop.wait(kill_every * rng.uniform(0.7, 1.3)):
            live = [w for w in self.workers if w.poll() is None]
            if live:
                victim = rng.choice(live)
                os.killpg(victim.pid, signal.SIGKILL)
                victim.wait()
                self.faults["workers_killed"] += 1
                self.start_worker()
            if not broker_done and time.monotonic() - started > broker_at:
                self.redis.kill()
                self.redis.wait()
                time.sleep(2)
                self.start_redis()  # empty: every message it held is gone
                self.faults["broker_restarts"] += 1
                broker_done = True


def run_clients(
    base: str,
    model_id: str,
    jobs: int,
    clients: int,
    drain_timeout: float,
    latencies: list[float],
    accepted: dict[str, str],
    states: dict[str, dict],
    errors: dict[str, int],
) -> None:
    """``clients`` threads, each a pipeline: it submits its share of ``jobs`` (each POST with an
    Idempotency-Key, retried with the same key on connection errors, 5xx and 429, honouring
    Retry-After), then polls its jobs until each has ended, as a pipeline waiting would. Every
    request's latency is kept. One job in ten also runs a short benchmark (a step process); the
    rest are a cached export, so the storm stays on the job service rather than on compute."""
    counter = iter(range(jobs))
    lock = threading.Lock()
    bench = {"name": "benchmark", "config": {"runs": 10, "warmup": 1, "max_seconds": 0.2, "batch_sizes": [1]}}

    def timed(client: httpx.Client, method: str, url: str, **kw) -> httpx.Response | None:
        t0 = time.perf_counter()
        try:
            resp = client.request(method, url, **kw)
        except httpx.HTTPError:
            with lock:
                errors["connection"] = errors.get("connection", 0) + 1
            return None
        finally:
            with lock:
                latencies.append((time.perf_counter() - t0) * 1000)
        if resp.status_code >= 500 or resp.status_code == 429:
            with lock:
                errors[str(resp.status_code)] = errors.get(str(resp.status_code), 0) + 1
        return resp

    def one_client(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[str] = []
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as client:
            while True:
                with lock:
                    n = next(counter, None)
                if n is None:
                    break
                key = f"soak-{n}"
                steps = ["export_onnx", bench] if n % 10 == 0 else ["export_onnx"]
                for _attempt in range(60):
                    resp = timed(
                        client,
                        "POST",
                        "/v1/jobs",
                        json={"model_id": model_id, "steps": steps, "name": key},
                        headers={"Idempotency-Key": key},
                    )
                    if resp is not None and resp.status_code == 202:
                        with lock:
                            accepted[key] = resp.json()["id"]
                        mine.append(resp.json()["id"])
                        break
                    wait = float(resp.headers.get("retry-after", 1)) if resp is not None else 0.5
                    time.sleep(min(wait, 5) * rng.uniform(0.5, 1.0))
            # Then wait for them in order, as a pipeline waits for its job: poll the oldest one
            # about once a second; when it has ended, look at the next at once.
            deadline = time.monotonic() + drain_timeout
            pending = list(mine)
            while pending and time.monotonic() < deadline:
                resp = timed(client, "GET", f"/v1/jobs/{pending[0]}")
                if resp is not None and resp.status_code == 200 and resp.json()["status"] in TERMINAL:
                    with lock:
                        states[pending[0]] = resp.json()
                    pending.pop(0)
                    continue
                time.sleep(rng.uniform(0.7, 1.3))

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def count(base: str, accepted: dict[str, str], states: dict[str, dict]) -> dict:
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    total_in_db = client.get("/v1/jobs", params={"limit": 1}).json()["count"]
    duplicated_results = 0
    for job_id, job in states.items():
        if job["status"] != "succeeded":
            continue
        artifacts = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
        measured = [len(s["metrics"].get("results", [])) for s in job["steps"] if s["name"] == "benchmark"]
        if len(artifacts) != 1 or any(m != 2 for m in measured):
            duplicated_results += 1
    failed = [j for j in states.values() if j["status"] == "failed"]
    return {
        "accepted": len(accepted),
        "in_database": total_in_db,
        "succeeded": sum(j["status"] == "succeeded" for j in states.values()),
        "failed": len(failed),
        "failure_reasons": sorted({f"{j['error']['code']}: {j['error']['message'][:80]}" for j in failed}),
        "lost": len(set(accepted.values()) - set(states)),
        "duplicated": max(0, total_in_db - 1 - len(accepted)) + duplicated_results,  # -1: the warm-up job
        "attempts_max": max((j["attempts"] for j in states.values()), default=0),
        "taken_up_again": sum(j["attempts"] > 1 for j in states.values()),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between worker kills")
    parser.add_argument("--broker-at", type=float, default=30.0, help="restart the broker after this many seconds")
    parser.add_argument("--drain-timeout", type=float, default=1800.0)
    args = parser.parse_args()

    # A SIGTERM (a timeout) still stops the workers and drops the database.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="cvopt-soak-"))
    soak = Soak(tmp, args.workers)
    try:
        base = soak.start()
        model_path = tmp / "tiny.onnx"
        tiny_onnx_model(model_path)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with open(model_path, "rb") as fh:
            model = httpx.post(
                base + "/v1/models", files={"file": ("tiny.onnx", fh)}, headers=headers, timeout=60
            ).json()
        # One job before the storm, so that the storm measures the service, not the first import.
        warm = httpx.post(
            base + "/v1/jobs", json={"model_id": model["id"], "steps": ["export_onnx"]}, headers=headers, timeout=60
        ).json()
        while httpx.get(f"{base}/v1/jobs/{warm['id']}", headers=headers).json()["status"] not in TERMINAL:
            time.sleep(0.5)

        latencies: list[float] = []
        accepted: dict[str, str] = {}
        states: dict[str, dict] = {}
        errors: dict[str, int] = {}
        stop = threading.Event()
        chaos = threading.Thread(target=soak.chaos, args=(stop, args.kill_every, args.broker_at), daemon=True)
        started = time.monotonic()
        chaos.start()
        # The storm lasts until the clients saw their last job end.
        run_clients(base, model["id"], args.jobs, args.clients, args.drain_timeout, latencies, accepted, states, errors)
        elapsed = time.monotonic() - started
        stop.set()
        chaos.join()
        result = count(base, accepted, states)
        lat = np.array(latencies)
        report = {
            "machine": f"{cpu_name()}, {os.cpu_count()} cores",
            "jobs": args.jobs,
            "clients": args.clients,
            "workers": args.workers,
            **soak.faults,
            **result,
            "total_s": round(elapsed, 1),
            "api_requests": len(latencies),
            "api_p50_ms": round(float(np.percentile(lat, 50)), 1),
            "api_p99_ms": round(float(np.percentile(lat, 99)), 1),
            "api_errors": errors,
        }
        print(json.dumps(report, indent=2))
        print()
        print(
            "| jobs submitted | succeeded | failed | lost | duplicated | workers killed | broker restarts "
            "| jobs taken up again | API requests | API p50 ms | API p99 ms | wall s |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(
            f"| {report['accepted']} | {report['succeeded']} | {report['failed']} | {report['lost']} "
            f"| {report['duplicated']} | {report['workers_killed']} | {report['broker_restarts']} "
            f"| {report['taken_up_again']} | {report['api_requests']} | {report['api_p50_ms']} "
            f"| {report['api_p99_ms']} | {report['total_s']} |"
        )
    finally:
        soak.stop()
        print(f"(logs in {tmp})", file=sys.stderr)


if __name__ == "__main__":
    main()
