"""Fixtures for the real parts: Postgres, Redis, an S3-speaking server (moto), a Celery
worker process and the API process, plus a small CNN trained on real digit images.

Postgres and Redis are the machine's (127.0.0.1:5432 and :6379; .ci/run starts them);
each test session gets its own database and Redis db number."""

from __future__ import annotations

import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests import digits

PG_ADMIN_URL = os.environ.get("CVOPT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_SERVER = os.environ.get("CVOPT_TEST_REDIS", "redis://127.0.0.1:6379")
API_KEY = "cvopt_test_" + uuid.uuid4().hex
VENV_BIN = Path(sys.executable).parent


# Fixtures that start real services or processes, or train and export real models: a test that
# uses one is in the slow layer whether or not its module says so, so that `pytest -m "not
# integration"` (the inner loop) never starts a stack by accident.
SLOW_FIXTURES = frozenset(
    {"stack", "embedded", "s3_server", "pg_url", "migrated_pg", "redis_url", "digit_assets", "digit_teacher"}
)


# The slowest modules (seconds on 2 cores, `--durations=0`, Intel Xeon with AMX, 2026-12-01): under
# pytest-xdist (`-n auto --dist loadfile`, the README's line) each module goes whole to one worker, in
# collection order, so these go first and the workers finish together instead of one waiting on a
# long module handed out last.
SLOWEST_MODULES = {
    "test_real_jobs.py": 248,
    "test_client.py": 201,
    "test_api.py": 147,
    "test_prune_uploads.py": 120,
    "test_faults.py": 117,
    "test_pruning.py": 69,
    "test_end_to_end.py": 55,
}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects, and sorts, the same list
        items.sort(key=lambda item: -SLOWEST_MODULES.get(item.path.name, 0))


def pytest_configure(config):
    """Under pytest-xdist, each worker's share of the cores for PyTorch's (OpenMP) threads, in its own
    process and, through the environment, in the API, worker and step processes its stacks start:
    two workers each training with a thread per core left torch's spinning threads fighting over
    the cores (a distillation took three times as long as alone). ONNX Runtime and OpenVINO are
    given their threads explicitly and are left as they are."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each starts its own API, worker, S3 server, Postgres
    database and Redis database; Redis has 15 to share)."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL to the process's whole group (what it started: a Celery pool, uvicorn's
    processes): ``proc`` must have been started with ``start_new_session=True``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# Every process a stack starts carries its stack's tag in its environment (inherited by what those
# processes start in turn), so that the tests can tell whether any outlived the stack.
PROCESS_TAG_ENV = "TEST_PROCESS_TAG"


def tagged_processes(tag: str) -> dict[int, str]:
    """Live processes (not zombies) whose environment holds ``tag``: pid -> command line."""
    found = {}
    needle = f"{PROCESS_TAG_ENV}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("State:"))
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, StopIteration):  # gone meanwhile, or not ours to read
            continue
        if "zombie" not in state:
            found[int(entry.name)] = cmdline
    return found


def assert_all_gone(tag: str, timeout: float = 15) -> None:
    """Nothing started under ``tag`` is left within ``timeout``; survivors are killed, then reported."""
    deadline = time.monotonic() + timeout
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes outlived their test: {left}"


# -- trained model and datasets ------------------------------------------------------------------


@dataclass
class DigitAssets:
    x: object
    y: object
    models: dict[str, Path]
    calibration_npz: Path
    labeled_npz: Path
    labeled_zip: Path
    unlabeled_zip: Path


@pytest.fixture(scope="session")
def digit_assets(tmp_path_factory) -> DigitAssets:
    root = tmp_path_factory.mktemp("digits")
    net = digits.train_digit_net()
    x, y = digits.load_digits_arrays()
    models = digits.save_model_files(net, root / "models")
    outlier = digits.save_model_files(digits.with_outlier_feature(net), root / "outlier")
    models.update({"outlier_onnx": outlier["onnx"], "outlier_pt2": outlier["pt2"]})
    return DigitAssets(
        x=x,
        y=y,
        models=models,
        calibration_npz=digits.write_npz(root / "calibration.npz", x[:256]),
        labeled_npz=digits.write_npz(root / "eval.npz", x[1500:], y[1500:]),
        labeled_zip=digits.write_image_zip(root / "eval.zip", x[1500:], y[1500:]),
        unlabeled_zip=digits.write_image_zip(root / "calibration.zip", x[:200], None),
    )


@pytest.fixture(scope="session")
def digit_teacher(tmp_path_factory, digit_assets):
    """ResNet-18 trained on the digits (upscaled to 32x32 RGB), saved as a state_dict."""
    import torch
    import torchvision

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("teacher")
    images = np.repeat(np.kron(digit_assets.x, np.ones((1, 1, 4, 4), np.float32)), 3, axis=1)
    net = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    x, y = torch.from_numpy(images[:1200]), torch.from_numpy(digit_assets.y[:1200])
    for _ in range(5):
        net.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    torch.save(net.state_dict(), root / "teacher.pt")
    np.savez(root / "train.npz", x=images[:1200])  # unlabeled: what most users have
    np.savez(root / "train_labeled.npz", x=images[:1200], y=digit_assets.y[:1200])
    return root, images[1500:], digit_assets.y[1500:]


# -- services ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_url():
    import psycopg

    name = f"cvopt_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def migrated_pg(pg_url):
    from core.migrate import upgrade

    upgrade(pg_url)
    return pg_url


def claim_redis_db() -> str:
    """A Redis database number no other test session on this machine is using: two sessions
    sharing one would consume each other's job messages. A claim whose process is gone (a session
    killed before its teardown) is taken over."""
    import redis

    for db in range(1, 16):
        client = redis.Redis.from_url(f"{REDIS_SERVER}/{db}")
        holder = client.get("cvopt:test-session")
        if holder is not None and not _alive(int(holder)):  # a session killed before its teardown
            client.eval(_DELETE_IF_EQUAL, 1, "cvopt:test-session", holder)  # unless another took it meanwhile
        if client.set("cvopt:test-session", str(os.getpid()), nx=True, ex=6 * 3600):
            for key in client.scan_iter():
                if key != b"cvopt:test-session":
                    client.delete(key)
            return f"{REDIS_SERVER}/{db}"
    raise RuntimeError("every Redis database 1-15 is claimed by another test session")


_DELETE_IF_EQUAL = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def release_redis_db(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="session")
def redis_url():
    url = claim_redis_db()
    yield url
    release_redis_db(url)


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 in server mode: a real HTTP server speaking the S3 protocol."""
    import boto3

    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(endpoint + "/moto-api/", proc=proc)
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket="cvopt-test")
        yield S3Server(
            endpoint=endpoint,
            bucket="cvopt-test",
            env={
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            },
        )
    finally:
        stop(proc)
        log.close()


# -- the distributed stack: API process + Celery worker process ---------------------------------


@dataclass
class Stack:
    base_url: str
    env: dict[str, str]
    api_key: str
    client: httpx.Client
    logs: Path

    def wait_for_job(self, job_id: str, timeout: float = 240, client: httpx.Client | None = None) -> dict:
        """``client``: one holding a key of the job's tenant (default: the bootstrap key's)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = (client or self.client).get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s: {job}")


def _start_stack(env: dict[str, str], tmp: Path, *, with_worker: bool, embedded: bool = False):
    port = free_port()
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    procs = []
    api_log = open(logs / "api.log", "wb")
    cmd = [str(VENV_BIN / "cvopt"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    if not embedded:
        cmd += ["--no-worker", "--migrate"]
    api = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=api_log, stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(api)
    if with_worker:
        worker_log = open(logs / "worker.log", "wb")
        procs.append(
            subprocess.Popen(
                [str(VENV_BIN / "cvopt"), "worker", "--queues", "cpu"],
                env=env,
                cwd=tmp,
                stdout=worker_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(base + "/healthz", timeout=90, proc=api)
    except BaseException:
        for p in procs:
            stop(p)
        raise
    return base, procs, logs


def _running_stack(env: dict[str, str], tmp: Path, **kw):
    base, procs, logs = _start_stack(env, tmp, **kw)
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    try:
        yield Stack(base_url=base, env=env, api_key=API_KEY, client=client, logs=logs)
    finally:
        client.close()
        for p in procs:
            stop(p)
        assert_all_gone(env[PROCESS_TAG_ENV])


def stack_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVOPT_")}
    env.update(
        {
            "CVOPT_DATA_DIR": str(tmp / "data"),
            "CVOPT_BOOTSTRAP_API_KEY": API_KEY,
            "CVOPT_SECRET_KEY": "test-secret-" + "x" * 40,
            "CVOPT_HEARTBEAT_SECONDS": "1",
            "PYTHONUNBUFFERED": "1",
            PROCESS_TAG_ENV: uuid.uuid4().hex,
        }
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def stack(tmp_path_factory, migrated_pg, redis_url, s3_server):
    tmp = tmp_path_factory.mktemp("stack")
    env = stack_env(
        tmp,
        CVOPT_DATABASE_URL=migrated_pg,
        CVOPT_BROKER_URL=redis_url,
        CVOPT_STORAGE_URL=f"s3://{s3_server.bucket}/cvopt",
        CVOPT_S3_ENDPOINT_URL=s3_server.endpoint,
        CVOPT_MAX_UPLOAD_BYTES=str(64 * 1024 * 1024),
        # The webhook tests' receiver listens on loopback; retries come quickly.
        CVOPT_WEBHOOK_ALLOW_PRIVATE="true",
        CVOPT_WEBHOOK_BACKOFF_SECONDS="0.5",
        **s3_server.env,
    )
    yield from _running_stack(env, tmp, with_worker=True)


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """`cvopt serve` on its embedded defaults: SQLite, local storage, filesystem broker and a
    real Celery worker process started by the command itself."""
    tmp = tmp_path_factory.mktemp("embedded")
    env = stack_env(tmp)
    env.pop("CVOPT_SECRET_KEY")  # embedded mode makes and keeps its own
    yield from _running_stack(env, tmp, with_worker=False, embedded=True)


# -- the API in process: the fast layer ---------------------------------------------------------
#
# Here, not in a tests/fast/ package: the in-process API is one more fixture of the same suite
# (the layers are told apart by the `integration` marker, not by folders), and the in-process tests
# that already exist beside the others (test_api_fast_paths, test_trust_inputs) can share it.

INPROCESS_ADMIN_KEY = "cvopt_inprocess_admin_" + "a" * 32


@dataclass
class SentTask:
    name: str
    args: list
    queue: str | None
    routing_key: str | None


class RecordedQueue:
    """Stands in for the Celery app the API sends tasks with (core.queue.get_celery): it keeps what
    would have reached the broker, in order. ``broken``: every send fails, as with the broker down."""

    def __init__(self) -> None:
        self.sent: list[SentTask] = []
        self.broken = False

    def send_task(self, name, args=None, kwargs=None, queue=None, routing_key=None, **_options):
        if self.broken:
            raise ConnectionError("the broker is down (RecordedQueue.broken)")
        self.sent.append(SentTask(name=name, args=list(args or ()), queue=queue, routing_key=routing_key))

    def job_ids(self) -> list[str]:
        return [task.args[0] for task in self.sent]


@dataclass
class InProcessApi:
    app: object
    client: object  # fastapi.testclient.TestClient holding the bootstrap (admin) key
    queue: RecordedQueue
    admin_key: str
    data_dir: Path

    def client_for(self, key: str | None):
        """Another client of the same app, holding ``key`` (None: no Authorization header)."""
        from fastapi.testclient import TestClient

        return TestClient(self.app, headers={"Authorization": f"Bearer {key}"} if key else {})


def _forget_cached_state() -> None:
    """The process-wide caches built from settings: the next use builds them from the environment."""
    from api import deps
    from api.routes import jobs as job_routes
    from core.db import get_engine, get_sessionmaker
    from core.queue import get_celery
    from core.settings import get_settings
    from core.storage import get_store

    if get_engine.cache_info().currsize:
        get_engine().dispose()
    for cached in (get_settings, get_engine, get_sessionmaker, get_store, get_celery):
        cached.cache_clear()
    deps.API_KEYS.clear()  # the request authentication's own name for the key cache, wherever it is defined
    job_routes._live_queues_read = (-math.inf, set())


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory) -> Path:
    """An embedded database upgraded to head once (what `cvopt serve` runs at start); each test
    starts from a copy, which takes milliseconds where the migrations take most of a second."""
    from core.migrate import upgrade

    path = tmp_path_factory.mktemp("sqlite-template") / "cvopt.db"
    upgrade(f"sqlite:///{path}")
    return path


def _copy_sqlite(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)  # whole and consistent, whatever the source's WAL holds
    finally:
        dst.close()
        src.close()


@pytest.fixture(scope="session")
def inprocess_app():
    """``api.main.create_app()``, built once: its routes read the settings per request (the one
    value read when the app is built, CVOPT_ACCESS_LOG, is the same in every in-process test)."""
    from api.main import create_app

    return create_app()


@pytest.fixture
def start_inprocess_api(tmp_path, monkeypatch, migrated_sqlite, inprocess_app):
    """A factory: ``start(**settings)`` is the FastAPI app in this process on the embedded defaults
    under tmp_path (a migrated SQLite file, local storage with signed download URLs) with a
    RecordedQueue in place of the broker, and ``settings`` as CVOPT_* variables (``max_upload_bytes=
    "100"``); once per test. Every CVOPT_* variable of the outer environment is dropped; the settings, engine,
    store, Celery app and key caches are built for the test and forgotten after it.

    The client does not run the app's lifespan (its gc.collect + gc.freeze of the whole test
    process cost more than the rest of a test); start() makes the bootstrap key as it does.
    test_api_inprocess.py starts one app through its lifespan."""
    from fastapi.testclient import TestClient

    import core.queue
    from api.main import ensure_bootstrap_key

    def start(**settings: str) -> InProcessApi:
        for name in [n for n in os.environ if n.startswith("CVOPT_")]:
            monkeypatch.delenv(name)
        data_dir = tmp_path / "cvopt"
        env = {"DATA_DIR": str(data_dir), "BOOTSTRAP_API_KEY": INPROCESS_ADMIN_KEY, "ACCESS_LOG": "false"}
        for name, value in {**env, **{k.upper(): v for k, v in settings.items()}}.items():
            monkeypatch.setenv(f"CVOPT_{name}", value)
        _copy_sqlite(migrated_sqlite, data_dir / "cvopt.db")
        _forget_cached_state()
        queue = RecordedQueue()
        # The one place the API sends a task from: core.queue.enqueue_job asks get_celery() for the app.
        monkeypatch.setattr(core.queue, "get_celery", lambda: queue)
        ensure_bootstrap_key()
        client = TestClient(inprocess_app, headers={"Authorization": f"Bearer {INPROCESS_ADMIN_KEY}"})
        return InProcessApi(
            app=inprocess_app, client=client, queue=queue, admin_key=INPROCESS_ADMIN_KEY, data_dir=data_dir
        )

    try:
        yield start
    finally:
        monkeypatch.undo()  # the real get_celery and the outer environment first: then forget what was built
        _forget_cached_state()


@pytest.fixture
def inprocess_api(start_inprocess_api) -> InProcessApi:
    """The in-process API on its defaults (see start_inprocess_api)."""
    return start_inprocess_api()
