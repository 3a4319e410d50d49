"""Load benchmark for the job service (not a test).

Starts the service in each mode asked for, drives it with N concurrent clients that submit jobs,
poll them and list them (the mix a pipeline fleet makes), and prints p50/p99 latency, requests/s
per endpoint and the API process's CPU time per request. Then uploads one large file while
sampling the API process's resident memory (--upload-mb 0 skips it).

    .venv/bin/python bench/load.py                        # embedded, then distributed (worker on)
    .venv/bin/python bench/load.py --mode distributed --no-worker
    .venv/bin/python bench/load.py --think-ms 1000 --duration 60 --upload-mb 0   # the README's table

embedded is `cvopt serve` alone (SQLite, local storage, its own worker); distributed uses the
machine's Postgres (127.0.0.1:5432) and Redis (127.0.0.1:6379, db 13), a moto S3 server and a
separate `cvopt worker`. Each mode starts everything in a temp dir and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

BIN = Path(sys.executable).parent
API_KEY = "cvopt_bench_" + uuid.uuid4().hex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


def tiny_onnx_model(path: Path) -> None:
    """A small conv net built with onnx.helper (no torch needed)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)


class Stack:
    def __init__(self, mode: str, tmp: Path, api_workers: int, with_worker: bool) -> None:
        self.with_worker = with_worker
        self.mode, self.tmp = mode, tmp
        self.procs: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CVOPT_")}
        # The quota would turn the backlog of submitted jobs into 429s; this measures latency.
        self.env.update(
            {
                "CVOPT_DATA_DIR": str(tmp / "data"),
                "CVOPT_BOOTSTRAP_API_KEY": API_KEY,
                "CVOPT_QUOTA_CONCURRENT_JOBS": "0",
            }
        )
        self.port = free_port()
        self.api_workers = api_workers
        self.db_name = None

    def start(self) -> str:
        log = open(self.tmp / "service.log", "wb")
        cmd = [str(BIN / "cvopt"), "serve", "--port", str(self.port), "--workers", str(self.api_workers)]
        if self.mode == "distributed":
            import boto3
            import psycopg

            self.db_name = f"cvopt_bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as c:
                c.execute(f'CREATE DATABASE "{self.db_name}"')
            s3_port = free_port()
            s3_env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
            self.env.update(s3_env)
            self.procs.append(
                subprocess.Popen(
                    [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            endpoint = f"http://127.0.0.1:{s3_port}"
            wait_http(endpoint + "/moto-api/")
            boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id="bench",
                aws_secret_access_key="bench",
                region_name="us-east-1",
            ).create_bucket(Bucket="bench")
            self.env.update(
                {
                    "CVOPT_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.db_name}",
                    "CVOPT_BROKER_URL": "redis://127.0.0.1:6379/13",
                    "CVOPT_STORAGE_URL": "s3://bench/cvopt",
                    "CVOPT_S3_ENDPOINT_URL": endpoint,
                    "CVOPT_SECRET_KEY": "bench-" + "s" * 40,
                }
            )
            subprocess.run(
                [str(BIN / "cvopt"), "migrate"], env=self.env, check=True, stdout=log, stderr=subprocess.STDOUT
            )
            if self.with_worker:
                self.procs.append(
                    subprocess.Popen(
                        [str(BIN / "cvopt"), "worker", "--queues", "cpu"],
                        env=self.env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
            cmd.append("--no-worker")
        elif not self.with_worker:
            cmd.append("--no-worker")
        self.procs.append(subprocess.Popen(cmd, env=self.env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{self.port}"
        wait_http(base + "/healthz")
        return base

    def api_pids(self) -> list[int]:
        """The uvicorn process(es) serving requests (children of `cvopt serve` when --workers > 1)."""
        serve = self.procs[-1].pid
        out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(serve)], capture_output=True, text=True).stdout
        kids = [
            int(line.split()[0])
            for line in out.splitlines()
            if "worker" not in line.split(None, 1)[1] or "multiprocessing" in line
        ]
        return [serve] + kids

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.db_name:
            import psycopg

            with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            import redis

            redis.Redis.from_url("redis://127.0.0.1:6379/13").flushdb()


async def drive(
    base: str, model_id: str, api_pids: list[int], *, clients: int, duration: float, think_s: float
) -> dict:
    # aiohttp, not httpx: httpx's async pool itself capped this at ~130 req/s on 2 cores.
    import aiohttp

    headers = {"Authorization": f"Bearer {API_KEY}"}
    samples: dict[str, list[float]] = {"POST /v1/jobs": [], "GET /v1/jobs/{id}": [], "GET /v1/jobs": []}
    errors: dict[str, int] = {k: 0 for k in samples}
    job_ids: list[str] = []
    job_body = {"model_id": model_id, "preset": "onnx"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base, headers=headers, connector=connector) as client:
        # Seed some jobs so that polling has something to poll from the start.
        for _ in range(5):
            async with client.post("/v1/jobs", json=job_body) as r:
                job_ids.append((await r.json())["id"])
        deadline = time.perf_counter() + duration

        async def one_client(seed: int) -> None:
            rng = random.Random(seed)
            # Clients start spread over one think time, as a fleet of pipelines would.
            await asyncio.sleep(rng.uniform(0, think_s))
            while time.perf_counter() < deadline:
                roll = rng.random()
                if roll < 0.1:
                    name, call = "POST /v1/jobs", client.post("/v1/jobs", json=job_body)
                elif roll < 0.8:
                    name, call = "GET /v1/jobs/{id}", client.get(f"/v1/jobs/{rng.choice(job_ids)}")
                else:
                    name, call = "GET /v1/jobs", client.get("/v1/jobs", params={"limit": "20"})
                t0 = time.perf_counter()
                try:
                    async with call as resp:
                        body = await resp.json()
                        ok = resp.status < 400
                except aiohttp.ClientError:
                    ok, body = False, None
                samples[name].append((time.perf_counter() - t0) * 1000)
                if not ok:
                    errors[name] += 1
                elif name == "POST /v1/jobs":
                    job_ids.append(body["id"])
                if think_s:
                    await asyncio.sleep(think_s * rng.uniform(0.5, 1.5))

        cpu_before = cpu_seconds(api_pids)
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        api_cpu_s = cpu_seconds(api_pids) - cpu_before
        # Leave the worker no backlog: cancel what is still queued.
        for job_id in job_ids:
            async with client.post(f"/v1/jobs/{job_id}/cancel") as r:
                await r.read()
    return {"samples": samples, "errors": errors, "api_cpu_s": api_cpu_s}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            pass
    return total


def upload_memory(base: str, pids: list[int], size_mb: int, tmp: Path) -> dict:
    """Upload a size_mb .npz dataset (written without holding it in memory) and sample RSS."""
    path = tmp / "big.npz"
    per_sample = 3 * 224 * 224
    n = size_mb * 1024 * 1024 // (per_sample * 4)
    arr_path = tmp / "x.npy"
    arr = np.lib.format.open_memmap(arr_path, mode="w+", dtype=np.float32, shape=(n, 3, 224, 224))
    arr[:] = 0.5
    arr.flush()
    del arr
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.write(arr_path, "x.npy")
    arr_path.unlink()
    before = rss_kib(pids)
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kib(pids))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        resp = httpx.post(
            base + "/v1/datasets",
            files={"file": ("big.npz", fh)},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=600,
        )
    elapsed = time.perf_counter() - t0
    stop.set()
    sampler.join()
    size = path.stat().st_size
    path.unlink()
    return {
        "status": resp.status_code,
        "bytes": size,
        "seconds": elapsed,
        "rss_before_mib": before / 1024,
        "rss_peak_mib": peak[0] / 1024,
        "growth_mib": (peak[0] - before) / 1024,
    }


def run_mode(mode: str, args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cvopt-bench-"))
    stack = Stack(mode, tmp, args.api_workers, args.worker)
    stack.env.update(dict(item.split("=", 1) for item in args.settings))
    try:
        base = stack.start()
        model = tmp / "tiny.onnx"
        tiny_onnx_model(model)
        with open(model, "rb") as fh:
            model_id = httpx.post(
                base + "/v1/models", files={"file": ("tiny.onnx", fh)}, headers={"Authorization": f"Bearer {API_KEY}"}
            ).json()["id"]
        cpu = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.machine(),
        )
        print(
            f"\nmode={mode} worker={'on' if args.worker else 'off'} api_workers={args.api_workers} "
            f"clients={args.clients} duration={args.duration}s cpu={cpu} x{os.cpu_count()}"
        )
        api = stack.api_pids()
        for think in args.think_ms:
            result = asyncio.run(
                drive(base, model_id, api, clients=args.clients, duration=args.duration, think_s=think / 1000)
            )
            served = sum(len(values) for values in result["samples"].values())
            print(
                f"\nthink time {think:g} ms per client between requests; API CPU "
                f"{result['api_cpu_s'] * 1000 / max(served, 1):.2f} ms per request"
            )
            print("| endpoint | requests | req/s | p50 ms | p99 ms | errors |")
            print("|---|---:|---:|---:|---:|---:|")
            for name, values in result["samples"].items():
                print(
                    f"| {name} | {len(values)} | {len(values) / args.duration:.0f} | {pct(values, 50):.1f} | "
                    f"{pct(values, 99):.1f} | {result['errors'][name]} |"
                )
        if args.upload_mb:
            up = upload_memory(base, api, args.upload_mb, tmp)
            print(
                f"\nupload of {up['bytes'] / 2**20:.0f} MiB: HTTP {up['status']} in {up['seconds']:.1f}s; "
                f"API RSS {up['rss_before_mib']:.0f} -> peak {up['rss_peak_mib']:.0f} MiB "
                f"(growth {up['growth_mib']:.0f} MiB)"
            )
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["embedded", "distributed"], nargs="+", default=["embedded", "distributed"])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument(
        "--think-ms",
        type=float,
        nargs="+",
        default=[1000, 200, 0],
        help="Pause between a client's requests; 0 = closed loop (saturation).",
    )
    ap.add_argument("--api-workers", type=int, default=1)
    ap.add_argument("--upload-mb", type=int, default=500)
    ap.add_argument(
        "--worker",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Run a worker during the load (on this 2-core machine it takes the API's CPU).",
    )
    ap.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="CVOPT_X=VALUE",
        help="A setting for the service (the bench otherwise ignores CVOPT_* in its environment).",
    )
    args = ap.parse_args()
    for mode in args.mode:
        run_mode(mode, args)


if __name__ == "__main__":
    main()
