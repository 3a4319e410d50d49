"""The API against the real stack (Postgres, Redis, an S3 server, a worker process): bad input
gets a clear 4xx with {code, message, details} and leaves no row or object behind; auth; ids;
cancel; a failing step; listing."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import boto3
import httpx
import numpy as np
import pytest

from tests.test_end_to_end import upload

pytestmark = pytest.mark.integration


def s3_keys(stack) -> set[str]:
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.env["CVOPT_S3_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="cvopt-test")
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def assert_error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"code", "message", "details"}, body
    assert body["code"] == code, body
    assert body["message"]
    return body


def post_file(client, route, name, content: bytes):
    return client.post(route, files={"file": (name, content)})


@pytest.fixture(scope="module")
def digits_model(stack, digit_assets):
    return upload(stack.client, "/v1/models", digit_assets.models["pt2"])


@pytest.fixture(scope="module")
def calibration(stack, digit_assets):
    return upload(stack.client, "/v1/datasets", digit_assets.calibration_npz)


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# -- uploads ---------------------------------------------------------------------------------


def test_bad_model_uploads_are_refused_and_leave_nothing_behind(stack, digit_assets, digits_model):
    client = stack.client
    onnx_bytes = digit_assets.models["onnx"].read_bytes()
    cases = [
        ("random.onnx", os.urandom(4096), 415, "unrecognized_model_format"),
        ("truncated.onnx", onnx_bytes[: len(onnx_bytes) // 2], 415, "corrupt_model"),
        ("model.pkl", pickle.dumps({"weights": [1, 2, 3]}), 415, "pickle_not_allowed"),
        ("state_dict.pt", digit_assets.models["state_dict"].read_bytes(), 415, "pickle_not_allowed"),
        ("truncated.pt2", digit_assets.models["pt2"].read_bytes()[:3000], 415, "corrupt_model"),
        ("empty.onnx", b"", 422, "empty_file"),
    ]
    models_before = client.get("/v1/models").json()["count"]
    keys_before = s3_keys(stack)
    for name, content, status, code in cases:
        assert_error(post_file(client, "/v1/models", name, content), status, code)
    assert client.get("/v1/models").json()["count"] == models_before
    assert s3_keys(stack) == keys_before
    assert not list((stack.logs.parent / "data" / "tmp").glob("upload-*"))


def test_an_upload_over_the_limit_is_413_before_it_is_stored(stack):
    keys_before = s3_keys(stack)
    limit = int(stack.env["CVOPT_MAX_UPLOAD_BYTES"])
    body = assert_error(post_file(stack.client, "/v1/models", "big.onnx", b"\0" * (limit + 1)), 413, "upload_too_large")
    assert body["details"]["max_upload_bytes"] == limit

    # Without a Content-Length the limit is enforced while streaming.
    def chunks():
        boundary = b"--xyz"
        yield boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.onnx"\r\n\r\n'
        for _ in range(limit // (1024 * 1024) + 2):
            yield b"\1" * (1024 * 1024)
        yield b"\r\n" + boundary + b"--\r\n"

    resp = httpx.post(
        stack.base_url + "/v1/models",
        content=chunks(),
        timeout=60,
        headers={
            "Authorization": f"Bearer {stack.api_key}",
            "Content-Type": "multipart/form-data; boundary=xyz",
        },
    )
    assert_error(resp, 413, "upload_too_large")
    assert s3_keys(stack) == keys_before


def test_model_upload_reads_format_and_inputs(stack, digit_assets, digits_model):
    assert digits_model["format"] == "exported_program"
    assert digits_model["inputs"] == [{"name": "image", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert digits_model["sha256"] and digits_model["size_bytes"] == digit_assets.models["pt2"].stat().st_size
    onnx_model = upload(stack.client, "/v1/models", digit_assets.models["onnx"])
    assert onnx_model["format"] == "onnx"
    assert onnx_model["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert stack.client.get(f"/v1/models/{onnx_model['id']}").json()["sha256"] == onnx_model["sha256"]


def test_bad_datasets_are_refused(stack):
    client = stack.client
    cases = [
        ("empty.zip", _zip({}), 422, "dataset_has_no_images"),
        ("texts.zip", _zip({"a.txt": b"hello", "b.csv": b"1,2"}), 422, "dataset_has_no_images"),
        ("fake.zip", _zip({"cat/1.png": b"not an image at all"}), 422, "invalid_image"),
        ("evil.zip", _zip({"../../etc/x.png": b"x"}), 422, "unsafe_archive"),
        ("noise.bin", os.urandom(2048), 415, "unsupported_dataset_format"),
        ("no_x.npz", _npz(images=np.zeros((2, 1, 8, 8), np.float32)), 422, "invalid_npz"),
        ("objects.npz", _npz(x=np.array([{"a": 1}], dtype=object)), 422, "invalid_npz"),
        ("bad_y.npz", _npz(x=np.zeros((3, 1, 8, 8), np.float32), y=np.zeros(2, np.int64)), 422, "invalid_npz"),
    ]
    before = client.get("/v1/datasets").json()["count"]
    keys_before = s3_keys(stack)
    for name, content, status, code in cases:
        assert_error(post_file(client, "/v1/datasets", name, content), status, code)
    assert client.get("/v1/datasets").json()["count"] == before
    assert s3_keys(stack) == keys_before


def test_dataset_upload_describes_labeled_and_unlabeled_sets(stack, digit_assets):
    labeled = upload(stack.client, "/v1/datasets", digit_assets.labeled_zip)
    assert (labeled["labeled"], labeled["num_classes"], labeled["layout"]) == (True, 10, "HWC")
    assert labeled["sample_shape"] == [8, 8, 1] and labeled["num_samples"] == 297
    assert labeled["class_names"] == [str(i) for i in range(10)]
    flat = upload(stack.client, "/v1/datasets", digit_assets.unlabeled_zip)
    assert (flat["labeled"], flat["num_classes"], flat["num_samples"]) == (False, None, 200)
    npz = upload(stack.client, "/v1/datasets", digit_assets.labeled_npz)
    assert (npz["labeled"], npz["num_classes"], npz["sample_shape"], npz["layout"]) == (True, 10, [1, 8, 8], "NCHW")


# -- jobs ------------------------------------------------------------------------------------


def test_recipes_that_cannot_run_are_422_and_queue_nothing(stack, digit_assets, digits_model, calibration):
    client = stack.client
    ts_model = upload(client, "/v1/models", digit_assets.models["torchscript"])
    big = upload(client, "/v1/datasets", digit_assets.labeled_zip)  # images: fine for any size
    wrong_shape = client.post(
        "/v1/datasets", files={"file": ("w.npz", _npz(x=np.zeros((4, 1, 16, 16), np.float32)))}
    ).json()
    many_classes = client.post(
        "/v1/datasets",
        files={"file": ("c.npz", _npz(x=np.zeros((12, 1, 8, 8), np.float32), y=np.arange(12, dtype=np.int64)))},
    ).json()
    deleted = upload(client, "/v1/models", digit_assets.models["onnx"])
    assert client.delete(f"/v1/models/{deleted['id']}").status_code == 204
    m = digits_model["id"]
    cases = [
        ({"model_id": m, "preset": "nope"}, "unknown_preset"),
        ({"model_id": m, "steps": ["export_onnx", "sharpen"]}, "unknown_step"),
        (
            {"model_id": m, "steps": ["quantize_int8"], "calibration_dataset_id": calibration["id"]},
            "steps_do_not_chain",
        ),
        ({"model_id": m, "preset": "onnx-int8"}, "calibration_dataset_required"),
        ({"model_id": m, "steps": [{"name": "export_onnx", "config": {"opset": 3}}]}, "invalid_step_config"),
        ({"model_id": m, "steps": [{"name": "export_onnx", "config": {"colour": "red"}}]}, "invalid_step_config"),
        ({"model_id": m, "preset": "onnx", "steps": ["export_onnx"]}, "validation_error"),
        ({"model_id": m}, "validation_error"),
        ({"model_id": ts_model["id"], "preset": "onnx"}, "input_shape_required"),
        ({"model_id": m, "preset": "onnx", "input_shape": [1, 3, 8, 8]}, "shape_mismatch"),
        ({"model_id": m, "preset": "onnx-int8", "calibration_dataset_id": wrong_shape["id"]}, "shape_mismatch"),
        ({"model_id": m, "preset": "onnx-int8", "calibration_dataset_id": "0" * 32}, "dataset_not_found"),
        ({"model_id": deleted["id"], "preset": "onnx"}, "model_deleted"),
        ({"model_id": "0" * 32, "preset": "onnx"}, "model_not_found"),
        ({"model_id": m, "preset": "onnx-fp16", "evaluation_dataset_id": many_classes["id"]}, "classes_mismatch"),
    ]
    jobs_before = client.get("/v1/jobs").json()["count"]
    for payload, code in cases:
        assert_error(client.post("/v1/jobs", json=payload), 422, code)
    assert client.get("/v1/jobs").json()["count"] == jobs_before
    body = assert_error(
        client.post("/v1/jobs", json={"model_id": m, "steps": ["quantize_int8"], "calibration_dataset_id": big["id"]}),
        422,
        "steps_do_not_chain",
    )
    assert body["details"]["input_format"] == "exported_program"


def test_api_keys_are_required_and_checked(stack):
    no_key = httpx.get(stack.base_url + "/v1/jobs")
    assert_error(no_key, 401, "missing_api_key")
    assert no_key.headers["www-authenticate"] == "Bearer"
    assert_error(
        httpx.get(stack.base_url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key"
    )
    assert_error(httpx.post(stack.base_url + "/jobs", json={}), 401, "missing_api_key")
    assert httpx.get(stack.base_url + "/healthz").status_code == 200


def test_unknown_ids_are_404(stack):
    client = stack.client
    assert_error(client.get("/v1/jobs/" + "f" * 32), 404, "job_not_found")
    assert_error(client.get("/v1/models/" + "f" * 32), 404, "model_not_found")
    assert_error(client.get("/v1/datasets/" + "f" * 32), 404, "dataset_not_found")
    assert_error(client.get("/v1/jobs/" + "f" * 32 + "/artifacts"), 404, "job_not_found")
    assert_error(client.post("/v1/jobs/" + "f" * 32 + "/cancel"), 404, "job_not_found")
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")


def test_a_failing_step_fails_the_job_with_step_reason_and_log(stack, digits_model, calibration):
    resp = stack.client.post(
        "/v1/jobs",
        json={
            "model_id": digits_model["id"],
            "calibration_dataset_id": calibration["id"],
            "steps": ["export_onnx", {"name": "quantize_int8", "config": {"op_types": ["NoSuchOp"]}}, "benchmark"],
        },
    )
    assert resp.status_code == 202, resp.text
    job = stack.wait_for_job(resp.json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["step"] == "quantize_int8"
    assert job["error"]["code"] == "nothing_quantized"
    assert "nothing in the model could be quantized" in job["error"]["message"]
    assert [s["status"] for s in job["steps"]] == ["succeeded", "failed", "skipped"]
    assert "step 0 export_onnx finished" in job["log_tail"]
    assert job["current_step"] == "quantize_int8" or job["error"]["step"] == "quantize_int8"
    # The finished step's artifact is still there to download.
    assert stack.client.get(f"/v1/jobs/{job['id']}/artifacts").json()["count"] == 1


def test_cancel_ends_a_job_and_a_second_cancel_is_409(stack, digits_model):
    resp = stack.client.post("/v1/jobs", json={"model_id": digits_model["id"], "preset": "onnx", "name": "to-cancel"})
    job_id = resp.json()["id"]
    cancelled = stack.client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"]
    job = stack.wait_for_job(job_id)
    assert job["status"] == "cancelled"
    assert all(s["status"] in ("succeeded", "skipped") for s in job["steps"])
    assert_error(stack.client.post(f"/v1/jobs/{job_id}/cancel"), 409, "job_finished")


def test_jobs_list_filters_and_paginates(stack, digits_model):
    ids = [
        stack.client.post("/v1/jobs", json={"model_id": digits_model["id"], "preset": "onnx"}).json()["id"]
        for _ in range(3)
    ]
    for job_id in ids:
        stack.wait_for_job(job_id)
    page = stack.client.get("/v1/jobs", params={"limit": 2, "status": "succeeded"}).json()
    assert len(page["data"]) == 2 and page["count"] >= 3
    assert all(j["status"] == "succeeded" for j in page["data"])
    second = stack.client.get("/v1/jobs", params={"limit": 2, "offset": 2, "status": "succeeded"}).json()
    assert not {j["id"] for j in page["data"]} & {j["id"] for j in second["data"]}
    assert_error(stack.client.get("/v1/jobs", params={"status": "sleeping"}), 422, "validation_error")


def test_readyz_checks_database_broker_and_storage(stack):
    resp = httpx.get(stack.base_url + "/readyz")
    assert resp.status_code == 200
    assert resp.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_v1_and_the_root_alias_are_one_router_with_one_schema(stack):
    paths = httpx.get(stack.base_url + "/openapi.json").json()["paths"]
    assert "/v1/jobs" in paths and "/jobs" not in paths
    assert stack.client.get("/jobs").json().keys() == stack.client.get("/v1/jobs").json().keys()


def test_fp16_preset_without_a_dataset_skips_evaluation(stack, digits_model):
    resp = stack.client.post("/v1/jobs", json={"model_id": digits_model["id"], "preset": "onnx-fp16"})
    assert resp.status_code == 202, resp.text
    assert [s["name"] for s in resp.json()["steps"]] == ["export_onnx", "convert_fp16", "benchmark"]
    job = stack.wait_for_job(resp.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    artifacts = stack.client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    fp32, fp16 = artifacts
    assert fp16["step"] == "convert_fp16" and fp16["size_bytes"] < 0.6 * fp32["size_bytes"]
    report = stack.client.get(f"/v1/jobs/{job['id']}/report").json()
    assert [e["step"] for e in report["entries"]] == [None, "export_onnx", "convert_fp16"]


def test_int8_auto_rescues_accuracy_and_reports_layers_kept_in_float(stack, digit_assets, calibration):
    model = upload(stack.client, "/v1/models", digit_assets.models["outlier_pt2"])
    evaluation = upload(stack.client, "/v1/datasets", digit_assets.labeled_npz)
    resp = stack.client.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "preset": "onnx-int8-auto",
            "calibration_dataset_id": calibration["id"],
            "evaluation_dataset_id": evaluation["id"],
        },
    )
    assert resp.status_code == 202, resp.text
    job = stack.wait_for_job(resp.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    quantize = next(s for s in job["steps"] if s["name"] == "quantize_int8")
    fallback = quantize["metrics"]["fallback"]
    assert fallback["tolerance_met"] and fallback["attempts"][0]["drop"] > 0.3
    assert any(layer["op_type"] == "Mul" for layer in fallback["kept_float"])
    speed = quantize["metrics"]["speed_search"]
    if speed["candidates"][speed["chosen"]]["p50_ms"] > speed["fp32_p50_ms"]:
        assert "slower than the FP32 graph" in quantize["message"]
    report = stack.client.get(f"/v1/jobs/{job['id']}/report").json()
    entries = {e["step"]: e for e in report["entries"]}
    assert entries["quantize_int8"]["accuracy"]["top1"] >= entries[None]["accuracy"]["top1"] - 0.01
    # The HTML report shows the layers kept in float, and why.
    page = httpx.get(job["report_url"]).text
    section = page[page.index("Per-layer precision (quantize_int8") :]
    for layer in fallback["kept_float"]:
        assert f"<td>{layer['node']}</td>" in section
    assert "worst output channel at" in section and "met" in section


def test_a_torchvision_state_dict_upload_exports_and_runs(stack, tmp_path):
    """A checkpoint dict wrapping the weights, as training scripts save it; 7 classes."""
    import onnxruntime as ort
    import torch
    import torchvision

    net = torchvision.models.mobilenet_v3_small(num_classes=7).eval()
    path = tmp_path / "mobilenet.pt"
    torch.save({"state_dict": net.state_dict(), "epoch": 12}, path)
    assert_error(post_file(stack.client, "/v1/models", "mobilenet.pt", path.read_bytes()), 415, "pickle_not_allowed")
    before = s3_keys(stack)
    with open(path, "rb") as fh:  # weights of another architecture: refused at upload, nothing stored
        wrong = stack.client.post("/v1/models", files={"file": ("mobilenet.pt", fh)}, data={"architecture": "resnet18"})
    assert_error(wrong, 422, "state_dict_mismatch")
    assert "conv1.weight" in wrong.json()["details"]["missing_keys"] and s3_keys(stack) == before
    with open(path, "rb") as fh:
        resp = stack.client.post(
            "/v1/models", files={"file": ("mobilenet.pt", fh)}, data={"architecture": "mobilenet_v3_small"}
        )
    assert resp.status_code == 201, resp.text
    model = resp.json()
    assert model["format"] == "state_dict" and model["details"]["architecture"] == "mobilenet_v3_small"
    job = stack.client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx", "input_shape": [1, 3, 64, 64]})
    assert job.status_code == 202, job.text
    job = stack.wait_for_job(job.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    artifact = stack.client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"][0]
    onnx_path = tmp_path / "r.onnx"
    onnx_path.write_bytes(httpx.get(artifact["url"]).content)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    assert got.shape == (2, 7) and np.abs(got - want).max() < 1e-3


def test_torch_int8_preset_on_a_resnet18_state_dict(stack, digit_assets, tmp_path):
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    with open(path, "rb") as fh:
        model = stack.client.post(
            "/v1/models", files={"file": ("resnet18.pt", fh)}, data={"architecture": "resnet18"}
        ).json()
    images = np.repeat(np.kron(digit_assets.x[:64], np.ones((1, 1, 4, 4), np.float32)), 3, axis=1)
    calibration = stack.client.post("/v1/datasets", files={"file": ("c.npz", _npz(x=images))}).json()
    assert calibration["sample_shape"] == [3, 32, 32]
    resp = stack.client.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "preset": "torch-int8",
            "calibration_dataset_id": calibration["id"],
            "input_shape": [1, 3, 32, 32],
        },
    )
    assert resp.status_code == 202, resp.text
    job = stack.wait_for_job(resp.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    artifact = stack.client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"][0]
    assert artifact["format"] == "torchscript" and artifact["size_bytes"] < 0.3 * path.stat().st_size
    report = stack.client.get(f"/v1/jobs/{job['id']}/report").json()
    int8 = next(e for e in report["entries"] if e["step"] == "quantize_int8_torch")
    assert int8["latency_ms"]["p50_ms"] > 0 and int8["fidelity"]["cosine"] > 0.98


def test_prune50_distill_int8_preset_on_a_trained_resnet18(stack, digit_teacher):
    root, test_x, test_y = digit_teacher
    with open(root / "teacher.pt", "rb") as fh:
        model = stack.client.post(
            "/v1/models", files={"file": ("teacher.pt", fh)}, data={"architecture": "resnet18"}
        ).json()
    with open(root / "train.npz", "rb") as fh:
        train = stack.client.post("/v1/datasets", files={"file": ("train.npz", fh)}).json()
    evaluation = stack.client.post("/v1/datasets", files={"file": ("test.npz", _npz(x=test_x, y=test_y))}).json()
    resp = stack.client.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "preset": "prune50-distill-int8",
            "calibration_dataset_id": train["id"],
            "evaluation_dataset_id": evaluation["id"],
            "input_shape": [1, 3, 32, 32],
            "preprocessing": {"mean": [0, 0, 0], "std": [1, 1, 1]},
            "overrides": {"distill": {"epochs": 2}},
        },
    )
    assert resp.status_code == 202, resp.text
    assert resp.json()["steps"][1]["config"]["epochs"] == 2
    job = stack.wait_for_job(resp.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job["error"]
    steps = {s["name"]: s for s in job["steps"]}
    assert abs(steps["prune_structured"]["metrics"]["parameters_ratio"] - 0.5) < 0.03
    assert steps["distill"]["metrics"]["validation_best"] >= steps["distill"]["metrics"]["validation_before"]
    report = stack.client.get(f"/v1/jobs/{job['id']}/report").json()
    entries = {e["step"]: e for e in report["entries"]}
    assert set(entries) == {None, "prune_structured", "distill", "export_pt2", "export_onnx", "quantize_int8"}
    assert entries["export_pt2"]["format"] == "exported_program"
    assert entries["quantize_int8"]["size_ratio"] < 0.2
    assert entries["quantize_int8"]["accuracy"]["top1"] > entries["prune_structured"]["accuracy"]["top1"]
    bad = stack.client.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "preset": "prune50-distill",
            "calibration_dataset_id": train["id"],
            "overrides": {"sharpen": {}},
        },
    )
    assert_error(bad, 422, "unknown_step")


def test_an_idempotency_key_makes_a_retried_post_return_the_first_result(stack, digit_assets, digits_model):
    from concurrent.futures import ThreadPoolExecutor

    client = stack.client
    body = {"model_id": digits_model["id"], "preset": "onnx"}
    headers = {"Idempotency-Key": "pipeline-run-42-step-3"}
    before = client.get("/v1/jobs").json()["count"]
    first = client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    again = client.post("/v1/jobs", json=body, headers=headers)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    # Retries racing each other: still one job.
    race = {"Idempotency-Key": "race-1"}
    with ThreadPoolExecutor(6) as pool:
        ids = {r.json()["id"] for r in pool.map(lambda _: client.post("/v1/jobs", json=body, headers=race), range(6))}
    assert len(ids) == 1
    assert client.get("/v1/jobs").json()["count"] == before + 2
    # The same key for another request is refused, and nothing is made.
    assert_error(
        client.post("/v1/jobs", json={**body, "name": "other"}, headers=headers), 422, "idempotency_key_reused"
    )
    assert_error(client.post("/v1/jobs", json=body, headers={"Idempotency-Key": ""}), 422, "invalid_idempotency_key")
    assert client.get("/v1/jobs").json()["count"] == before + 2

    # Uploads: the retry returns the first model and stores no second object.
    objects = s3_keys(stack)
    up = {"Idempotency-Key": "upload-7"}
    path = digit_assets.models["onnx"]
    m1 = client.post("/v1/models", files={"file": (path.name, path.read_bytes())}, headers=up)
    m2 = client.post("/v1/models", files={"file": (path.name, path.read_bytes())}, headers=up)
    assert m1.status_code == m2.status_code == 201 and m2.headers["Idempotent-Replayed"] == "true"
    assert m1.json()["id"] == m2.json()["id"]
    assert len(s3_keys(stack) - objects) == 1
    assert_error(
        client.post("/v1/models", files={"file": ("other.onnx", path.read_bytes()[:-10])}, headers=up),
        422,
        "idempotency_key_reused",
    )
    d = {"Idempotency-Key": "dataset-1"}
    npz = digit_assets.calibration_npz
    d1 = client.post("/v1/datasets", files={"file": (npz.name, npz.read_bytes())}, headers=d)
    d2 = client.post("/v1/datasets", files={"file": (npz.name, npz.read_bytes())}, headers=d)
    assert d1.json()["id"] == d2.json()["id"] and d2.headers["Idempotent-Replayed"] == "true"
    # Without the header, two posts make two jobs.
    assert client.post("/v1/jobs", json=body).json()["id"] != client.post("/v1/jobs", json=body).json()["id"]


def test_paging_out_of_range_is_a_422_not_a_database_overflow(stack):
    for route in ("/v1/models", "/v1/datasets", "/v1/jobs"):
        assert_error(stack.client.get(route, params={"offset": 10**20}), 422, "validation_error")
        assert_error(stack.client.get(route, params={"limit": 0}), 422, "validation_error")
        assert stack.client.get(route, params={"offset": 10**9, "limit": 500}).json()["data"] == []


def test_a_nul_byte_in_an_id_is_a_4xx_not_a_database_error(stack, digits_model):
    for resp in (
        stack.client.get("/v1/jobs/%00"),
        stack.client.get("/v1/models/ab%00cd"),
        stack.client.post("/v1/jobs", json={"model_id": "\u0000", "preset": "onnx"}),
        stack.client.post(
            "/v1/jobs", json={"model_id": digits_model["id"], "preset": "onnx", "calibration_dataset_id": "x\u0000"}
        ),
    ):
        assert resp.status_code in (404, 422), resp.text
        assert set(resp.json()) == {"code", "message", "details"}
