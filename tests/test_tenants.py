"""Tenants on the real stack: a key sees only its tenant's objects (another tenant's id is a 404 on
every route that takes one), admin keys manage tenants and keys, a revoked key stops at once, and
quotas answer 429 with Retry-After without storing anything."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from core.settings import Settings
from tests.test_api import assert_error, post_file, s3_keys
from tests.test_end_to_end import upload

pytestmark = pytest.mark.integration


def make_tenant(stack, name: str, **quotas) -> tuple[dict, httpx.Client]:
    """A new tenant and a client holding one of its (non-admin) keys."""
    resp = stack.client.post("/v1/tenants", json={"name": name, **quotas})
    assert resp.status_code == 201, resp.text
    tenant = resp.json()
    key = stack.client.post("/v1/keys", json={"tenant_id": tenant["id"], "name": f"{name}-ci"})
    assert key.status_code == 201, key.text
    assert key.json()["tenant_id"] == tenant["id"] and not key.json()["is_admin"]
    client = httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {key.json()['key']}"}, timeout=60)
    return tenant, client


@pytest.fixture(scope="module")
def two_tenants(stack, digit_assets):
    _, alice = make_tenant(stack, "alice")
    _, bob = make_tenant(stack, "bob")
    model = upload(alice, "/v1/models", digit_assets.models["onnx"], name="alice-model")
    dataset = upload(alice, "/v1/datasets", digit_assets.calibration_npz)
    job = alice.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"}).json()
    yield {"alice": alice, "bob": bob, "model": model, "dataset": dataset, "job": job}
    alice.close()
    bob.close()


def test_only_admin_keys_manage_tenants_and_keys(stack, two_tenants):
    bob = two_tenants["bob"]
    assert_error(bob.post("/v1/tenants", json={"name": "mallory"}), 403, "admin_required")
    assert_error(bob.get("/v1/tenants"), 403, "admin_required")
    assert_error(bob.post("/v1/keys", json={"tenant_id": "default"}), 403, "admin_required")
    assert_error(bob.get("/v1/keys"), 403, "admin_required")
    assert_error(bob.delete("/v1/keys/" + "f" * 32), 403, "admin_required")
    assert_error(stack.client.post("/v1/tenants", json={"name": "alice"}), 409, "tenant_exists")
    assert_error(stack.client.post("/v1/tenants", json={"name": "../etc"}), 422, "validation_error")
    assert_error(stack.client.post("/v1/keys", json={"tenant_id": "f" * 32}), 422, "tenant_not_found")
    # Any key reads its own tenant: quotas and what it uses of them.
    own = bob.get("/v1/tenant").json()
    assert own["name"] == "bob" and own["usage"] == {"active_jobs": 0, "storage_bytes": 0, "uploads_last_minute": 0}
    names = {t["name"] for t in stack.client.get("/v1/tenants", params={"limit": 500}).json()["data"]}
    assert {"default", "alice", "bob"} <= names


def test_another_tenants_ids_are_404_on_every_route_that_takes_one(stack, two_tenants, digit_assets):
    """Every route in the schema with an id in its path, under /v1 and at the root alias: Bob
    gets exactly what an id that never existed gets, and Alice still gets her objects."""
    alice, bob = two_tenants["alice"], two_tenants["bob"]
    ids = {
        "model_id": two_tenants["model"]["id"],
        "dataset_id": two_tenants["dataset"]["id"],
        "job_id": two_tenants["job"]["id"],
    }
    owned = {"model_id", "dataset_id", "job_id"}
    paths = httpx.get(stack.base_url + "/openapi.json").json()["paths"]
    checked = 0
    for path, methods in paths.items():
        params = set(re.findall(r"{(\w+)}", path))
        if not params or not params <= owned:
            continue
        for method in methods:
            for prefix in ("", "/v1"):
                url = path if prefix else path.removeprefix("/v1")
                theirs = bob.request(method, url.format(**ids))
                assert theirs.status_code == 404, (method, url, theirs.text)
                never = bob.request(method, url.format(**{k: "f" * 32 for k in ids}))
                assert theirs.json()["code"] == never.json()["code"], (method, url)
                assert theirs.json()["message"].replace(ids[next(iter(params))], "") == never.json()["message"].replace(
                    "f" * 32, ""
                )
                checked += 1
    assert checked >= 2 * 8, checked  # models, datasets and jobs: read, delete, cancel, artifacts, report, ...
    # Bob's listings hold none of Alice's objects; a job on her model or dataset reads as "not found".
    for route in ("/v1/models", "/v1/datasets", "/v1/jobs"):
        assert bob.get(route).json()["count"] == 0
    assert_error(bob.post("/v1/jobs", json={"model_id": ids["model_id"], "preset": "onnx"}), 422, "model_not_found")
    bob_model = upload(bob, "/v1/models", digit_assets.models["onnx"])
    assert_error(
        bob.post(
            "/v1/jobs",
            json={"model_id": bob_model["id"], "preset": "onnx-int8", "calibration_dataset_id": ids["dataset_id"]},
        ),
        422,
        "dataset_not_found",
    )
    # Nothing of Alice's was touched by Bob's deletes and cancels.
    assert alice.get(f"/v1/models/{ids['model_id']}").status_code == 200
    assert alice.get(f"/v1/datasets/{ids['dataset_id']}").status_code == 200
    assert not alice.get(f"/v1/jobs/{ids['job_id']}").json()["cancel_requested"]


def test_a_revoked_key_stops_working_at_once(stack):
    tenant, client = make_tenant(stack, "carol")
    assert client.get("/v1/models").status_code == 200
    keys = stack.client.get("/v1/keys", params={"tenant_id": tenant["id"]}).json()["data"]
    assert len(keys) == 1 and "key" not in keys[0] and keys[0]["revoked_at"] is None
    assert stack.client.delete(f"/v1/keys/{keys[0]['id']}").status_code == 204
    assert_error(client.get("/v1/models"), 401, "invalid_api_key")
    assert stack.client.get("/v1/keys", params={"tenant_id": tenant["id"]}).json()["data"][0]["revoked_at"]
    assert_error(stack.client.delete("/v1/keys/" + "f" * 32), 404, "key_not_found")
    client.close()


def test_upload_quotas_answer_429_with_retry_after_and_store_nothing(stack, digit_assets):
    onnx_bytes = digit_assets.models["onnx"].read_bytes()
    _, rate_limited = make_tenant(stack, "dave", max_uploads_per_minute=2)
    for _ in range(2):
        assert post_file(rate_limited, "/v1/models", "m.onnx", onnx_bytes).status_code == 201
    keys_before = s3_keys(stack)
    third = post_file(rate_limited, "/v1/models", "m.onnx", onnx_bytes)
    body = assert_error(third, 429, "quota_upload_rate")
    assert 1 <= int(third.headers["retry-after"]) <= 60
    assert body["details"] == {"limit_per_minute": 2, "uploads_last_minute": 2}
    assert_error(
        post_file(rate_limited, "/v1/datasets", "d.npz", digit_assets.calibration_npz.read_bytes()),
        429,
        "quota_upload_rate",
    )
    assert rate_limited.get("/v1/models").json()["count"] == 2 and s3_keys(stack) == keys_before

    _, small = make_tenant(stack, "erin", max_storage_bytes=len(onnx_bytes) + 100)
    assert post_file(small, "/v1/models", "m.onnx", onnx_bytes).status_code == 201
    over = post_file(small, "/v1/models", "m.onnx", onnx_bytes)
    body = assert_error(over, 429, "quota_storage")
    assert int(over.headers["retry-after"]) > 0 and body["details"]["used_bytes"] == len(onnx_bytes)
    assert small.get("/v1/models").json()["count"] == 1
    # Deleting frees the space.
    first = small.get("/v1/models").json()["data"][0]["id"]
    assert small.delete(f"/v1/models/{first}").status_code == 204
    assert post_file(small, "/v1/models", "m.onnx", onnx_bytes).status_code == 201
    rate_limited.close()
    small.close()


def test_concurrent_job_quota_answers_429_until_a_job_ends(stack, digit_assets):
    _, client = make_tenant(stack, "frank", max_concurrent_jobs=1)
    model = upload(client, "/v1/models", digit_assets.models["pt2"])
    # No GPU worker runs here, so a GPU job stays queued: it holds the one slot.
    first = client.post("/v1/jobs", json={"model_id": model["id"], "preset": "gpu-fp16"})
    assert first.status_code == 202, first.text
    second = client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"})
    body = assert_error(second, 429, "quota_concurrent_jobs")
    assert int(second.headers["retry-after"]) > 0 and body["details"] == {"limit": 1, "active_jobs": 1}
    assert client.get("/v1/jobs").json()["count"] == 1
    assert client.get("/v1/tenant").json()["usage"]["active_jobs"] == 1
    assert client.post(f"/v1/jobs/{first.json()['id']}/cancel").json()["status"] == "cancelled"
    third = client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"})
    assert third.status_code == 202, third.text
    assert stack.wait_for_job(third.json()["id"], client=client)["status"] == "succeeded"
    client.close()


def test_the_cli_manages_tenants_and_keys_on_the_same_database(stack):
    import subprocess

    from tests.conftest import VENV_BIN

    def cvopt(*args: str) -> str:
        done = subprocess.run(
            [str(VENV_BIN / "cvopt"), *args], env=stack.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    tenant_id = cvopt("tenants", "create", "grace", "--max-concurrent-jobs", "2")
    key = cvopt("keys", "create", "--tenant", tenant_id, "--name", "grace-cli")
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"}) as client:
        own = client.get("/v1/tenant").json()
        assert own["id"] == tenant_id and own["effective_quotas"]["max_concurrent_jobs"] == 2
        assert_error(client.get("/v1/tenants"), 403, "admin_required")
        listed = [line for line in cvopt("keys", "list").splitlines() if "grace-cli" in line]
        assert len(listed) == 1 and tenant_id in listed[0] and "active" in listed[0]
        cvopt("keys", "revoke", listed[0].split()[0])
        # Revoked by another process: the API forgets the key it knows within its cache time.
        cached_s = float(
            stack.env.get("CVOPT_API_KEY_CACHE_SECONDS", Settings.model_fields["api_key_cache_seconds"].default)
        )
        deadline = time.monotonic() + cached_s + 2
        while client.get("/v1/tenant").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert_error(client.get("/v1/tenant"), 401, "invalid_api_key")


def test_the_step_cache_never_crosses_tenants(stack, digit_assets):
    """Tenant B's job on the same bytes recomputes its own artifact under its own key; tenant A's
    second job still reuses A's."""
    _, carol = make_tenant(stack, "cache-a")
    _, dave = make_tenant(stack, "cache-b")

    def run(client: httpx.Client) -> tuple[dict, dict]:
        model = upload(client, "/v1/models", digit_assets.models["onnx"], name="same-bytes")
        job = client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"})
        assert job.status_code == 202, job.text
        job = stack.wait_for_job(job.json()["id"], client=client)
        assert job["status"] == "succeeded", job["error"]
        artifact = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"][0]
        return next(s for s in job["steps"] if s["name"] == "export_onnx"), artifact

    try:
        first, carols = run(carol)
        again, carols_again = run(carol)
        theirs, daves = run(dave)
        assert first["metrics"]["cached"] is False and again["metrics"]["cached"] is True
        assert theirs["metrics"]["cached"] is False, "another tenant's artifact was reused"
        assert carols["sha256"] == daves["sha256"]  # the same bytes, made twice
        path = lambda url: httpx.URL(url).path  # noqa: E731
        assert path(carols["url"]) == path(carols_again["url"]) != path(daves["url"])
    finally:
        carol.close()
        dave.close()
