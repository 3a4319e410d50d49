"""The API's per-request fast paths, in process (SQLite, local storage, the embedded broker).

A key this process looked up lately is answered without a query or a thread of its own, and
yet a revoked key stops at once in the process that revoked it and within
CVOPT_API_KEY_CACHE_SECONDS in any other; the cache finds a key only by its own hash, so it
never hands one tenant's key to another. A job's status is rendered in one thread-pool hop
(each hop waits in the pool's queue under load) and asks the database only what it shows. What
the API process holds once started is frozen, so that the garbage collector's full passes (which
hold the GIL) no longer walk it.
"""

from __future__ import annotations

import functools
import gc
import io
import math
import os
import time
from contextlib import ExitStack

import anyio.to_thread
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, update

from api.key_cache import API_KEYS
from api.main import create_app
from api.routes import jobs as job_routes
from core.db import get_engine, get_sessionmaker
from core.migrate import upgrade
from core.models import ApiKey, utcnow
from core.queue import get_celery
from core.schemas import JobRead, JobsRead
from core.settings import get_settings
from core.storage import get_store

ADMIN_KEY = "cvopt_fastpath_admin_" + "a" * 32


def _forget_process_state() -> None:
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    for cached in (get_settings, get_engine, get_sessionmaker, get_store, get_celery):
        cached.cache_clear()
    API_KEYS.clear()


@pytest.fixture
def service(tmp_path, monkeypatch):
    """A factory: the API on a fresh embedded deployment, with extra CVOPT_* settings."""
    monkeypatch.setattr(job_routes, "_live_queues_read", (-math.inf, set()))  # read from another database
    for name in list(os.environ):
        if name.startswith("CVOPT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CVOPT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CVOPT_BOOTSTRAP_API_KEY", ADMIN_KEY)
    monkeypatch.setenv("CVOPT_ACCESS_LOG", "false")

    def start(**settings: str) -> TestClient:
        for name, value in settings.items():
            monkeypatch.setenv(f"CVOPT_{name.upper()}", value)
        _forget_process_state()
        upgrade(get_settings().resolved_database_url)
        return running.enter_context(TestClient(create_app(), headers={"Authorization": f"Bearer {ADMIN_KEY}"}))

    with ExitStack() as running:
        yield start
    _forget_process_state()
    gc.unfreeze()  # the API froze this test process's heap at its start


@pytest.fixture
def api(service) -> TestClient:
    return service()


def new_tenant_key(client: TestClient, name: str) -> tuple[str, str, str]:
    """(tenant id, key id, key) of a new tenant with one plain key."""
    tenant = client.post("/v1/tenants", json={"name": name})
    assert tenant.status_code == 201, tenant.text
    key = client.post("/v1/keys", json={"tenant_id": tenant.json()["id"]})
    assert key.status_code == 201, key.text
    return tenant.json()["id"], key.json()["id"], key.json()["key"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def tiny_onnx() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 8, 8])],
    )
    buf = io.BytesIO()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), buf)
    return buf.getvalue()


def submit_job(client: TestClient, key: str) -> dict:
    model = client.post("/v1/models", files={"file": ("tiny.onnx", tiny_onnx())}, headers=bearer(key))
    assert model.status_code == 201, model.text
    job = client.post("/v1/jobs", json={"model_id": model.json()["id"], "preset": "onnx"}, headers=bearer(key))
    assert job.status_code == 202, job.text
    return job.json()


class Statements:
    """The SQL the API sends while the block runs."""

    def __init__(self) -> None:
        self.sql: list[str] = []

    def __enter__(self) -> Statements:
        event.listen(get_engine(), "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc) -> None:
        event.remove(get_engine(), "before_cursor_execute", self._record)

    def _record(self, _conn, _cursor, statement, *_args) -> None:
        self.sql.append(statement)

    def touching(self, table: str) -> list[str]:
        return [s for s in self.sql if f"FROM {table}" in s or f"UPDATE {table}" in s]


@pytest.fixture
def thread_hops(monkeypatch) -> list[str]:
    """The names of the functions the API hands to its thread pool, as they are handed over."""
    hops: list[str] = []
    run_sync = anyio.to_thread.run_sync

    async def counting(func, *args, **kwargs):
        named = func
        while isinstance(named, functools.partial):  # FastAPI hands over partials of the route
            named = named.keywords.get("function", named.func)
        hops.append(getattr(named, "__name__", repr(named)))
        return await run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    return hops


def test_a_key_this_process_looked_up_lately_needs_no_query(api):
    _, _, key = new_tenant_key(api, "cached")
    with Statements() as sent:
        for _ in range(4):
            assert api.get("/v1/tenant", headers=bearer(key)).status_code == 200
    assert len(sent.touching("api_keys")) == 1, sent.sql


def test_a_revoked_key_stops_at_once_in_the_process_that_revoked_it(api):
    _, key_id, key = new_tenant_key(api, "revoked-here")
    assert api.get("/v1/tenant", headers=bearer(key)).status_code == 200  # now cached
    assert api.delete(f"/v1/keys/{key_id}").status_code == 204
    resp = api.get("/v1/tenant", headers=bearer(key))
    assert resp.status_code == 401 and resp.json()["code"] == "invalid_api_key"


def _revoke_elsewhere(key_id: str) -> None:
    """What another API process's DELETE /v1/keys/{id} leaves in the shared database."""
    with get_sessionmaker()() as session:
        session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=utcnow()))
        session.commit()


def test_a_key_revoked_by_another_process_stops_within_the_cache_time(service):
    api = service(api_key_cache_seconds="0.5")
    _, key_id, key = new_tenant_key(api, "revoked-elsewhere")
    assert api.get("/v1/tenant", headers=bearer(key)).status_code == 200
    _revoke_elsewhere(key_id)
    revoked_at = time.monotonic()
    while True:
        sent_at = time.monotonic()
        resp = api.get("/v1/tenant", headers=bearer(key))
        if resp.status_code != 200:
            break
        assert sent_at - revoked_at < 0.5, "the revoked key still works after the cache time"
        time.sleep(0.05)
    assert resp.status_code == 401 and resp.json()["code"] == "invalid_api_key"


def test_without_the_cache_a_key_revoked_elsewhere_stops_at_once(service):
    api = service(api_key_cache_seconds="0")
    _, key_id, key = new_tenant_key(api, "uncached")
    assert api.get("/v1/tenant", headers=bearer(key)).status_code == 200
    _revoke_elsewhere(key_id)
    assert api.get("/v1/tenant", headers=bearer(key)).status_code == 401


def test_cached_keys_never_cross_tenants(api):
    tenant_a, _, key_a = new_tenant_key(api, "tenant-a")
    tenant_b, _, key_b = new_tenant_key(api, "tenant-b")
    job = submit_job(api, key_a)
    for _ in range(3):  # the first round fills the cache, the others are served from it
        assert api.get("/v1/tenant", headers=bearer(key_a)).json()["id"] == tenant_a
        assert api.get("/v1/tenant", headers=bearer(key_b)).json()["id"] == tenant_b
        assert api.get(f"/v1/jobs/{job['id']}", headers=bearer(key_a)).status_code == 200
        assert api.get(f"/v1/jobs/{job['id']}", headers=bearer(key_b)).status_code == 404
        assert api.get("/v1/jobs", headers=bearer(key_b)).json()["count"] == 0
        assert api.get("/v1/tenant", headers=bearer(key_b + "x")).status_code == 401
    assert api.get("/v1/jobs", headers=bearer(key_a)).json()["count"] == 1


def test_job_status_takes_one_thread_hop_and_no_worker_lookup_once_it_ended(api, thread_hops):
    _, _, key = new_tenant_key(api, "status")
    job = submit_job(api, key)
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(key)).status_code == 200
    api.get("/v1/tenant", headers=bearer(key))  # the key is now known to this process
    thread_hops.clear()
    with Statements() as sent:
        resp = api.get(f"/v1/jobs/{job['id']}", headers=bearer(key))
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    shown = JobRead.model_validate(resp.json())
    assert shown.status == "cancelled" and [s.status for s in shown.steps] == ["skipped"] * len(job["steps"])
    assert thread_hops == ["read_job"]
    assert not sent.touching("api_keys") and not sent.touching("workers"), sent.sql


def test_a_queued_job_still_says_what_it_waits_for_from_one_read_of_the_workers(api, thread_hops, monkeypatch):
    monkeypatch.setattr(job_routes, "LIVE_QUEUES_TTL_S", 60.0)  # however slow this machine is today
    _, _, key = new_tenant_key(api, "queued")
    job = submit_job(api, key)  # no worker runs in this process: it stays queued
    thread_hops.clear()
    with Statements() as sent:
        for _ in range(3):
            resp = api.get(f"/v1/jobs/{job['id']}", headers=bearer(key))
            assert resp.json()["status"] == "queued" and resp.json()["waiting_for"] == "cpu worker"
        listed = JobsRead.model_validate(api.get("/v1/jobs", headers=bearer(key)).json())
    assert [j.waiting_for for j in listed.data] == ["cpu worker"]
    assert thread_hops == ["read_job"] * 3 + ["list_jobs"]
    assert len(sent.touching("workers")) == 1, sent.sql


def test_what_the_api_holds_once_started_is_out_of_the_collectors_walks(api):
    store = get_store()  # built at start: in distributed mode an S3 client, some 50k objects
    walked = gc.get_objects()
    assert gc.get_freeze_count() > len(walked)
    assert not any(obj is store for obj in walked)


def test_the_report_page_opens_with_the_key_or_with_the_signed_link(api):
    _, _, key = new_tenant_key(api, "report")
    job = submit_job(api, key)
    assert api.get(f"/v1/jobs/{job['id']}/report.html", headers=bearer(key)).status_code == 200
    assert api.get(f"/v1/jobs/{job['id']}/report.html", headers=bearer(key + "x")).status_code == 401
    link = api.get(f"/v1/jobs/{job['id']}", headers=bearer(key)).json()["report_url"]
    assert api.get(link, headers={"Authorization": ""}).status_code == 200
    assert api.get(link.replace("sig=", "sig=0"), headers={"Authorization": ""}).status_code == 401


def test_a_lookup_that_read_a_key_before_its_revocation_does_not_cache_it():
    """A request's lookup reads the key, the key is revoked (the cache forgets it), then that
    lookup would put it back for the cache time: it must not."""
    from api.key_cache import KeyCache

    cache = KeyCache()
    key = ApiKey(id="k1", tenant_id="t1", name="n", key_hash="h1")
    before = cache.generation  # read when the lookup begins
    cache.forget("k1")  # the revocation, while the lookup's query runs
    cache.put("h1", key, 60, before)
    assert cache.get("h1") is None
    cache.put("h1", key, 60, cache.generation)  # a lookup that began after it: kept
    assert cache.get("h1") is key
