"""The ``cvopt`` command: serve (embedded or API-only), worker, migrate, tenants, keys, and the
pipeline-facing client commands (submit, status, cancel, download: cvopt/client_cli.py).

Each server-side command imports what it needs inside itself: the client commands then start
without the database, Celery or the settings; worker/ is imported only by ``worker`` and api/ by
no command (``serve`` hands uvicorn the app's import path)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

import click

from cvopt import client_cli

log = logging.getLogger("cvopt.cli")


def _setup_logging(level: str = "INFO") -> None:
    from core.logs import setup

    setup(level)


@click.group()
def main() -> None:
    """cvopt: optimize computer-vision models for deployment."""


@main.command()
def migrate() -> None:
    """Wait for the database, then bring its schema to the latest revision."""
    from core.migrate import upgrade
    from core.settings import get_settings

    _setup_logging()
    upgrade(get_settings().resolved_database_url)
    click.echo("database schema is up to date")


# How long `cvopt serve` waits for its worker to stop (a warm shutdown: the job it runs ends or is
# given up, to be taken again after a restart) before it kills the worker's process group.
WORKER_STOP_TIMEOUT_S = 30.0


class _EmbeddedWorker:
    """A real Celery worker process beside the API, restarted if it dies, stopped with the API.

    It runs in a session of its own, so that stopping it takes its pool processes too and a
    terminal's Ctrl-C reaches it only through serve; and it dies with serve even when serve is
    killed outright (``cvopt worker --parent-pid``: PR_SET_PDEATHSIG)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()  # no new worker once stop() has begun
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._supervise, name="embedded-worker", daemon=True)

    def _spawn(self) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "cvopt.cli", "worker", "--queues", "cpu,gpu", "--parent-pid", str(os.getpid())]
        return subprocess.Popen(cmd, env=os.environ.copy(), start_new_session=True)

    def _supervise(self) -> None:
        # The kernel's parent-death signal follows the thread that started the process: this one,
        # which stays until the worker has ended.
        while True:
            with self.lock:
                if self.stopping.is_set():
                    return
                self.proc = proc = self._spawn()
            code = proc.wait()
            if self.stopping.is_set():
                return
            log.error("the embedded worker exited with %s; restarting it", code)
            if self.stopping.wait(2):
                return

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
            proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=WORKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("the embedded worker did not stop within %.0f s; killing it", WORKER_STOP_TIMEOUT_S)
        try:  # whatever of its process group is left (its pool processes, when it was killed)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        self.thread.join(timeout=5)


def _exit_on_signal(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", "api_workers", default=1, show_default=True, type=int, help="API processes.")
@click.option(
    "--worker/--no-worker",
    "with_worker",
    default=None,
    help="Start a Celery worker beside the API (default: only with the embedded broker).",
)
@click.option(
    "--migrate/--no-migrate",
    "run_migrations",
    default=None,
    help="Upgrade the schema first (default: only with the embedded SQLite database).",
)
def serve(host: str, port: int, api_workers: int, with_worker: bool | None, run_migrations: bool | None) -> None:
    """Serve the API; in embedded mode (the defaults) also a worker, on SQLite and local storage.

    SIGTERM or SIGINT stops the API, then the worker (waiting up to 30 s for it)."""
    import uvicorn

    from core.migrate import upgrade
    from core.settings import get_settings

    # uvicorn stops on these, then raises the signal again to end the process the default way,
    # which for SIGTERM skips every `finally` and leaves the worker running; an exception runs it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    _setup_logging()
    settings = get_settings()
    os.environ["CVOPT_DATA_DIR"] = str(settings.data_path)  # the worker child resolves the same dir
    settings.data_path.mkdir(parents=True, exist_ok=True)
    settings.signing_key()  # create the local secret once, before two processes race for it
    if run_migrations if run_migrations is not None else settings.resolved_database_url.startswith("sqlite"):
        upgrade(settings.resolved_database_url)
    worker = None
    try:
        if with_worker if with_worker is not None else settings.is_embedded_broker:
            worker = _EmbeddedWorker()
            worker.start()
        # log_config=None: uvicorn keeps our JSON logging; the API writes its own access lines.
        uvicorn.run(
            "api.main:app",
            host=host,
            port=port,
            workers=api_workers,
            log_level="info",
            access_log=False,
            log_config=None,
        )
    finally:
        if worker:
            worker.stop()


@main.command()
@click.option(
    "--queues",
    default="cpu",
    show_default=True,
    help="Comma-separated: cpu, gpu (any GPU job), gpu.<kind> (jobs for one GPU kind).",
)
@click.option("--concurrency", type=int, default=None, help="Jobs at once (default CVOPT_WORKER_CONCURRENCY).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option(
    "--parent-pid",
    type=int,
    default=None,
    hidden=True,
    help="End when this process ends, however it ends (cvopt serve's embedded worker).",
)
def worker(queues: str, concurrency: int | None, loglevel: str, parent_pid: int | None) -> None:
    """Run a Celery worker that executes jobs from the given queues.

    GPU queues are taken only where torch sees a CUDA device; a GPU worker also consumes
    gpu.<kind> for its own GPU (CVOPT_GPU_KIND, or derived from the GPU's name)."""
    if parent_pid is not None:
        from worker.step_process import die_with_parent

        die_with_parent(parent_pid)  # its pool processes and step processes die with it in turn
    import json
    import re

    from core.settings import GPU_KIND_PATTERN, get_settings
    from core.workers import (
        CPU_QUEUE,
        GPU_QUEUE,
        gpu_queue,
        is_gpu_queue,
    )

    _setup_logging(loglevel)
    settings = get_settings()
    names = [q.strip() for q in queues.split(",") if q.strip()]
    bad = [
        q
        for q in names
        if q not in (CPU_QUEUE, GPU_QUEUE) and not (is_gpu_queue(q) and re.match(GPU_KIND_PATTERN, q.split(".", 1)[1]))
    ]
    if bad or not names:
        raise click.BadParameter(f"queues are cpu, gpu or gpu.<kind>; got {bad or queues!r}", param_hint="--queues")
    gpu = None
    if any(is_gpu_queue(q) for q in names):
        from worker.devices import detect_gpu

        gpu = detect_gpu(settings.gpu_kind)
        if gpu is None:
            log.warning("no CUDA device here: not consuming %s", [q for q in names if is_gpu_queue(q)])
            names = [q for q in names if not is_gpu_queue(q)]
            if not names:
                raise click.ClickException("only GPU queues were asked for and torch sees no CUDA device")
        else:
            own = gpu_queue(gpu["kind"])
            names = list(dict.fromkeys([*names, GPU_QUEUE, own]))
            log.info("GPU %s (%s): consuming %s", gpu["name"], gpu["kind"], names)
    # The Celery app reads these when the worker is ready, to announce itself (core.workers).
    os.environ["CVOPT_WORKER_QUEUES"] = ",".join(names)
    os.environ["CVOPT_WORKER_GPU"] = json.dumps(gpu)
    from worker.celery_app import app

    argv = [
        # No banner on stdout: every line the worker writes is a log record (JSON by default).
        "--quiet",
        "worker",
        "--queues",
        ",".join(names),
        "--loglevel",
        loglevel,
        "--concurrency",
        str(concurrency or settings.worker_concurrency),
        "-O",
        "fair",
        # Gossip and mingle only slow start-up here; remote control (inspect ping) stays on.
        "--without-gossip",
        "--without-mingle",
    ]
    if settings.is_embedded_broker:
        argv.append("--without-heartbeat")
    app.worker_main(argv)


@main.command()
@click.option("--gpu", is_flag=True, help="Also build, load, check and time the GPU steps' artifacts on this GPU.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of checks instead of the table.")
def doctor(gpu: bool, as_json: bool) -> None:
    """Check what this worker can run, by running it: the CPU and each runtime; with --gpu, the GPU,
    compile_gpu (AOTInductor FP16 and its compiled-at-load fallback) and TensorRT FP16/INT8 engines
    built from the service's own artifacts. Exits 1 when a check fails."""
    import json

    from worker import doctor as checks_

    logging.basicConfig(level=logging.WARNING)
    gpu_kind = ""
    if gpu:
        from core.settings import get_settings

        gpu_kind = get_settings().gpu_kind
    checks = checks_.run_checks(gpu=gpu, gpu_kind=gpu_kind)
    click.echo(json.dumps(checks_.as_json(checks), indent=1) if as_json else checks_.render(checks))
    if any(c.status == checks_.FAIL for c in checks):
        sys.exit(1)


@main.group()
def tenants() -> None:
    """Manage tenants (the same as POST/GET /v1/tenants with an admin key)."""


@tenants.command("create")
@click.argument("name")
@click.option("--max-concurrent-jobs", type=int, default=None)
@click.option("--max-storage-bytes", type=int, default=None)
@click.option("--max-uploads-per-minute", type=int, default=None)
def tenants_create(name: str, **quotas) -> None:
    """Create a tenant and print its id."""
    from core.db import session_scope
    from core.errors import CvoptError
    from core.schemas import TenantCreate
    from core.tenants import create_tenant

    try:
        with session_scope() as session:
            tenant = create_tenant(session=session, tenant_in=TenantCreate(name=name, **quotas))
            tenant_id = tenant.id
    except CvoptError as exc:  # a taken name
        raise click.ClickException(exc.message) from exc
    click.echo(tenant_id)


@tenants.command("list")
def tenants_list() -> None:
    from core.db import session_scope
    from core.tenants import list_tenants

    with session_scope() as session:
        for row in list_tenants(session=session)[0]:
            click.echo(f"{row.id}  {row.name}")


@main.group()
def keys() -> None:
    """Manage API keys (the same as /v1/keys with an admin key)."""


@keys.command("create")
@click.option("--name", default="default", show_default=True)
@click.option("--tenant", "tenant_id", default="default", show_default=True, help="The tenant's id.")
@click.option("--admin", is_flag=True, help="May create tenants and keys.")
def keys_create(name: str, tenant_id: str, admin: bool) -> None:
    """Create an API key and print it (only its hash is stored)."""
    from core.db import session_scope
    from core.errors import CvoptError
    from core.tenants import create_key, ensure_default_tenant

    with session_scope() as session:
        ensure_default_tenant(session)
        try:
            row, key = create_key(session=session, tenant_id=tenant_id, name=name, admin=admin)
        except CvoptError as exc:
            raise click.ClickException(exc.message) from exc
        key_id = row.id
    click.echo(key)
    click.echo(f"(id {key_id}; store it now: it cannot be shown again)", err=True)


@keys.command("list")
def keys_list() -> None:
    from core.db import session_scope
    from core.tenants import list_keys

    with session_scope() as session:
        for row in list_keys(session=session)[0]:
            state = "revoked" if row.revoked_at else "active"
            role = "admin" if row.is_admin else "tenant"
            click.echo(f"{row.id}  {row.prefix}…  {row.tenant_id}  {row.name}  {role}  {state}")


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    from core.db import session_scope
    from core.errors import CvoptError
    from core.settings import get_settings
    from core.tenants import revoke_key

    with session_scope() as session:
        try:
            revoke_key(session=session, key_id=key_id)
        except CvoptError as exc:
            raise click.ClickException(exc.message) from exc
    click.echo(
        f"revoked {key_id} (running API processes stop accepting it within "
        f"CVOPT_API_KEY_CACHE_SECONDS, {get_settings().api_key_cache_seconds:g} s)"
    )


client_cli.register(main)

if __name__ == "__main__":
    main()
