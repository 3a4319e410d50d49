"""The API's logic in process: FastAPI's TestClient on a migrated SQLite file, local storage and a
recorded queue (tests/conftest.py, ``inprocess_api``). No server, broker or worker: what a route
validates, writes, answers and sends to the broker, in milliseconds. What only the real processes
show (a job that runs, S3, Postgres locking) stays in the integration tests."""

from __future__ import annotations

import gc
import hashlib
import io
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.db import session_scope
from core.models import Artifact, Job, JobStatus, StepStatus
from core.queue import RUN_JOB_TASK
from core.storage import get_store
from tests.archives import png_bytes

# -- what is uploaded ---------------------------------------------------------------------------


def tiny_onnx(channels: int = 3, size: int = 8, classes: int = 10) -> bytes:
    """Conv -> ReLU -> global pool -> Gemm: an image classifier of a few hundred bytes."""
    rng = np.random.default_rng(0)
    conv = numpy_helper.from_array(rng.standard_normal((4, channels, 3, 3)).astype(np.float32), "conv_w")
    fc = numpy_helper.from_array(rng.standard_normal((classes, 4)).astype(np.float32), "fc_w")
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [conv, fc],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def image_zip(classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in classes:
            for i in range(per_class):
                zf.writestr(f"{name}/{i}.png" if name else f"{i}.png", png_bytes(8, 8))
    return buf.getvalue()


def npz(n: int = 8, labeled: bool = False) -> bytes:
    buf = io.BytesIO()
    x = np.random.default_rng(0).random((n, 3, 8, 8), dtype=np.float32)
    np.savez(buf, **({"x": x, "y": np.arange(n) % 10} if labeled else {"x": x}))
    return buf.getvalue()


def assert_error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"code", "message", "details"} and body["code"] == code, body
    assert body["message"]
    return body


def post_file(client, route: str, filename: str, content: bytes, headers: dict | None = None, **fields):
    return client.post(route, files={"file": (filename, content)}, data=fields, headers=headers or {})


def upload(client, route: str, filename: str, content: bytes, **fields) -> dict:
    resp = post_file(client, route, filename, content, **fields)
    assert resp.status_code == 201, resp.text
    return resp.json()


def stored_files(api) -> list[Path]:
    root = api.data_dir / "objects"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def model(inprocess_api) -> dict:
    return upload(inprocess_api.client, "/v1/models", "tiny.onnx", tiny_onnx())


def new_tenant(api, name: str, **quotas):
    """(tenant, a client holding a plain key of it)."""
    tenant = api.client.post("/v1/tenants", json={"name": name, **quotas})
    assert tenant.status_code == 201, tenant.text
    assert tenant.headers["Location"] == f"/v1/tenants/{tenant.json()['id']}"
    key = api.client.post("/v1/keys", json={"tenant_id": tenant.json()["id"], "name": f"{name}-key"})
    assert key.status_code == 201 and not key.json()["is_admin"], key.text
    return tenant.json(), api.client_for(key.json()["key"])


# -- system routes ------------------------------------------------------------------------------


def test_health_readiness_and_authentication(inprocess_api):
    client = inprocess_api.client
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok", "storage": "ok"}}
    anonymous = inprocess_api.client_for(None)
    missing = assert_error(anonymous.get("/v1/models"), 401, "missing_api_key")
    assert "Bearer" in missing["message"]
    assert anonymous.get("/v1/models").headers["WWW-Authenticate"] == "Bearer"
    assert_error(inprocess_api.client_for("not-a-key").get("/v1/jobs"), 401, "invalid_api_key")
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    # The root alias serves the same router as /v1.
    assert client.get("/models").json() == client.get("/v1/models").json() == {"data": [], "count": 0}


def test_the_app_starts_through_its_lifespan(inprocess_api):
    """What `cvopt serve`'s API process does at start: the bootstrap key is made (again: it is
    kept, not doubled), the store built, the heap frozen."""
    from fastapi.testclient import TestClient

    try:
        with TestClient(inprocess_api.app, headers={"Authorization": f"Bearer {inprocess_api.admin_key}"}) as client:
            assert gc.get_freeze_count() > 0
            keys = client.get("/v1/keys").json()
    finally:
        gc.unfreeze()  # a test process goes on after the API's start
    assert keys["count"] == 1 and keys["data"][0]["name"] == "bootstrap"


def test_the_bootstrap_key_is_an_admin_of_the_default_tenant(inprocess_api):
    own = inprocess_api.client.get("/v1/tenant").json()
    assert own["name"] == "default"
    assert own["usage"] == {"active_jobs": 0, "storage_bytes": 0, "uploads_last_minute": 0}
    keys = inprocess_api.client.get("/v1/keys").json()
    assert [(k["name"], k["is_admin"]) for k in keys["data"]] == [("bootstrap", True)]
    assert "key" not in keys["data"][0]


# -- uploads ------------------------------------------------------------------------------------


def test_a_model_upload_is_read_from_its_content_and_stored(inprocess_api):
    content = tiny_onnx()
    model = upload(inprocess_api.client, "/v1/models", "tiny.onnx", content, name="my classifier")
    assert model["format"] == "onnx" and model["name"] == "my classifier" and model["filename"] == "tiny.onnx"
    assert model["sha256"] == hashlib.sha256(content).hexdigest() and model["size_bytes"] == len(content)
    assert [(t["name"], t["shape"], t["dtype"]) for t in model["inputs"]] == [("input", ["batch", 3, 8, 8], "float32")]
    assert [(t["name"], t["shape"]) for t in model["outputs"]] == [("logits", ["batch", 10])]
    [stored] = stored_files(inprocess_api)
    assert stored.read_bytes() == content and stored.parent.name == model["id"]
    assert inprocess_api.client.get(f"/v1/models/{model['id']}").json() == model
    listed = inprocess_api.client.get("/v1/models").json()
    assert listed["count"] == 1 and listed["data"] == [model]
    assert inprocess_api.queue.sent == []  # an upload queues nothing


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"\x80\x04\x95" + b"\0" * 40, 415, "pickle_not_allowed"),  # never unpickled
        (b"random bytes, not a model", 415, "unrecognized_model_format"),
        (b"", 422, "empty_file"),
    ],
)
def test_bad_model_files_are_refused_and_leave_nothing(inprocess_api, content, status, code):
    assert_error(post_file(inprocess_api.client, "/v1/models", "model.pt", content), status, code)
    assert inprocess_api.client.get("/v1/models").json()["count"] == 0
    assert stored_files(inprocess_api) == []
    assert not list((inprocess_api.data_dir / "tmp").glob("upload-*"))  # the temporary file is gone too


def test_uploads_that_are_not_one_multipart_file_are_refused(inprocess_api):
    client = inprocess_api.client
    assert_error(client.post("/v1/models", content=tiny_onnx()), 422, "multipart_required")
    assert_error(client.post("/v1/models", data={"name": "x"}, files={"other": ("a", b"b")}), 422, "file_required")
    assert_error(
        client.post("/v1/models", files=[("file", ("a.onnx", b"a")), ("file", ("b.onnx", b"b"))]),
        422,
        "multiple_files",
    )
    bad_name = assert_error(
        post_file(client, "/v1/models", "m.onnx", tiny_onnx(), name="a\nb"), 422, "validation_error"
    )
    assert bad_name["details"]["errors"][0]["loc"] == ["body", "name"]


def test_an_upload_over_the_limit_is_413(start_inprocess_api):
    api = start_inprocess_api(max_upload_bytes="100")
    body = assert_error(post_file(api.client, "/v1/models", "tiny.onnx", tiny_onnx()), 413, "upload_too_large")
    assert body["details"] == {"max_upload_bytes": 100}
    assert stored_files(api) == []


def test_datasets_image_folders_and_arrays(inprocess_api):
    client = inprocess_api.client
    images = upload(client, "/v1/datasets", "pets.zip", image_zip())
    assert images["format"] == "zip" and images["num_samples"] == 6 and images["labeled"]
    assert images["class_names"] == ["cat", "dog"] and images["num_classes"] == 2
    assert images["sample_shape"] == [8, 8, 3] and images["layout"] == "HWC" and images["label_type"] == "classes"
    flat = upload(client, "/v1/datasets", "calibration.zip", image_zip(classes=("",)))
    assert flat["num_samples"] == 3 and not flat["labeled"] and flat["label_type"] is None
    arrays = upload(client, "/v1/datasets", "x.npz", npz(labeled=True))
    assert arrays["format"] == "npz" and arrays["layout"] == "NCHW" and arrays["sample_shape"] == [3, 8, 8]
    assert arrays["labeled"] and arrays["num_samples"] == 8
    assert client.get("/v1/datasets").json()["count"] == 3


@pytest.mark.parametrize(
    ("name", "content", "status", "code"),
    [
        ("broken.zip", b"PK\x03\x04" + b"\0" * 60, 415, "corrupt_dataset"),
        ("truncated.zip", image_zip()[:300], 415, "corrupt_dataset"),
        ("text.zip", None, 422, "dataset_has_no_images"),
        ("escape.zip", b"", 422, "unsafe_archive"),
    ],
)
def test_bad_datasets_are_refused_and_leave_nothing(inprocess_api, name, content, status, code):
    if not content:  # an archive of a text file, or of an image that would land outside the folder
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(*(("readme.txt", "no images here") if content is None else ("../0.png", png_bytes())))
        content = buf.getvalue()
    assert_error(post_file(inprocess_api.client, "/v1/datasets", name, content), status, code)
    assert inprocess_api.client.get("/v1/datasets").json()["count"] == 0
    assert stored_files(inprocess_api) == []


def test_a_repeated_upload_with_an_idempotency_key_is_one_model(inprocess_api):
    client, content = inprocess_api.client, tiny_onnx()
    first = post_file(client, "/v1/models", "tiny.onnx", content, headers={"Idempotency-Key": "upload-1"})
    again = post_file(client, "/v1/models", "tiny.onnx", content, headers={"Idempotency-Key": "upload-1"})
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    other = post_file(client, "/v1/models", "other.onnx", tiny_onnx(classes=3), headers={"Idempotency-Key": "upload-1"})
    assert assert_error(other, 422, "idempotency_key_reused")["details"] == {"resource_id": first.json()["id"]}
    assert client.get("/v1/models").json()["count"] == 1 and len(stored_files(inprocess_api)) == 1


# -- jobs ---------------------------------------------------------------------------------------


def test_a_preset_job_is_written_and_its_id_queued(inprocess_api, model):
    resp = inprocess_api.client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx", "name": "nightly"})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["name"] == "nightly" and job["model_id"] == model["id"]
    assert job["queue"] == "cpu" and job["progress"] == 0.0
    assert [(s["name"], s["status"]) for s in job["steps"]] == [("export_onnx", "pending"), ("benchmark", "pending")]
    assert job["steps"][1]["config"]["batch_sizes"]  # the step's defaults are filled in at submission
    assert job["input_spec"][0]["shape"] == [1, 3, 8, 8]  # the upload's open batch dimension is fixed
    [sent] = inprocess_api.queue.sent
    assert (sent.name, sent.args, sent.queue, sent.routing_key) == (RUN_JOB_TASK, [job["id"]], "cpu", "cpu")
    polled = inprocess_api.client.get(resp.headers["Location"])
    assert polled.status_code == 200 and polled.json()["id"] == job["id"] and polled.json()["status"] == "queued"


def test_explicit_steps_with_calibration_and_a_gpu_step(inprocess_api, model):
    client = inprocess_api.client
    calibration = upload(client, "/v1/datasets", "calibration.npz", npz())
    resp = client.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "steps": ["export_onnx", {"name": "quantize_int8", "config": {"per_channel": True}}, "benchmark"],
            "calibration_dataset_id": calibration["id"],
        },
    )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert [s["name"] for s in job["steps"]] == ["export_onnx", "quantize_int8", "benchmark"]
    assert job["steps"][1]["config"]["per_channel"] is True and job["calibration_dataset_id"] == calibration["id"]
    # A GPU step sends the whole job to the GPU queue; with no GPU worker up, a poll says what it waits for.
    gpu = client.post("/v1/jobs", json={"model_id": model["id"], "preset": "tensorrt-fp16"})
    assert gpu.status_code == 202, gpu.text
    assert gpu.json()["queue"] == "gpu" and gpu.json()["steps"][1]["queue"] == "gpu"
    assert [(t.args[0], t.queue) for t in inprocess_api.queue.sent] == [(job["id"], "cpu"), (gpu.json()["id"], "gpu")]
    assert client.get(f"/v1/jobs/{gpu.json()['id']}").json()["waiting_for"]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"preset": "no-such-preset"}, "unknown_preset"),
        ({"steps": ["export_onnx", "no_such_step"]}, "unknown_step"),
        ({"steps": ["export_onnx", "quantize_int8_torch"]}, "steps_do_not_chain"),
        ({"steps": ["export_onnx", "quantize_int8"]}, "calibration_dataset_required"),
        ({"steps": [{"name": "benchmark", "config": {"batch_sizes": "many"}}]}, "invalid_step_config"),
        ({"preset": "onnx", "preprocessing": {"mean": [0.5, 0.5]}}, "invalid_preprocessing"),
        ({"preset": "onnx", "preprocessing": {"resize": 10, "letterbox": True}}, "validation_error"),
        ({"preset": "onnx", "input_shape": [1, 3, 8]}, "shape_mismatch"),
        ({"preset": "onnx", "colour": "blue"}, "validation_error"),
        ({"preset": "onnx", "model_id": "f" * 32}, "model_not_found"),
        ({"preset": "onnx", "calibration_dataset_id": "f" * 32}, "dataset_not_found"),
    ],
)
def test_a_job_that_cannot_run_is_422_and_queues_nothing(inprocess_api, model, change, code):
    body = {"model_id": model["id"], **change}
    assert_error(inprocess_api.client.post("/v1/jobs", json=body), 422, code)
    assert inprocess_api.queue.sent == []
    assert inprocess_api.client.get("/v1/jobs").json()["count"] == 0


def test_preset_auto_builds_the_targets_candidates_and_keeps_the_constraints(inprocess_api, model):
    client = inprocess_api.client
    calibration = upload(client, "/v1/datasets", "calibration.npz", npz())
    resp = client.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "preset": "auto",
            "calibration_dataset_id": calibration["id"],
            "constraints": {"max_accuracy_drop": 0.02, "max_latency_ms": 5},
        },
    )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    # No target: the worker's kind of machine, x86-cpu. The export is needed by all; the rest are candidates.
    assert job["target"] == "x86-cpu" and job["preset"] == "auto"
    assert [(s["name"], s["optional"]) for s in job["steps"]] == [
        ("export_onnx", False),
        ("convert_openvino", True),
        ("convert_openvino", True),
        ("quantize_openvino", True),
        ("quantize_int8", True),
        ("benchmark", False),
        ("evaluate", False),
    ]
    assert [s["config"]["inference_precision"] for s in job["steps"][1:3]] == ["f32", "bf16"]
    assert job["steps"][4]["config"]["search_speed"] is True
    # The constraints' tolerance is the job's tolerance: the gates and the report judge by it.
    assert job["max_accuracy_drop"] == 0.02
    assert job["constraints"] == {"max_accuracy_drop": 0.02, "max_latency_ms": 5.0, "max_size_mb": None}
    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["target"] == "x86-cpu" and report["constraints"]["max_latency_ms"] == 5.0
    # Quantization-aware training is a candidate only where the job allows training.
    assert [x["step"] for x in report["left_out"]] == ["quantize_qat"]
    assert "allow_training" in report["left_out"][0]["reason"]


def test_preset_auto_at_batch_4_builds_open_batch_openvino_irs(inprocess_api, model):
    client = inprocess_api.client
    calibration = upload(client, "/v1/datasets", "calibration.npz", npz())
    body = {"model_id": model["id"], "preset": "auto", "calibration_dataset_id": calibration["id"]}
    at_one = client.post("/v1/jobs", json=body).json()
    at_four = client.post("/v1/jobs", json={**body, "input_shape": [4, 3, 8, 8]}).json()
    assert [s["config"]["static_shape"] for s in at_one["steps"] if s["name"].endswith("openvino")] == [True] * 3
    assert [s["config"]["static_shape"] for s in at_four["steps"] if s["name"].endswith("openvino")] == [False] * 3


def test_preset_auto_without_datasets_leaves_out_what_needs_them_and_says_why(inprocess_api, model):
    client = inprocess_api.client
    job = client.post("/v1/jobs", json={"model_id": model["id"], "preset": "auto", "target": "arm-cpu"}).json()
    # An ONNX upload on arm-cpu: ONNX Runtime only (LiteRT converts PyTorch models); INT8 needs calibration.
    assert [s["name"] for s in job["steps"]] == ["export_onnx", "benchmark"]
    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    reasons = {(x["step"], x["config"].get("precision")): x["reason"] for x in report["left_out"]}
    assert "not an ONNX model" in reasons[("convert_tflite", "int8")]
    assert "calibration_dataset_id" in reasons[("quantize_int8", None)]
    assert "evaluation_dataset_id" in reasons[("evaluate", None)]


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({"preset": "openvino", "target": "arm-cpu"}, "target_mismatch", "runs on x86-cpu, not on the job's target"),
        ({"preset": "tensorrt-fp16", "target": "x86-cpu"}, "target_mismatch", "a TensorRT engine"),
        ({"preset": "auto", "target": "mips"}, "validation_error", "target"),
        ({"preset": "auto", "overrides": {"distill": {}}}, "unknown_step", "does not run"),
        (
            {"preset": "onnx", "max_accuracy_drop": 0.05, "constraints": {"max_accuracy_drop": 0.01}},
            "validation_error",
            "give one",
        ),
        ({"preset": "onnx", "constraints": {"max_latency_ms": 0}}, "validation_error", "max_latency_ms"),
    ],
)
def test_a_target_or_constraint_the_job_cannot_meet_is_422(inprocess_api, model, body, code, words):
    err = assert_error(inprocess_api.client.post("/v1/jobs", json={"model_id": model["id"], **body}), 422, code)
    assert words in str(err), err
    assert inprocess_api.queue.sent == []


def test_a_dataset_that_does_not_fit_the_model_is_422(inprocess_api, model):
    grey = upload(inprocess_api.client, "/v1/datasets", "grey.npz", _grey_npz())
    body = {"model_id": model["id"], "preset": "onnx-int8", "calibration_dataset_id": grey["id"]}
    resp = assert_error(inprocess_api.client.post("/v1/jobs", json=body), 422, "shape_mismatch")
    assert resp["details"]["dataset_id"] == grey["id"]
    assert inprocess_api.queue.sent == []


def _grey_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((4, 1, 8, 8), np.float32))
    return buf.getvalue()


def test_a_retried_submission_with_an_idempotency_key_is_one_job(inprocess_api, model):
    client, body = inprocess_api.client, {"model_id": model["id"], "preset": "onnx"}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "nightly-42"})
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "nightly-42"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]
    assert inprocess_api.queue.job_ids() == [first.json()["id"]]  # sent once
    conflict = client.post("/v1/jobs", json={**body, "preset": "onnx-fp16"}, headers={"Idempotency-Key": "nightly-42"})
    assert assert_error(conflict, 422, "idempotency_key_reused")["details"] == {"resource_id": first.json()["id"]}
    assert_error(client.post("/v1/jobs", json=body, headers={"Idempotency-Key": ""}), 422, "invalid_idempotency_key")
    assert client.get("/v1/jobs").json()["count"] == 1


def test_a_job_is_kept_when_the_broker_is_down(inprocess_api, model):
    """The row is the truth: the reaper sends a queued job the broker never got."""
    inprocess_api.queue.broken = True
    resp = inprocess_api.client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"})
    assert resp.status_code == 202, resp.text
    assert inprocess_api.client.get(f"/v1/jobs/{resp.json()['id']}").json()["status"] == "queued"


def test_listing_filtering_paging_and_cancelling_jobs(inprocess_api, model):
    client = inprocess_api.client
    ids = [client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"}).json()["id"] for _ in range(3)]
    cancelled = client.post(f"/v1/jobs/{ids[0]}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["cancel_requested"]
    assert {s["status"] for s in cancelled.json()["steps"]} == {"skipped"}
    assert_error(client.post(f"/v1/jobs/{ids[0]}/cancel"), 409, "job_finished")

    every = client.get("/v1/jobs").json()
    assert every["count"] == 3 and {j["id"] for j in every["data"]} == set(ids)
    assert all(j["recommended"] is None for j in every["data"])
    assert [j["id"] for j in client.get("/v1/jobs", params={"status": "cancelled"}).json()["data"]] == [ids[0]]
    assert client.get("/v1/jobs", params={"status": "queued"}).json()["count"] == 2
    page = client.get("/v1/jobs", params={"limit": 1, "offset": 1}).json()
    assert page["count"] == 3 and len(page["data"]) == 1 and page["data"][0]["id"] == every["data"][1]["id"]
    assert_error(client.get("/v1/jobs", params={"limit": 0}), 422, "validation_error")
    assert_error(client.get("/v1/jobs", params={"status": "lost"}), 422, "validation_error")
    assert_error(client.get("/v1/jobs/" + "f" * 32), 404, "job_not_found")


def test_a_model_in_use_cannot_be_deleted_until_its_jobs_end(inprocess_api, model):
    client = inprocess_api.client
    job = client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"}).json()
    assert_error(client.delete(f"/v1/models/{model['id']}"), 409, "model_in_use")
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204
    assert_error(client.get(f"/v1/models/{model['id']}"), 404, "model_not_found")
    assert stored_files(inprocess_api) == []
    assert client.get(f"/v1/jobs/{job['id']}").json()["model_id"] == model["id"]  # the job keeps its history
    assert_error(client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"}), 422, "model_deleted")


# -- artifacts and the report -------------------------------------------------------------------


def _finish_with_artifact(job_id: str, content: bytes, tmp_path: Path) -> str:
    """What a worker leaves behind: the job succeeded, its export step made an ONNX artifact."""
    key = f"artifacts/{job_id}/0/model.onnx"
    (tmp_path / "model.onnx").write_bytes(content)
    get_store().put_file(key, tmp_path / "model.onnx")
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.status = JobStatus.succeeded
        job.progress = 1.0
        for step in job.steps:
            step.status = StepStatus.succeeded
        session.add(
            Artifact(
                job_id=job_id,
                step_index=0,
                step="export_onnx",
                name="model.onnx",
                format="onnx",
                storage_key=key,
                sha256=hashlib.sha256(content).hexdigest(),
                size_bytes=len(content),
                meta={},
            )
        )
    return key


def test_an_artifact_downloads_through_its_signed_url(inprocess_api, model, tmp_path):
    client = inprocess_api.client
    job = client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"}).json()
    content = tiny_onnx(classes=5)
    _finish_with_artifact(job["id"], content, tmp_path)
    listing = client.get(f"/v1/jobs/{job['id']}/artifacts").json()
    assert listing["count"] == 1
    [artifact] = listing["data"]
    assert (artifact["name"], artifact["step"], artifact["format"]) == ("model.onnx", "export_onnx", "onnx")
    assert artifact["sha256"] == hashlib.sha256(content).hexdigest() and artifact["expires_at"]
    url = urlsplit(artifact["url"])
    assert url.path.startswith("/files/artifacts/")
    # The signature is the permission: no API key needed, and any change to the link is refused.
    anonymous = inprocess_api.client_for(None)
    download = anonymous.get(f"{url.path}?{url.query}")
    assert download.status_code == 200 and download.content == content
    assert "model.onnx" in download.headers["content-disposition"]
    query = parse_qs(url.query)
    tampered = {**{k: v[0] for k, v in query.items()}, "filename": "other.onnx"}
    assert_error(anonymous.get(url.path, params=tampered), 401, "invalid_signature")
    assert_error(
        anonymous.get(url.path, params={**tampered, "filename": "model.onnx", "expires": 1}), 401, "invalid_signature"
    )
    # Found by the schema fuzzer: a signature with non-ASCII characters and a far-off expiry is refused, not a 500.
    assert_error(
        anonymous.get(url.path, params={**tampered, "sig": "0\u00c0\u009e", "expires": 2**65}), 401, "invalid_signature"
    )


def test_the_report_as_json_and_as_a_page(inprocess_api, model):
    client = inprocess_api.client
    job = client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"}).json()
    report = client.get(f"/v1/jobs/{job['id']}/report")
    assert report.status_code == 200, report.text
    assert report.json()["job_id"] == job["id"] and report.json()["status"] == "queued"
    assert report.json()["recommended"] is None
    page = client.get(f"/v1/jobs/{job['id']}/report.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert job["id"] in page.text and "default-src 'none'" in page.headers["content-security-policy"]
    # The job's report_url opens without a key until it expires; a forged one does not.
    signed = urlsplit(job["report_url"])
    anonymous = inprocess_api.client_for(None)
    assert anonymous.get(f"{signed.path}?{signed.query}").status_code == 200
    assert_error(anonymous.get(signed.path, params={"expires": 9999999999, "sig": "0" * 64}), 401, "invalid_signature")
    forged = {"expires": 32589158477190044731, "sig": "0\u00c0\u009e\u00b1]"}  # what the schema fuzzer sent: was a 500
    assert_error(anonymous.get(signed.path, params=forged), 401, "invalid_signature")
    assert_error(anonymous.get(signed.path), 401, "missing_api_key")


# -- tenants, keys and quotas -------------------------------------------------------------------


def test_only_admin_keys_manage_tenants_and_keys(inprocess_api):
    tenant, alice = new_tenant(inprocess_api, "alice")
    assert_error(alice.post("/v1/tenants", json={"name": "mallory"}), 403, "admin_required")
    assert_error(alice.get("/v1/tenants"), 403, "admin_required")
    assert_error(alice.post("/v1/keys", json={"tenant_id": tenant["id"]}), 403, "admin_required")
    assert_error(inprocess_api.client.post("/v1/tenants", json={"name": "alice"}), 409, "tenant_exists")
    assert_error(inprocess_api.client.post("/v1/tenants", json={"name": "../etc"}), 422, "validation_error")
    assert_error(inprocess_api.client.post("/v1/keys", json={"tenant_id": "f" * 32}), 422, "tenant_not_found")
    assert alice.get("/v1/tenant").json()["name"] == "alice"
    names = {t["name"] for t in inprocess_api.client.get("/v1/tenants").json()["data"]}
    assert names == {"default", "alice"}
    # A revoked key stops at once in the process that revoked it (its key cache forgets it).
    [key] = inprocess_api.client.get("/v1/keys", params={"tenant_id": tenant["id"]}).json()["data"]
    assert alice.get("/v1/models").status_code == 200
    assert inprocess_api.client.delete(f"/v1/keys/{key['id']}").status_code == 204
    assert_error(alice.get("/v1/models"), 401, "invalid_api_key")


def test_another_tenants_objects_read_as_missing(inprocess_api, model):
    _, bob = new_tenant(inprocess_api, "bob")
    dataset = upload(inprocess_api.client, "/v1/datasets", "calibration.npz", npz())
    job = inprocess_api.client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"}).json()
    for method, path, code in [
        ("GET", f"/v1/models/{model['id']}", "model_not_found"),
        ("DELETE", f"/v1/models/{model['id']}", "model_not_found"),
        ("GET", f"/v1/datasets/{dataset['id']}", "dataset_not_found"),
        ("DELETE", f"/v1/datasets/{dataset['id']}", "dataset_not_found"),
        ("GET", f"/v1/jobs/{job['id']}", "job_not_found"),
        ("POST", f"/v1/jobs/{job['id']}/cancel", "job_not_found"),
        ("GET", f"/v1/jobs/{job['id']}/artifacts", "job_not_found"),
        ("GET", f"/v1/jobs/{job['id']}/report", "job_not_found"),
        ("GET", f"/v1/jobs/{job['id']}/report.html", "job_not_found"),
    ]:
        assert_error(bob.request(method, path), 404, code)
    for route in ("/v1/models", "/v1/datasets", "/v1/jobs"):
        assert bob.get(route).json() == {"data": [], "count": 0}
    assert_error(bob.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"}), 422, "model_not_found")
    # The owner's objects are untouched by the other tenant's deletes and cancels.
    assert inprocess_api.client.get(f"/v1/models/{model['id']}").status_code == 200
    assert not inprocess_api.client.get(f"/v1/jobs/{job['id']}").json()["cancel_requested"]


def test_quotas_answer_429_with_retry_after_and_store_nothing(inprocess_api):
    _, busy = new_tenant(inprocess_api, "busy", max_concurrent_jobs=1)
    model = upload(busy, "/v1/models", "tiny.onnx", tiny_onnx())
    assert busy.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"}).status_code == 202
    over = busy.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"})
    assert assert_error(over, 429, "quota_concurrent_jobs")["details"] == {"limit": 1, "active_jobs": 1}
    assert int(over.headers["Retry-After"]) > 0
    assert len(inprocess_api.queue.sent) == 1

    _, hasty = new_tenant(inprocess_api, "hasty", max_uploads_per_minute=1)
    upload(hasty, "/v1/models", "tiny.onnx", tiny_onnx())
    rate = post_file(hasty, "/v1/models", "tiny.onnx", tiny_onnx())
    assert_error(rate, 429, "quota_upload_rate")
    assert 0 < int(rate.headers["Retry-After"]) <= 60

    _, small = new_tenant(inprocess_api, "small", max_storage_bytes=100)
    full = post_file(small, "/v1/models", "tiny.onnx", tiny_onnx())
    assert assert_error(full, 429, "quota_storage")["details"]["limit_bytes"] == 100
    assert small.get("/v1/tenant").json()["usage"]["storage_bytes"] == 0
    assert len(stored_files(inprocess_api)) == 2  # busy's model and hasty's first


def test_a_preset_drops_evaluate_without_a_dataset_and_takes_overrides(inprocess_api, model):
    client = inprocess_api.client
    bare = client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx-fp16"}).json()
    assert [s["name"] for s in bare["steps"]] == ["export_onnx", "convert_fp16", "benchmark"]
    labeled = upload(client, "/v1/datasets", "eval.npz", npz(labeled=True))
    body = {
        "model_id": model["id"],
        "preset": "onnx-fp16",
        "evaluation_dataset_id": labeled["id"],
        "overrides": {"benchmark": {"runs": 7}},
    }
    full = client.post("/v1/jobs", json=body)
    assert full.status_code == 202, full.text
    steps = {s["name"]: s for s in full.json()["steps"]}
    assert list(steps) == ["export_onnx", "convert_fp16", "benchmark", "evaluate"]
    assert steps["benchmark"]["config"]["runs"] == 7
    assert_error(client.delete(f"/v1/datasets/{labeled['id']}"), 409, "dataset_in_use")


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://169.254.169.254/latest", "ftp://example.com/x"])
def test_a_webhook_the_service_must_not_call_is_refused_at_submission(inprocess_api, model, url):
    resp = inprocess_api.client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx", "webhook_url": url})
    assert assert_error(resp, 422, "webhook_url_refused")["details"]["webhook_url"] == url
    assert inprocess_api.queue.sent == []


# -- the services, called directly --------------------------------------------------------------


def test_cancelling_a_running_job_asks_its_worker_and_leaves_it_running(inprocess_api, model):
    from api import services

    job_id = inprocess_api.client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"}).json()["id"]
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.status, job.steps[0].status = JobStatus.running, StepStatus.running
    with session_scope() as session:
        job = services.cancel_job(session=session, job_id=job_id, tenant_id=job.tenant_id)
        assert job.cancel_requested and job.status == JobStatus.running and job.finished_at is None
        assert [s.status for s in job.steps] == [StepStatus.running, StepStatus.pending]


def test_services_raise_domain_errors_for_another_tenants_ids(inprocess_api, model):
    from api import services
    from core.errors import InvalidInput, NotFound
    from core.schemas import JobCreate
    from core.settings import get_settings

    job_id = inprocess_api.client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx"}).json()["id"]
    with session_scope() as session:
        with pytest.raises(NotFound) as missing:
            services.get_job(session=session, job_id=job_id, tenant_id="someone-else")
        assert missing.value.code == "job_not_found" and missing.value.details == {"job_id": job_id}
        with pytest.raises(NotFound):
            services.get_model(session=session, model_id=model["id"], tenant_id="someone-else")
        job_in = JobCreate(model_id=model["id"], preset="onnx")
        with pytest.raises(InvalidInput) as refused:
            services.create_job(session=session, job_in=job_in, tenant_id="someone-else", settings=get_settings())
        assert refused.value.code == "model_not_found"
        owner = session.get(Job, job_id).tenant_id
        rows, count = services.list_jobs(session=session, tenant_id=owner, status=None, limit=10, offset=0)
        assert count == 1 and [r.id for r in rows] == [job_id]
        assert services.list_jobs(session=session, tenant_id="someone-else", status=None, limit=10, offset=0) == ([], 0)
