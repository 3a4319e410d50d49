"""Issue 11's acceptance runs, through the real stack (API process, Celery worker, Postgres, Redis,
S3 server): small hand-checked sets (7 and 20 images) through `onnx-int8-auto` on a batch-1 `.pt2`
and on a detector with dynamic batch/height/width; every image counts, the task's metric judges,
and the job recommends an artifact that meets the tolerance (or says why none)."""

from __future__ import annotations

import pytest

from tests import digits
from tests.synthetic_detector import FIXTURE_FILES, FIXTURES, HELD_OUT_SEED, PREPROCESSING, write_yolo_zip
from tests.test_end_to_end import upload
from worker.quantization.graph import cpu_has_vnni

pytestmark = pytest.mark.integration


def submit(stack, model_id: str, dataset_id: str, **job) -> dict:
    resp = stack.client.post(
        "/v1/jobs",
        json={
            "model_id": model_id,
            "preset": "onnx-int8-auto",
            "calibration_dataset_id": dataset_id,
            "evaluation_dataset_id": dataset_id,
            **job,
        },
    )
    assert resp.status_code == 202, resp.text
    return resp.json()


def check_recommendation(stack, job: dict, metric_name: str) -> dict:
    report = stack.client.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["recommended"] == job["recommended"]
    by_name = {e["name"]: e for e in report["entries"]}
    for entry in report["entries"][1:]:
        assert entry["verdict"] in ("meets_tolerance", "slower_than_float", "over_tolerance")
        assert entry["metric"]["name"] == metric_name
    rec = job["recommended"]
    if rec["artifact"] is not None:
        chosen = by_name[rec["artifact"]]
        assert chosen["verdict"] == "meets_tolerance" and chosen["metric"]["drop"] <= 0.01 + 1e-9
        # The fastest of those that meet the tolerance (ties within 2% go to the smaller file).
        fastest = min(e["latency_ms"]["p50_ms"] for e in report["entries"] if e["verdict"] == "meets_tolerance")
        assert chosen["latency_ms"]["p50_ms"] <= fastest * 1.02 + 1e-9
    else:
        assert rec["reason"].startswith("nothing beats the original")
    return report


@pytest.mark.parametrize("size", [7, 20])
def test_a_small_labeled_set_through_int8_auto_on_a_batch_1_pt2(stack, digit_assets, tmp_path, size):
    x, y = digit_assets.x, digit_assets.y
    model = upload(stack.client, "/v1/models", digit_assets.models["pt2"], name="digits-b1")
    assert model["inputs"][0]["shape"][0] == 1  # torch.export fixed the batch at 1
    dataset = upload(
        stack.client,
        "/v1/datasets",
        digits.write_image_zip(tmp_path / f"golden{size}.zip", x[1500 : 1500 + size], y[1500 : 1500 + size]),
    )
    job = stack.wait_for_job(
        submit(stack, model["id"], dataset["id"], preprocessing={"mean": [0.0], "std": [1.0]})["id"], timeout=400
    )
    assert job["status"] == "succeeded", (job["error"], job["log_tail"])
    assert job["task"] == "classification"
    evaluation = next(s for s in job["steps"] if s["name"] == "evaluate")["metrics"]
    assert evaluation["num_samples"] == size
    assert all(r["samples"] == size for r in evaluation["results"])
    check_recommendation(stack, job, "top1")


@pytest.mark.parametrize("size", [7, 20])
def test_a_small_labeled_set_through_int8_auto_on_a_dynamic_detector(stack, tmp_path, size):
    model = upload(stack.client, "/v1/models", FIXTURES / FIXTURE_FILES["yolo"], name="shapes-yolo")
    assert model["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    dataset = upload(stack.client, "/v1/datasets", write_yolo_zip(tmp_path / f"boxes{size}.zip", size, HELD_OUT_SEED))
    assert dataset["label_type"] == "boxes" and dataset["num_samples"] == size
    job = stack.wait_for_job(
        submit(stack, model["id"], dataset["id"], input_shape=[1, 3, 128, 128], preprocessing=PREPROCESSING)["id"],
        timeout=400,
    )
    assert job["status"] == "succeeded", (job["error"], job["log_tail"])
    assert job["task"] == "detection"
    evaluation = next(s for s in job["steps"] if s["name"] == "evaluate")["metrics"]
    assert evaluation["num_samples"] == size and evaluation["labels"] == "boxes"
    report = check_recommendation(stack, job, "map50_95")
    int8 = next(e for e in report["entries"] if e["step"] == "quantize_int8")
    if int8["verdict"] != "over_tolerance":
        # Whatever its speed here, the INT8 graph this job made keeps the head's class scores.
        assert int8["fidelity"]["worst_class_channel_snr_db"] >= 15
        assert int8["fidelity"]["f1"] >= 0.95


def test_a_real_yolov8n_through_int8_auto_is_never_shipped_with_damaged_scores(stack, tmp_path):
    """The issue's detector: a YOLOv8n (Ultralytics export, dynamic batch/height/width) on ten real
    photos without labels. INT8 keeps the detections (the head's box/score concat stays float), but on
    this model ORT's INT8 moves a detected face's score from 0.83 to about 0.47 (class channel about
    12 dB SNR): under the 15 dB floor, so it is over tolerance and a float graph is recommended, with
    the reason. Should INT8 ever meet the floor, it must be recommended only as the fastest."""
    from tests.real_models import YOLOV8N, asset, photos_zip

    model = upload(stack.client, "/v1/models", asset(YOLOV8N.file), name="yolov8n")
    dataset = upload(stack.client, "/v1/datasets", photos_zip(tmp_path / "photos.zip"))
    job = stack.wait_for_job(
        submit(stack, model["id"], dataset["id"], input_shape=YOLOV8N.input_shape, preprocessing=YOLOV8N.preprocessing)[
            "id"
        ],
        timeout=600,
    )
    assert job["status"] == "succeeded", (job["error"], job["log_tail"])
    assert job["task"] == "detection"
    quantize = next(s for s in job["steps"] if s["name"] == "quantize_int8")["metrics"]
    assert any(n["op_type"] == "Concat" for n in quantize["float_nodes"])  # the box/score concat
    report = check_recommendation(stack, job, "f1_vs_float")
    int8 = next(e for e in report["entries"] if e["step"] == "quantize_int8")
    if cpu_has_vnni():  # full 8-bit weights keep the detections (without VNNI, 7-bit weights: F1 0.86 seen)
        assert int8["fidelity"]["f1"] >= 0.95
    if int8["fidelity"]["f1"] < 0.95:  # detections lost: never the answer
        assert job["recommended"]["artifact"] != int8["name"]
    floor = int8["metric"]["floor"]
    if floor["met"]:
        assert floor["value"] >= 15
    else:
        assert int8["verdict"] == "over_tolerance" and "15" in int8["verdict_reason"]
        assert job["recommended"]["artifact"] != int8["name"]


def test_a_real_orientation_classifier_through_int8_auto_on_hand_labeled_pages(stack, tmp_path):
    from tests.real_models import ORIENTATION, asset, orientation_zip

    model = upload(stack.client, "/v1/models", asset(ORIENTATION.file), name="orientation")
    dataset = upload(stack.client, "/v1/datasets", orientation_zip(tmp_path / "pages.zip"))
    assert dataset["label_type"] == "classes" and dataset["num_classes"] == 4
    job = stack.wait_for_job(
        submit(stack, model["id"], dataset["id"], preprocessing=ORIENTATION.preprocessing)["id"], timeout=600
    )
    assert job["status"] == "succeeded", (job["error"], job["log_tail"])
    assert job["task"] == "classification"
    evaluation = next(s for s in job["steps"] if s["name"] == "evaluate")["metrics"]
    assert evaluation["num_samples"] == 48 and evaluation["labels"] == "classes"
    check_recommendation(stack, job, "top1")


def test_the_openvino_preset_on_a_real_classifier_downloads_one_archive_openvino_reads(stack, tmp_path):
    """Issue 13's first target through the real stack: the real PP-LCNet orientation classifier,
    hand-labelled pages, preset `openvino`: converted, verified, measured and judged in the precision
    OpenVINO computed in; the IR downloads as one file that openvino.Core().read_model loads unpacked."""
    import io
    import zipfile

    import httpx
    import numpy as np
    import openvino as ov

    from tests.real_models import ORIENTATION, asset, orientation_zip

    model = upload(stack.client, "/v1/models", asset(ORIENTATION.file), name="orientation")
    dataset = upload(stack.client, "/v1/datasets", orientation_zip(tmp_path / "pages.zip"))
    job = stack.wait_for_job(
        submit(stack, model["id"], dataset["id"], preset="openvino", preprocessing=ORIENTATION.preprocessing)["id"],
        timeout=600,
    )
    assert job["status"] == "succeeded", (job["error"], job["log_tail"])
    steps = {s["name"]: s["metrics"] for s in job["steps"]}
    converted = steps["convert_openvino"]
    assert converted["inference_precision"] in ("f32", "bf16", "f16")
    assert converted["verification"]["inputs"] == "dataset"
    measured = {r["format"]: r for r in steps["benchmark"]["results"]}
    assert measured["openvino_ir"]["runtime"]["name"] == "openvino"
    assert measured["openvino_ir"]["runtime"]["inference_precision"] == converted["inference_precision"]
    assert steps["evaluate"]["num_samples"] == 48
    check_recommendation(stack, job, "top1")

    artifacts = stack.client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    (ir,) = [a for a in artifacts if a["format"] == "openvino_ir"]
    assert ir["name"].endswith(".openvino.zip")
    download = httpx.get(ir["url"], timeout=60)
    assert download.status_code == 200 and len(download.content) == ir["size_bytes"]
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        assert archive.namelist() == ["model.xml", "model.bin"]
        archive.extractall(tmp_path / "ir")
    compiled = ov.Core().compile_model(ov.Core().read_model(str(tmp_path / "ir" / "model.xml")), "CPU")
    (out,) = compiled(np.zeros((1, 3, 224, 224), np.float32)).to_tuple()
    assert out.shape == (1, 4)


def test_preset_auto_on_a_real_classifier_recommends_the_fastest_candidate_within_the_constraints(stack, tmp_path):
    """Issue 13's `auto` through the real stack on the real PP-LCNet orientation classifier and its
    hand-labelled pages: every x86 candidate the job allows is built (or fails visibly), timed in one
    benchmark and judged on top-1; the recommendation is the fastest within the tolerance and says what
    came next; the report carries the front. The same job with a size nothing meets reuses the
    artifacts, succeeds, recommends nothing and names the closest with what it misses."""
    from tests.real_models import ORIENTATION, asset, orientation_zip

    model = upload(stack.client, "/v1/models", asset(ORIENTATION.file), name="orientation")
    dataset = upload(stack.client, "/v1/datasets", orientation_zip(tmp_path / "pages.zip"))
    job = stack.wait_for_job(
        submit(stack, model["id"], dataset["id"], preset="auto", preprocessing=ORIENTATION.preprocessing)["id"],
        timeout=900,
    )
    assert job["status"] == "succeeded", (job["error"], job["log_tail"])
    assert job["target"] == "x86-cpu"
    candidates = [s for s in job["steps"] if s["optional"]]
    assert [s["name"] for s in candidates] == [
        "convert_openvino",
        "convert_openvino",
        "quantize_openvino",
        "quantize_int8",
    ]
    for step in candidates:  # built, or refused with a code and a reason
        assert step["status"] in ("succeeded", "failed"), step
        assert step["status"] == "succeeded" or (step["metrics"]["error"]["code"] and step["message"])
    report = stack.client.get(f"/v1/jobs/{job['id']}/report").json()
    built = 1 + sum(
        s["status"] == "succeeded" for s in job["steps"] if s["name"] != "benchmark" and s["name"] != "evaluate"
    )
    assert len(report["entries"]) == built
    assert {e["label"] for e in report["entries"]} >= {"original (ONNX)", "ONNX Runtime FP32"}
    assert report["front"] and all(
        next(e for e in report["entries"] if e["name"] == n)["pareto"] for n in report["front"]
    )
    assert len(report["failed_candidates"]) == sum(s["status"] == "failed" for s in candidates)
    rec = job["recommended"]
    if rec["artifact"] is not None:
        chosen = next(e for e in report["entries"] if e["name"] == rec["artifact"])
        assert chosen["verdict"] == "meets_tolerance" and chosen["metric"]["drop"] <= 0.01 + 1e-9
        fastest = min(e["latency_ms"]["p50_ms"] for e in report["entries"] if e["verdict"] == "meets_tolerance")
        assert chosen["latency_ms"]["p50_ms"] <= fastest * 1.02 + 1e-9
        assert chosen["name"] in report["front"]
    page = stack.client.get(f"/v1/jobs/{job['id']}/report.html")
    assert page.status_code == 200 and "<svg" in page.text

    tight = stack.wait_for_job(
        submit(
            stack,
            model["id"],
            dataset["id"],
            preset="auto",
            preprocessing=ORIENTATION.preprocessing,
            constraints={"max_size_mb": 0.001},
        )["id"],
        timeout=600,
    )
    assert tight["status"] == "succeeded", (tight["error"], tight["log_tail"])
    made = [s for s in tight["steps"] if s["name"] not in ("benchmark", "evaluate") and s["status"] == "succeeded"]
    # The constraint only changes the choice: every artifact comes back from the cache.
    assert made and all(s["metrics"]["cached"] for s in made), [(s["name"], s["metrics"]["cached"]) for s in made]
    rec = tight["recommended"]
    assert rec["artifact"] is None and rec["closest"] and rec["missed"][0].startswith("size ")
    assert "nothing within the tolerance meets the constraints" in rec["reason"]
    verdicts = {e["verdict"] for e in stack.client.get(f"/v1/jobs/{tight['id']}/report").json()["entries"][1:]}
    assert "meets_tolerance" not in verdicts
