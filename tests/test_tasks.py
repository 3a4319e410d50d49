"""The task a job's metric follows, decided from output shapes (pure, in process)."""

from __future__ import annotations

import pytest

from core.datasets import model_layout
from core.errors import InvalidInput
from core.tasks import (
    detection_layout,
    infer_task,
    input_hw,
    layout_fits,
    resolve_measured_task,
    resolve_task,
    yolo_anchor_count,
)


@pytest.mark.parametrize(
    ("outputs", "input_shape", "task"),
    [
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
    ],
)
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
    # A layout given by the job must be one the outputs can hold.
    with pytest.raises(InvalidInput) as err:
        resolve_task("detection", [[1, 1000]], [1, 3, 224, 224], "yolo")
    assert err.value.code == "detection_layout_mismatch"
    assert err.value.details == {"layout": "yolo", "outputs": [[1, 1000]]}
    assert resolve_task("detection", [[1, 84, 8000]], [1, 3, 640, 640], "yolo") == "detection"  # no grid, said


def test_a_classifier_with_an_auxiliary_box_output_is_no_detector():
    # (N, 4) beside (N, C): e.g. a classifier that also regresses one box; no (N,) scores partner.
    assert detection_layout([[1, 1000], [1, 4]], (224, 224)) is None
    assert infer_task([[1, 1000], [1, 4]], [1, 3, 224, 224]) == "classification"
    assert infer_task([["b", 10], ["b", 4]], ["b", 3, 64, 64]) == "classification"
    # Boxes with their scores partner stay post-NMS, batch-first, batch-less or with per-class scores.
    assert detection_layout([[1, 100, 4], [1, 100], [1, 100]]) == "post_nms"
    assert detection_layout([["n", 4], ["n"], ["n"]]) == "post_nms"
    assert detection_layout([[1, 100, 4], [1, 100, 80]]) == "post_nms"
    assert detection_layout([[1, 100, 4], [1, 50]]) is None  # 50 scores for 100 boxes: no partner
    assert not layout_fits("post_nms", [[1, 1000], [1, 4]])


@pytest.mark.parametrize(
    ("shape", "layout", "hw"),
    [
        ([1, 3, 224, 224], "NCHW", (224, 224)),
        ([1, 224, 320, 3], "NHWC", (224, 320)),
        ([1, 1, 28, 28], "NCHW", (28, 28)),
        (["b", 3, "h", "w"], "NCHW", ("h", "w")),
        ([1, 4, 64, 64], "raw", None),  # images convert to 1 or 3 channels only: both rules agree it is no image
        ([1, 10], "raw", None),
    ],
)
def test_one_channel_axis_rule_for_the_dataset_reader_and_the_task(shape, layout, hw):
    assert model_layout(shape) == layout
    assert input_hw(shape) == hw


def test_measured_task_from_real_outputs():
    assert resolve_measured_task("auto", [[2, 84, 8400]], [2, 3, 640, 640]) == ("detection", "yolo", None)
    assert resolve_measured_task("classification", [[2, 84, 8400]], [2, 3, 640, 640]) == ("classification", None, None)
    task, layout, note = resolve_measured_task("auto", [[2, 25, 6625]], [2, 3, 48, 320])
    assert (task, layout) == ("classification", None)
    assert "[[2, 25, 6625]]" in note and "give the job's task" in note
    # The job's layout wins when the shapes can hold it; it also makes an auto job a detection job.
    assert resolve_measured_task("detection", [[1, 84, 8400]], [1, 3, 640, 640], "yolo_objectness")[1] == (
        "yolo_objectness"
    )
    assert resolve_measured_task("auto", [[1, 100, 6]], [1, 3, 640, 640], "post_nms") == ("detection", "post_nms", None)


@pytest.mark.parametrize(
    ("outputs", "hint", "code"),
    [
        ([[2, 1000]], "auto", "unsupported_outputs"),
        ([[2, 1000], [2, 4]], "auto", "unsupported_outputs"),
        ([[2, 1000]], "yolo", "detection_layout_mismatch"),
        ([[1, 84, 8400]], "post_nms", "detection_layout_mismatch"),
        ([[1, 8400, 5]], "yolo_objectness", "detection_layout_mismatch"),  # 5 columns hold no class after obj
    ],
)
def test_measured_detection_that_no_layout_reads_is_refused_with_the_shapes(outputs, hint, code):
    with pytest.raises(InvalidInput) as err:
        resolve_measured_task("detection", outputs, [2, 3, 224, 224], hint)
    assert err.value.code == code
    assert err.value.details["outputs"] == outputs
