"""evaluate on a detector whose boxes are known (tests/synthetic_detector.py): mAP against YOLO txt
and COCO JSON labels, every export layout, small sets; in process."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.datasets import inspect_dataset
from core.schemas import Preprocessing
from tests.synthetic_detector import FIXTURE_FILES, FIXTURES, HELD_OUT_SEED, PREPROCESSING, write_coco_zip, write_yolo_zip
from worker.passes.base import ArtifactRef, DatasetRef, PassContext
from worker.passes.registry import get_pass

SPEC = [{"name": "images", "shape": [1, 3, 128, 128], "dtype": "float32"}]


def dataset_ref(path: Path) -> DatasetRef:
    info = inspect_dataset(path)
    return DatasetRef(path=path, format=info.format, labeled=info.labeled, num_samples=info.num_samples,
                      layout=info.layout, sample_shape=info.sample_shape, label_type=info.label_type)


def evaluate(tmp_path: Path, dataset: DatasetRef, layout: str = "yolo", *, artifacts=(), task="auto", **config):
    original = ArtifactRef(FIXTURE_FILES[layout], "onnx", FIXTURES / FIXTURE_FILES[layout])
    ctx = PassContext(work_dir=tmp_path, original=original, artifacts=list(artifacts), input_spec=SPEC,
                      preprocessing=Preprocessing(**PREPROCESSING), task=task,
                      task_options={"max_accuracy_drop": 0.01, "detection": {}}, evaluation_dataset=dataset)
    cls = get_pass("evaluate")
    return cls().run(ctx, original, cls.Config(**config)).metrics


@pytest.fixture(scope="module")
def yolo_zip(tmp_path_factory) -> Path:
    return write_yolo_zip(tmp_path_factory.mktemp("yolo") / "shapes.zip", 40, HELD_OUT_SEED)


def test_map_against_yolo_labels_counts_every_image(yolo_zip, tmp_path):
    dataset = dataset_ref(yolo_zip)
    assert (dataset.num_samples, dataset.label_type) == (40, "boxes")
    metrics = evaluate(tmp_path, dataset, batch_size=16)  # 16 + 16 + a partial 8
    assert metrics["task"] == "detection" and metrics["labels"] == "boxes" and metrics["num_samples"] == 40
    original = metrics["results"][0]
    # The detector reaches 0.97 mAP@0.5 on 200 held-out images (H2's check); 40 of them are close.
    assert original["accuracy"]["map50"] > 0.9 and 0.6 < original["accuracy"]["map50_95"] < original["accuracy"]["map50"]
    assert original["metric"]["name"] == "map50_95" and original["metric"]["drop"] == 0.0
    assert original["fidelity"]["f1"] == 1.0


def test_coco_labels_give_the_same_map_as_yolo_labels(yolo_zip, tmp_path):
    coco = dataset_ref(write_coco_zip(tmp_path / "coco.zip", 40, HELD_OUT_SEED))
    from_yolo = evaluate(tmp_path, dataset_ref(yolo_zip))["results"][0]["accuracy"]
    from_coco = evaluate(tmp_path, coco)["results"][0]["accuracy"]
    # YOLO txt keeps 6 decimals of normalized coordinates: a hair of a pixel apart.
    assert from_coco["map50"] == pytest.approx(from_yolo["map50"], abs=2e-3)
    assert from_coco["map50_95"] == pytest.approx(from_yolo["map50_95"], abs=5e-3)


@pytest.mark.parametrize("layout", ["yolo_objectness", "post_nms"])
def test_every_export_layout_is_read(yolo_zip, tmp_path, layout):
    raw = evaluate(tmp_path, dataset_ref(yolo_zip))["results"][0]["accuracy"]["map50"]
    other = evaluate(tmp_path, dataset_ref(yolo_zip), layout)["results"][0]["accuracy"]["map50"]
    assert other == pytest.approx(raw, abs=0.03)


def test_a_broken_artifact_is_caught_by_agreement_not_cosine(yolo_zip, tmp_path):
    """The head's class scores rounded to a coarse grid (what one INT8 scale for pixel boxes and 0..1
    scores does): cosine stays high, F1 against FP32's detections and the class channels' SNR do not."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(FIXTURES / FIXTURE_FILES["yolo"]))
    out = model.graph.output[0].name
    step = numpy_helper.from_array(np.array(0.64, np.float32), "grid")
    model.graph.initializer.append(step)
    # out' = round(out / 0.64) * 0.64: the naive INT8 output scale, applied to every channel.
    model.graph.node.extend([
        helper.make_node("Div", [out, "grid"], ["scaled"]), helper.make_node("Round", ["scaled"], ["rounded"]),
        helper.make_node("Mul", ["rounded", "grid"], ["coarse"]),
    ])
    model.graph.output[0].name = "coarse"
    broken = tmp_path / "coarse.onnx"
    onnx.save(model, str(broken))
    metrics = evaluate(tmp_path, dataset_ref(yolo_zip), artifacts=[ArtifactRef("coarse.onnx", "onnx", broken, step="x")])
    result = metrics["results"][1]
    assert result["fidelity"]["cosine"] > 0.99
    assert result["fidelity"]["worst_class_channel_snr_db"] < 15
    assert result["metric"]["drop"] > 0.01


@pytest.mark.parametrize("size", [1, 7, 20])
def test_small_labeled_sets_work(tmp_path, size):
    dataset = dataset_ref(write_yolo_zip(tmp_path / "few.zip", size, HELD_OUT_SEED))
    metrics = evaluate(tmp_path, dataset, batch_size=8)
    assert metrics["num_samples"] == size and metrics["results"][0]["samples"] == size
    assert metrics["results"][0]["accuracy"]["map50"] is not None
