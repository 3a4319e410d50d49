"""Upload a small CNN and a calibration set, run preset onnx-int8, poll to succeeded, download
the INT8 artifact through its URL with plain HTTP, and check it against the original:
once on Postgres + Redis + an S3 server + a Celery worker process, once through `cvopt serve`.
Then the phone targets: tflite-int8 and tflite-fp16 through the API, each .tflite downloaded and
run in the LiteRT interpreter against the original."""

from __future__ import annotations

import hashlib

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest


def upload(client: httpx.Client, route: str, path, **fields) -> dict:
    with open(path, "rb") as fh:
        resp = client.post(route, files={"file": (path.name, fh)}, data=fields)
    assert resp.status_code == 201, resp.text
    return resp.json()


def run_onnx_int8(stack, assets, tmp_path, *, model_file, job_route="/v1/jobs", **job_extra) -> dict:
    client = stack.client
    model = upload(client, "/v1/models", model_file, name="digits")
    calibration = upload(client, "/v1/datasets", assets.calibration_npz)
    evaluation = upload(client, "/v1/datasets", assets.labeled_zip)
    assert calibration["num_samples"] == 256 and not calibration["labeled"]
    assert evaluation["labeled"] and evaluation["num_classes"] == 10

    resp = client.post(
        job_route,
        json={
            "model_id": model["id"],
            "preset": "onnx-int8",
            "calibration_dataset_id": calibration["id"],
            "evaluation_dataset_id": evaluation["id"],
            "preprocessing": {"mean": [0.0], "std": [1.0]},
            **job_extra,
        },
    )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running")
    assert [s["name"] for s in job["steps"]] == ["export_onnx", "quantize_int8", "benchmark", "evaluate"]

    job = stack.wait_for_job(job["id"])
    assert job["status"] == "succeeded", (job["error"], job["log_tail"])
    assert job["progress"] == 1.0 and job["error"] is None
    assert all(s["status"] == "succeeded" and s["duration_s"] is not None for s in job["steps"])

    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()
    assert [a["step"] for a in artifacts["data"]] == ["export_onnx", "quantize_int8"]
    int8 = artifacts["data"][1]
    # Plain HTTP, no API key: the URL itself carries the permission.
    download = httpx.get(int8["url"], timeout=60)
    assert download.status_code == 200, download.text
    assert hashlib.sha256(download.content).hexdigest() == int8["sha256"]
    assert len(download.content) == int8["size_bytes"]
    path = tmp_path / int8["name"]
    path.write_bytes(download.content)

    quantized = onnx.load(str(path))
    assert sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node) > 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, y = assets.x[1500:], assets.y[1500:]
    name = session.get_inputs()[0].name
    int8_logits = np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])
    original = ort.InferenceSession(str(assets.models["onnx"]), providers=["CPUExecutionProvider"])
    fp32_logits = original.run(None, {"image": x})[0]
    agreement = (int8_logits.argmax(1) == fp32_logits.argmax(1)).mean()
    assert agreement >= 0.97, agreement
    assert (fp32_logits.argmax(1) == y).mean() > 0.85  # the model really learned the digits

    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    entries = {e["step"]: e for e in report["entries"]}
    assert set(entries) == {None, "export_onnx", "quantize_int8"}
    assert entries["quantize_int8"]["size_ratio"] < 0.6
    for entry in entries.values():
        assert entry["latency_ms"]["p50_ms"] > 0
        assert entry["accuracy"]["top1"] > 0.85
        assert entry["fidelity"]["top1_agreement"] >= 0.95
    assert entries[None]["fidelity"]["top1_agreement"] == 1.0
    assert report["machine"]["cpu_count"] >= 1
    return job


@pytest.mark.integration
def test_onnx_int8_on_postgres_redis_s3_and_a_worker(stack, digit_assets, tmp_path):
    job = run_onnx_int8(stack, digit_assets, tmp_path, model_file=digit_assets.models["pt2"])
    artifacts = stack.client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    assert artifacts[0]["url"].startswith(stack.env["CVOPT_S3_ENDPOINT_URL"])  # an S3 presigned URL
    assert "X-Amz-Signature" in artifacts[0]["url"]


@pytest.mark.integration
def test_onnx_int8_in_embedded_mode_through_cvopt_serve(embedded, digit_assets, tmp_path):
    # TorchScript keeps no shapes, so the job gives one; and the pipeline-style root alias.
    job = run_onnx_int8(
        embedded,
        digit_assets,
        tmp_path,
        model_file=digit_assets.models["torchscript"],
        job_route="/jobs",
        input_shape=[1, 1, 8, 8],
    )
    artifacts = embedded.client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    url = artifacts[0]["url"]
    assert url.startswith(embedded.base_url + "/files/")
    tampered = httpx.get(url.replace("sig=", "sig=0"))
    assert tampered.status_code == 401 and tampered.json()["code"] == "invalid_signature"
    other_object = httpx.get(url.replace("/artifacts/", "/artifacts/0", 1))  # another key, same signature
    assert other_object.status_code == 401


@pytest.mark.integration
@pytest.mark.parametrize("preset", ["tflite-int8", "tflite-fp16"])
def test_tflite_presets_end_to_end(preset, stack, digit_assets, tmp_path):
    from worker.litert import TfliteRunner

    client = stack.client
    model = upload(client, "/v1/models", digit_assets.models["pt2"], name="digits")
    calibration = upload(client, "/v1/datasets", digit_assets.calibration_npz)
    evaluation = upload(client, "/v1/datasets", digit_assets.labeled_npz)
    resp = client.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "preset": preset,
            "calibration_dataset_id": calibration["id"],
            "evaluation_dataset_id": evaluation["id"],
            "preprocessing": {"mean": [0.0], "std": [1.0]},
        },
    )
    assert resp.status_code == 202, resp.text
    job = stack.wait_for_job(resp.json()["id"])
    assert job["status"] == "succeeded", (job["error"], job["log_tail"])
    convert = job["steps"][0]
    assert convert["name"] == "convert_tflite"
    assert convert["metrics"]["verification"]["snr_db"] >= convert["metrics"]["verification"]["min_snr_db"]

    (artifact,) = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    assert artifact["format"] == "tflite" and artifact["name"].endswith(".tflite")
    download = httpx.get(artifact["url"], timeout=60)
    assert hashlib.sha256(download.content).hexdigest() == artifact["sha256"]
    path = tmp_path / artifact["name"]
    path.write_bytes(download.content)
    runner = TfliteRunner(path)
    x = digit_assets.x[1500:1600]
    tflite_top1 = np.concatenate([runner({"image": x[i : i + 1]})[0] for i in range(len(x))]).argmax(1)
    original = ort.InferenceSession(str(digit_assets.models["onnx"]), providers=["CPUExecutionProvider"])
    agreement = (tflite_top1 == original.run(None, {"image": x})[0].argmax(1)).mean()
    assert agreement >= (0.95 if preset == "tflite-int8" else 0.99), agreement

    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    entries = {e["step"]: e for e in report["entries"]}
    assert entries["convert_tflite"]["runtime"]["name"] == "litert"
    assert entries["convert_tflite"]["runtime"]["delegate"] == "XNNPACK"
    assert entries[None]["runtime"]["name"] == "torch"
    assert entries["convert_tflite"]["size_ratio"] < (0.4 if preset == "tflite-int8" else 0.6)
    assert entries["convert_tflite"]["accuracy"]["top1"] >= entries[None]["accuracy"]["top1"] - 0.02


@pytest.mark.integration
def test_a_gpu_job_on_a_cpu_only_deployment_says_it_waits_for_a_gpu_worker(stack, digit_assets):
    client = stack.client
    workers = client.get("/v1/workers").json()["data"]
    assert workers and all(w["queues"] == ["cpu"] and w["gpu"] is None for w in workers)
    model = upload(client, "/v1/models", digit_assets.models["pt2"], name="digits")
    resp = client.post("/v1/jobs", json={"model_id": model["id"], "preset": "gpu-fp16"})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["queue"] == "gpu" and job["steps"][0]["queue"] == "gpu"
    job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "queued" and job["waiting_for"] == "gpu worker"
    listed = client.get("/v1/jobs", params={"status": "queued"}).json()["data"]
    assert any(j["id"] == job["id"] and j["waiting_for"] == "gpu worker" for j in listed)
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
