"""Real models that public packages ship (tests/real_models.py), measured by the evaluate pass in
process: the task is found from the outputs, every image counts, and the metric is the task's."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.datasets import inspect_dataset
from core.schemas import Preprocessing
from tests.real_models import (
    ORIENTATION,
    PHOTOS,
    TEXT_DETECTOR,
    TEXT_PAGES,
    YOLOV8N,
    asset,
    orientation_zip,
    photos_zip,
)
from worker.passes.base import ArtifactRef, DatasetRef, PassContext
from worker.passes.registry import get_pass

pytestmark = pytest.mark.integration


def dataset_ref(path: Path) -> DatasetRef:
    info = inspect_dataset(path)
    return DatasetRef(
        path=path,
        format=info.format,
        labeled=info.labeled,
        num_samples=info.num_samples,
        layout=info.layout,
        sample_shape=info.sample_shape,
        label_type=info.label_type,
    )


def evaluate(model, dataset: DatasetRef, tmp_path: Path, input_name: str, **config) -> dict:
    ref = ArtifactRef(model.file, "onnx", asset(model.file))
    ctx = PassContext(
        work_dir=tmp_path,
        original=ref,
        artifacts=[],
        input_spec=[{"name": input_name, "shape": model.input_shape, "dtype": "float32"}],
        preprocessing=Preprocessing(**model.preprocessing),
        evaluation_dataset=dataset,
        threads=2,
    )
    cls = get_pass("evaluate")
    return cls().run(ctx, ref, cls.Config(**config)).metrics


def test_the_orientation_classifier_is_scored_on_hand_labeled_pages(tmp_path):
    dataset = dataset_ref(orientation_zip(tmp_path / "orientation.zip"))
    assert (dataset.num_samples, dataset.label_type) == (48, "classes")
    metrics = evaluate(ORIENTATION, dataset, tmp_path, "x", batch_size=20)  # 20 + 20 + a partial 8
    assert metrics["task"] == "classification" and metrics["num_samples"] == 48
    original = metrics["results"][0]
    assert original["samples"] == 48
    # The pages are the model's domain: most orientations are right, and it is no coin toss (4 classes).
    assert 0.6 <= original["accuracy"]["top1"] <= 1.0
    assert original["metric"] == {
        "name": "top1",
        "value": original["accuracy"]["top1"],
        "reference": original["accuracy"]["top1"],
        "drop": 0.0,
        "higher_is_better": True,
    }


def test_a_real_yolov8n_is_measured_as_a_detector(tmp_path):
    dataset = dataset_ref(photos_zip(tmp_path / "photos.zip"))
    metrics = evaluate(YOLOV8N, dataset, tmp_path, "images", batch_size=4)
    assert metrics["task"] == "detection" and metrics["num_samples"] == len(PHOTOS)
    original = metrics["results"][0]
    assert original["metric"]["name"] == "f1_vs_float" and original["metric"]["value"] == 1.0
    assert original["fidelity"]["detections"] >= 2  # the two portraits' faces
    assert original["fidelity"]["worst_class_channel_snr_db"] == float("inf")


def test_a_text_detector_is_measured_on_its_probability_map(tmp_path):
    dataset = dataset_ref(photos_zip(tmp_path / "pages.zip", TEXT_PAGES + PHOTOS[:3]))
    metrics = evaluate(TEXT_DETECTOR, dataset, tmp_path, "x")
    assert metrics["task"] == "segmentation" and metrics["num_samples"] == 5
    assert metrics["results"][0]["metric"]["name"] == "pixel_agreement"


@pytest.mark.parametrize("size", [1, 7])
def test_small_sets_count_every_image(tmp_path, size):
    dataset = dataset_ref(photos_zip(tmp_path / "few.zip", (PHOTOS * 2)[:size]))
    metrics = evaluate(YOLOV8N, dataset, tmp_path, "images", batch_size=4)
    assert metrics["num_samples"] == size and metrics["results"][0]["samples"] == size
