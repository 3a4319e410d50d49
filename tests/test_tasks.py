"""The task a job's metric follows, decided from output shapes (pure, in process)."""

from __future__ import annotations

import pytest

from core.errors import InvalidInput
from core.tasks import detection_layout, infer_task, resolve_task, yolo_anchor_count


@pytest.mark.parametrize(("outputs", "input_shape", "task"), [
    ([[1, 1000]], [1, 3, 224, 224], "classification"),
    ([["batch", 4]], ["batch", 3, 48, 192], "classification"),  # the orientation net: 4 angles
    ([[1, 1280, 1, 1]], [1, 3, 224, 224], "classification"),
    ([[1, 84, 8400]], [1, 3, 640, 640], "detection"),  # YOLOv8n at 640
    ([[1, 8400, 84]], [1, 3, 640, 640], "detection"),  # the same head transposed
    ([[1, 25200, 85]], [1, 3, 640, 640], "detection"),  # YOLOv5s
    ([["batch", 7, "anchors"]], ["batch", 3, "height", "width"], "detection"),  # dynamic-size export
    ([[None, 4], [None], [None]], [1, 3, 320, 320], "detection"),  # torchvision: boxes, scores, labels
    ([[1, 100, 4], [1, 100], [1, 100], [1]], [1, 320, 320, 3], "detection"),  # TF OD API with a count
    ([[1, 1, 640, 640]], [1, 3, 640, 640], "segmentation"),  # DBNet text map
    ([["b", 1, "h", "w"]], ["b", 3, "h", "w"], "segmentation"),
    ([[1, 21, 520, 520]], [1, 3, 520, 520], "segmentation"),
    ([[1, 25, 6625]], [1, 3, 48, 320], None),  # an OCR recogniser's sequence is no YOLO grid
    ([[1, 84, 8000]], [1, 3, 640, 640], None),
])
def test_the_task_follows_the_output_shapes(outputs, input_shape, task):
    assert infer_task(outputs, input_shape) == task


def test_anchor_free_and_anchor_based_heads_are_told_apart_by_the_grid():
    assert yolo_anchor_count(640, 640) == 8400
    assert detection_layout([[1, 84, 8400]], (640, 640)) == "yolo"
    assert detection_layout([[1, 25200, 85]], (640, 640)) == "yolo_objectness"
    assert detection_layout([[1, 84, 8400]], (640, 640), "yolo_objectness") == "yolo_objectness"  # the job says


def test_resolve_task_leaves_auto_to_the_worker_when_the_file_records_no_shapes():
    assert resolve_task("auto", [None], [1, 3, 224, 224]) == "auto"
    assert resolve_task("auto", [[1, 10]], [1, 1, 8, 8]) == "classification"
    assert resolve_task("classification", [[1, 84, 8400]], [1, 3, 640, 640]) == "classification"


def test_a_detection_job_on_a_classifier_is_refused_with_the_outputs_named():
    with pytest.raises(InvalidInput) as err:
        resolve_task("detection", [[1, 1000]], [1, 3, 224, 224])
    assert err.value.code == "unsupported_outputs"
    assert err.value.details == {"outputs": [[1, 1000]]}
    # A layout given by the job is taken as said.
    assert resolve_task("detection", [[1, 1000]], [1, 3, 224, 224], "yolo") == "detection"
