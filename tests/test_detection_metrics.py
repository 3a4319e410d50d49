"""Detection metrics and box labels, in process: decoding every output layout, NMS, agreement
with the float original, COCO mAP checked against pycocotools, and reading YOLO / COCO labels."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from core.datasets import image_sizes, inspect_dataset, list_images, read_box_targets
from core.errors import InvalidInput
from core.schemas import DetectionOptions
from core.tasks import detection_layout
from tests.archives import png_bytes, tar_of, zip_of
from worker.metrics.detection import (
    AgreementTally,
    Detections,
    MeanAveragePrecision,
    batchless_post_nms,
    box_iou,
    class_channel_snr_db,
    decode,
    match_agreement,
    nms,
    scores_are_logits,
    targets_to_input_pixels,
)
from worker.metrics.tasks import DetectionTally

# --------------------------------------------------------------------------------------------
# NMS and decoding


def test_nms_is_class_aware_and_keeps_the_best_score_first():
    boxes = np.array(
        [
            [10, 10, 50, 50],  # 0: best of class 0
            [12, 12, 52, 52],  # 1: IoU ~0.82 with 0, class 0 -> suppressed
            [12, 12, 52, 52],  # 2: same place, class 1 -> kept
            [100, 100, 140, 140],  # 3: alone -> kept
            [30, 10, 70, 50],  # 4: IoU 1/3 with 0 -> kept at 0.45
        ],
        dtype=float,
    )
    scores = np.array([0.9, 0.95, 0.5, 0.3, 0.8])
    labels = np.array([0, 0, 1, 0, 0])
    assert nms(boxes, scores, labels, 0.45).tolist() == [1, 4, 2, 3]
    assert nms(boxes, scores, labels, 0.45, max_keep=2).tolist() == [1, 4]
    # At 0.3 box 4 goes too (IoU 0.35 with box 1).
    assert nms(boxes, scores, labels, 0.3).tolist() == [1, 2, 3]


def test_nms_never_keeps_non_finite_boxes():
    boxes = np.array([[0, 0, 10, 10], [np.nan, 0, 10, 10], [20, 20, 30, 30]], dtype=float)
    assert nms(boxes, np.array([0.5, 0.9, np.nan]), np.zeros(3), 0.5).tolist() == [0]
    assert nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 0.5).tolist() == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_capped_nms_keeps_what_uncapped_nms_keeps_first(seed):
    """The cap reads candidates in blocks; crowded boxes make it read past the first block."""
    rng = np.random.default_rng(seed)
    n = 3000
    xy = rng.uniform(0, 150 if seed else 1000, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 60, (n, 2))], axis=1)
    scores, labels = rng.random(n).round(2), rng.integers(0, 3, n)
    full = nms(boxes, scores, labels, 0.5)
    for cap in (1, 40, 250, 2500):
        np.testing.assert_array_equal(nms(boxes, scores, labels, 0.5, max_keep=cap), full[:cap])


def _raw_head(classes: int = 3, anchors: int = 40) -> np.ndarray:
    """(1, A, 4 + C) anchors-first YOLO head with four interesting anchors, zeros elsewhere."""
    head = np.zeros((1, anchors, 4 + classes), dtype=np.float32)
    head[0, 0, :4] = [50, 60, 20, 30]  # cx cy w h -> xyxy 40 45 60 75
    head[0, 0, 4 + 1] = 0.9
    head[0, 1, :4] = [51, 60, 20, 30]  # the same object one pixel over: suppressed
    head[0, 1, 4 + 1] = 0.8
    head[0, 2, :4] = [50, 60, 20, 30]  # the same place, another class: kept
    head[0, 2, 4 + 2] = 0.7
    head[0, 3, :4] = [200, 200, 10, 10]  # under the threshold
    head[0, 3, 4 + 0] = 0.1
    return head


def _assert_two_detections(dets: list[Detections], scores=(0.9, 0.7)):
    assert len(dets) == 1
    d = dets[0]
    np.testing.assert_allclose(d.boxes, [[40, 45, 60, 75], [40, 45, 60, 75]])
    np.testing.assert_allclose(d.scores, scores, rtol=1e-6)
    assert d.labels.tolist() == [1, 2]


def test_decode_yolo_anchors_first_and_channels_first_agree():
    head = _raw_head()
    _assert_two_detections(decode([head], "yolo"))
    _assert_two_detections(decode([head.transpose(0, 2, 1)], "yolo"))


def test_decode_yolo_xyxy_boxes_and_logits():
    head = _raw_head().astype(np.float64)
    xyxy = head.copy()
    xyxy[..., :4] = np.concatenate([head[..., :2] - head[..., 2:4] / 2, head[..., :2] + head[..., 2:4] / 2], axis=-1)
    _assert_two_detections(decode([xyxy], "yolo", box_format="xyxy"))
    # Logits: values outside 0..1 mean the sigmoid was not applied in the graph.
    probs = np.clip(head[..., 4:], 1e-6, 1 - 1e-6)
    head[..., 4:] = np.log(probs / (1 - probs))
    _assert_two_detections(decode([head], "yolo"))


def test_decode_batches_are_per_image():
    head = np.concatenate([_raw_head(), np.zeros_like(_raw_head())])
    dets = decode([head.transpose(0, 2, 1)], "yolo")
    assert [len(d) for d in dets] == [2, 0]


def test_decode_yolo_objectness_multiplies_scores():
    head = np.zeros((1, 30, 5 + 2), dtype=np.float32)
    head[0, 0] = [20, 20, 10, 10, 0.5, 0.8, 0.1]  # 0.40 -> kept, class 0
    head[0, 1] = [80, 80, 10, 10, 0.2, 0.1, 0.9]  # 0.18 -> under 0.25
    head[0, 2] = [50, 50, 10, 10, 1.0, 0.1, 0.3]  # 0.30 -> kept, class 1
    for layout_tensor in (head, head.transpose(0, 2, 1)):
        (d,) = decode([layout_tensor], "yolo_objectness")
        np.testing.assert_allclose(d.scores, [0.4, 0.3], rtol=1e-6)
        assert d.labels.tolist() == [0, 1]
        np.testing.assert_allclose(d.boxes, [[15, 15, 25, 25], [45, 45, 55, 55]])


def test_decode_post_nms_batched_with_padding_and_max_detections():
    boxes = np.zeros((2, 4, 4), np.float32)
    boxes[0, :3] = [[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30]]
    boxes[1, 0] = [1, 2, 3, 4]
    scores = np.array([[0.9, 0.6, 0.3, 0.0], [0.5, 0.0, 0.0, 0.0]], np.float32)
    labels = np.array([[1, 1, 0, 0], [2, 0, 0, 0]], np.int64)
    # Torchvision order: boxes, labels, scores. Overlapping boxes stay: the model did its NMS.
    dets = decode([boxes, labels, scores], "post_nms", conf_threshold=0.25)
    assert [len(d) for d in dets] == [3, 1]
    assert dets[0].labels.tolist() == [1, 1, 0] and dets[1].labels.tolist() == [2]
    np.testing.assert_allclose(dets[1].boxes, [[1, 2, 3, 4]])
    capped = decode([boxes, scores, labels], "post_nms", conf_threshold=0.25, max_detections=2)
    assert [len(d) for d in capped] == [2, 1]
    # Padding (score 0) never counts, even at a zero threshold.
    assert [len(d) for d in decode([boxes, labels, scores], "post_nms", conf_threshold=0.0)] == [3, 1]


def test_decode_post_nms_with_a_count_ignores_rows_past_it():
    boxes = np.tile(np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32), (2, 1, 1))
    scores = np.full((2, 3), 0.9, np.float32)
    classes = np.array([[3.0, 1.0, 2.0], [0.0, 0.0, 5.0]], np.float32)  # TensorFlow: float classes
    count = np.array([2.0, 1.0], np.float32)
    dets = decode([boxes, classes, scores, count], "post_nms")
    assert [len(d) for d in dets] == [2, 1]
    assert sorted(dets[0].labels.tolist()) == [1, 3] and dets[1].labels.tolist() == [0]
    dets = decode([boxes, scores, classes, count.reshape(2, 1).astype(np.int32)], "post_nms")
    assert [len(d) for d in dets] == [2, 1]


def test_decode_post_nms_batchless_and_single_tensor():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    (d,) = decode([boxes, np.array([0.8, 0.4], np.float32), np.array([4, 7])], "post_nms")
    assert d.labels.tolist() == [4, 7]
    np.testing.assert_allclose(d.scores, [0.8, 0.4], rtol=1e-6)
    # NMS-free exports (YOLOv10, YOLO26): (N, K, 6) rows of x1 y1 x2 y2 score label.
    rows = np.zeros((1, 300, 6), np.float32)
    rows[0, 0] = [0, 0, 10, 10, 0.8, 4]
    rows[0, 1] = [20, 20, 30, 30, 0.3, 7]
    (d,) = decode([rows], "post_nms")
    assert d.labels.tolist() == [4, 7]
    np.testing.assert_allclose(d.boxes, [[0, 0, 10, 10], [20, 20, 30, 30]])


def test_decode_boxes_with_a_class_score_matrix_runs_nms():
    boxes = np.array([[[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]]], np.float32)
    class_scores = np.array([[[0.9, 0.1], [0.8, 0.1], [0.1, 0.7]]], np.float32)
    (d,) = decode([boxes, class_scores], "post_nms")
    assert d.labels.tolist() == [0, 1]
    np.testing.assert_allclose(d.scores, [0.9, 0.7], rtol=1e-6)


@pytest.mark.parametrize(
    ("shapes", "input_hw", "expected"),
    [
        ([(1, 84, 8400)], (640, 640), "yolo"),  # YOLOv8/11 COCO
        ([(1, 8400, 84)], (640, 640), "yolo"),  # transposed export
        ([(1, 25200, 85)], (640, 640), "yolo_objectness"),  # YOLOv5/v7
        ([(1, 7, 336)], (128, 128), "yolo"),
        ([(1, 1008, 8)], (128, 128), "yolo_objectness"),
        ([(100, 4), (100,), (100,)], (800, 800), "post_nms"),  # torchvision Faster R-CNN
        ([(1, 100, 4), (1, 100), (1, 100), (1,)], (320, 320), "post_nms"),  # TF with a count
        ([(1, 300, 6)], (640, 640), "post_nms"),  # YOLOv10 / YOLO26 end-to-end
        ([("batch", 84, 8400)], (640, 640), "yolo"),
        ([(1, 1000)], (224, 224), None),
        ([(1, 1000, 1, 1)], (224, 224), None),
        ([(1, 21, 520, 520)], (520, 520), None),
        ([(1, 3, 4)], (64, 64), None),
    ],
)
def test_layouts_of_real_world_shapes(shapes, input_hw, expected):
    """The layout rule is core.tasks' (one for the API and the worker); decode reads every layout it names."""
    assert detection_layout(shapes, input_hw) == expected


# --------------------------------------------------------------------------------------------
# Agreement with the float original


def _dets(rows) -> Detections:
    rows = np.asarray(rows, dtype=float).reshape(-1, 6)
    return Detections(rows[:, :4], rows[:, 4], rows[:, 5].astype(int))


REFERENCE = [_dets([[0, 0, 10, 10, 0.9, 1], [20, 20, 40, 40, 0.8, 2]]), _dets([[5, 5, 25, 25, 0.7, 0]])]


def test_identical_detections_agree_fully():
    r = match_agreement(REFERENCE, REFERENCE)
    assert r == {
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "mean_iou": 1.0,
        "score_drift": 0.0,
        "reference_detections": 3,
        "candidate_detections": 3,
    }
    empty = match_agreement([Detections.empty()], [Detections.empty()])
    assert empty["f1"] == 1.0 and empty["reference_detections"] == 0


def test_a_box_shifted_below_iou_half_is_a_miss_and_a_false_alarm():
    candidate = [_dets([[0, 0, 10, 10, 0.85, 1], [30, 20, 50, 40, 0.8, 2]]), REFERENCE[1]]  # IoU 1/3
    r = match_agreement(REFERENCE, candidate)
    assert (r["precision"], r["recall"], r["f1"]) == (2 / 3, 2 / 3, 2 / 3)
    assert r["mean_iou"] == 1.0
    assert r["score_drift"] == pytest.approx(0.05 / 2)
    # Just above IoU 0.5 it is matched, and its IoU shows in the mean.
    candidate[0] = _dets([[0, 0, 10, 10, 0.9, 1], [25, 20, 45, 40, 0.8, 2]])  # IoU 0.6
    r = match_agreement(REFERENCE, candidate)
    assert r["f1"] == 1.0 and r["mean_iou"] == pytest.approx((1 + 0.6 + 1) / 3)


def test_a_class_swap_is_not_matched():
    candidate = [_dets([[0, 0, 10, 10, 0.9, 2], [20, 20, 40, 40, 0.8, 2]]), REFERENCE[1]]
    r = match_agreement(REFERENCE, candidate)
    assert (r["precision"], r["recall"]) == (2 / 3, 2 / 3)


def test_tally_over_batches_equals_one_call_and_greedy_takes_best_score_first():
    tally = AgreementTally()
    tally.add(REFERENCE[:1], REFERENCE[:1])
    tally.add(REFERENCE[1:], [Detections.empty()])
    assert tally.result() == match_agreement(REFERENCE, [REFERENCE[0], Detections.empty()])
    assert tally.result()["recall"] == 2 / 3 and tally.result()["precision"] == 1.0
    # Two candidates on one reference box: one matches, the other is a false alarm.
    ref = [_dets([[0, 0, 10, 10, 0.9, 0]])]
    cand = [_dets([[0, 0, 10, 9, 0.5, 0], [0, 0, 10, 10, 0.6, 0]])]
    r = match_agreement(ref, cand)
    assert (r["precision"], r["recall"], r["mean_iou"]) == (0.5, 1.0, 1.0)


# --------------------------------------------------------------------------------------------
# COCO mAP, checked against pycocotools


def _coco_fixture(seed: int = 7, images: int = 24, classes: int = 4):
    rng = np.random.default_rng(seed)
    targets, predictions = [], []
    for i in range(images):
        m = int(rng.integers(0, 7)) if i != 3 else 0  # image 3 has no objects
        xy = rng.uniform(0, 200, (m, 2))
        wh = rng.uniform(8, 80, (m, 2))
        gt = Detections(np.concatenate([xy, xy + wh], 1), np.ones(m), rng.integers(0, classes, m))
        targets.append(gt)
        # Found objects, jittered (some well, some barely, some missed), a few with the wrong class,
        # and false alarms, one class (3) never in the targets' image 0.
        found = rng.random(m) < 0.8
        jitter = rng.normal(0, rng.choice([1.0, 6.0, 15.0], m)[:, None], (m, 4))
        labels = np.where(rng.random(m) < 0.1, (gt.labels + 1) % classes, gt.labels)
        p_boxes = [(gt.boxes + jitter)[found]]
        p_labels = [labels[found]]
        extra = int(rng.integers(0, 5))
        fxy = rng.uniform(0, 220, (extra, 2))
        p_boxes.append(np.concatenate([fxy, fxy + rng.uniform(5, 60, (extra, 2))], 1))
        p_labels.append(rng.integers(0, classes + 1, extra))
        if i == 5:  # more than COCO's 100 detections of one class in one image
            cxy = rng.uniform(0, 200, (130, 2))
            p_boxes.append(np.concatenate([cxy, cxy + 30], 1))
            p_labels.append(np.full(130, 2))
        boxes = np.concatenate(p_boxes)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        # Found objects mostly outscore false alarms; rounding makes ties, whose order COCO fixes.
        hits = int(found.sum())
        scores = np.concatenate([rng.uniform(0.3, 1.0, hits), rng.uniform(0.0, 0.6, len(boxes) - hits)])
        predictions.append(Detections(boxes, scores.round(2), np.concatenate(p_labels)))
    return predictions, targets


def _pycocotools_map(predictions, targets, classes: int = 5) -> tuple[float, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    anns, results = [], []
    for image_id, (pred, gt) in enumerate(zip(predictions, targets, strict=True), start=1):
        for box, label in zip(gt.boxes, gt.labels, strict=True):
            bb = xywh(box)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": bb,
                    "area": bb[2] * bb[3],
                    "iscrowd": 0,
                }
            )
        for box, label, score in zip(pred.boxes, pred.labels, pred.scores, strict=True):
            results.append(
                {"image_id": image_id, "category_id": int(label) + 1, "bbox": xywh(box), "score": float(score)}
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt_api = COCO()
        gt_api.dataset = {
            "images": [{"id": i, "width": 300, "height": 300} for i in range(1, len(targets) + 1)],
            "annotations": anns,
            "categories": [{"id": c + 1, "name": str(c)} for c in range(classes)],
        }
        gt_api.createIndex()
        evaluator = COCOeval(gt_api, gt_api.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[1]), float(evaluator.stats[0])


@pytest.mark.parametrize("seed", [7, 11])
def test_map_equals_pycocotools(seed):
    predictions, targets = _coco_fixture(seed)
    metric = MeanAveragePrecision()
    for start in range(0, len(targets), 5):  # batches, as the evaluate pass feeds it
        metric.add(predictions[start : start + 5], targets[start : start + 5])
    result = metric.result()
    map50, map50_95 = _pycocotools_map(predictions, targets)
    assert 0.1 < map50_95 < map50 < 0.9  # the fixture is neither trivial nor hopeless
    assert result["map50"] == pytest.approx(map50, abs=1e-6)
    assert result["map50_95"] == pytest.approx(map50_95, abs=1e-6)
    assert result["images"] == len(targets) and result["targets"] == sum(len(t) for t in targets)


def test_map_of_perfect_predictions_is_one_and_of_none_is_zero():
    _, targets = _coco_fixture()
    perfect = MeanAveragePrecision()
    perfect.add(targets, targets)
    assert perfect.result()["map50"] == pytest.approx(1.0) and perfect.result()["map50_95"] == pytest.approx(1.0)
    blind = MeanAveragePrecision()
    blind.add([Detections.empty()] * len(targets), targets)
    assert blind.result()["map50_95"] == 0.0
    nothing = MeanAveragePrecision()
    nothing.add([Detections.empty()], [Detections.empty()])
    assert nothing.result()["map50"] is None


# --------------------------------------------------------------------------------------------
# Raw-head fidelity and label geometry


def test_class_channel_snr_finds_the_damaged_class():
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.uniform(0, 640, (2, 4, 500)), rng.uniform(0, 1, (2, 3, 500))], axis=1)
    cand = ref.copy()
    cand[:, 4 + 2] += rng.normal(0, 0.1, (2, 500))  # class 2 only
    cand[:, :4] += rng.normal(0, 1.0, (2, 4, 500))
    r = class_channel_snr_db(ref, cand, "yolo")
    class2 = 10 * np.log10((ref[:, 6] ** 2).sum() / ((ref[:, 6] - cand[:, 6]) ** 2).sum())
    assert r["worst_class_channel_snr_db"] == pytest.approx(class2)
    assert r["box_snr_db"] > 40 > r["worst_class_channel_snr_db"]
    assert class_channel_snr_db(ref, ref, "yolo")["worst_class_channel_snr_db"] == float("inf")
    assert class_channel_snr_db(ref, cand, "post_nms") == {}


def test_an_anchors_first_head_is_measured_per_channel_with_objectness_as_a_score_channel():
    """(N, A, 5+C): the channel axis is the shorter one, not axis 1 (that would be one SNR per anchor)."""
    rng = np.random.default_rng(1)
    ref = np.concatenate([rng.uniform(0, 640, (2, 500, 4)), rng.uniform(0.01, 1, (2, 500, 1 + 3))], axis=2)
    cand = ref.copy()
    cand[..., 4] *= 0.5  # objectness halved: 10 log10(4) dB on that channel, every other channel exact
    anchors_first = class_channel_snr_db(ref, cand, "yolo_objectness")
    channels_first = class_channel_snr_db(ref.transpose(0, 2, 1), cand.transpose(0, 2, 1), "yolo_objectness")
    assert anchors_first == channels_first
    assert anchors_first["worst_class_channel_snr_db"] == pytest.approx(10 * np.log10(4))
    assert anchors_first["box_snr_db"] == float("inf")


def test_a_head_that_turns_nan_has_no_snr_left():
    ref = np.concatenate([np.full((1, 4, 50), 100.0), np.full((1, 3, 50), 0.5)], axis=1)
    cand = ref.copy()
    cand[0, 5, 7] = np.nan
    cand[0, 0, 3] = np.inf
    assert class_channel_snr_db(ref, cand, "yolo") == {
        "worst_class_channel_snr_db": float("-inf"),
        "box_snr_db": float("-inf"),
    }


def test_logits_are_decided_once_from_the_float_original():
    """An INT8 probability a hair past 1 must not make its whole head read as logits."""
    reference, candidate = _raw_head(), _raw_head()
    candidate[0, 0, 4 + 1] = 1.03
    fp32_says = scores_are_logits([reference], "yolo")
    assert fp32_says is False and scores_are_logits([candidate], "yolo") is True
    assert len(decode([candidate], "yolo")[0]) > 10  # decided per call: every empty anchor squashed to 0.5
    (d,) = decode([candidate], "yolo", scores_are_logits=fp32_says)
    assert d.labels.tolist() == [1, 2] and d.scores[0] == pytest.approx(1.03)
    tally = DetectionTally("yolo", DetectionOptions(), labeled=False)
    tally.add([candidate], [reference])
    assert tally.result()["metric"]["value"] == 1.0  # F1 against FP32's detections


def test_batchless_post_nms_is_told_by_ranks_not_by_counts():
    assert batchless_post_nms([(1, 4), (1,), (1,)])  # one image with exactly one detection
    assert batchless_post_nms([(0, 4), (0,), (0,)]) and batchless_post_nms([(5, 4), (5,), (5,)])
    assert not batchless_post_nms([(1, 1, 4), (1, 1), (1, 1)])
    assert not batchless_post_nms([(1, 100, 4), (1, 100), (1, 100), (1,)])  # TF style, with a count
    assert not batchless_post_nms([(1, 4)])  # a four-class classifier


def test_box_iou():
    np.testing.assert_allclose(
        box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]]), [[1 / 3, 0, 0]]
    )


@pytest.mark.parametrize("resize", [None, 96])
def test_targets_follow_the_image_preprocessing(resize):
    """A white rectangle drawn in the original lands where targets_to_input_pixels puts its box,
    through worker/data.py's own resize (and crop)."""
    from PIL import Image

    from core.schemas import Preprocessing
    from worker.data import _image_to_array

    image = np.zeros((150, 240, 3), np.uint8)
    image[30:90, 100:180] = 255  # box x 100..180, y 30..90
    image[120:140, 2:20] = 255  # cropped away when the sides are cut
    arr = _image_to_array(
        Image.fromarray(image),
        height=64,
        width=80,
        channels=3,
        prep=Preprocessing(resize=resize, mean=[0, 0, 0], std=[1, 1, 1]),
    )
    boxes = targets_to_input_pixels(
        np.array([[1, 100, 30, 180, 90], [0, 2, 120, 20, 140]]), (240, 150), (80, 64), resize
    )
    ys, xs = np.nonzero(arr[..., 0] > 0.5)
    ys, xs = ys[xs > 15], xs[xs > 15]  # the big rectangle only: the small one maps left of x=7
    # The rectangle's half-lit edge pixels round either way: within a pixel.
    np.testing.assert_allclose(boxes[0], [1, xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.0)
    if resize:  # 240x150 -> 154x96, cropped to 80x64 from (37, 16): the left box is gone
        assert boxes.shape == (1, 5)
        np.testing.assert_allclose(
            boxes[0, 1:], [100 * 154 / 240 - 37, 30 * 96 / 150 - 16, 180 * 154 / 240 - 37, 90 * 96 / 150 - 16]
        )
    else:
        assert boxes.shape == (2, 5)
    four = targets_to_input_pixels(np.array([[0, 0, 240, 150]]), (240, 150), (80, 64), None)
    np.testing.assert_allclose(four, [[0, 0, 80, 64]])


def test_letterboxed_targets_follow_the_letterboxed_image():
    """YOLO's letterbox: 240x150 fits 80x64 at 1/3 (80x50), centred 7 px down on grey padding; the
    rectangle lands where the box mapping says, and the padding is the grey Ultralytics uses."""
    from PIL import Image

    from core.schemas import Preprocessing
    from worker.data import LETTERBOX_FILL, _image_to_array

    image = np.zeros((150, 240, 3), np.uint8)
    image[30:90, 100:180] = 255
    arr = _image_to_array(
        Image.fromarray(image),
        height=64,
        width=80,
        channels=3,
        prep=Preprocessing(letterbox=True, mean=[0, 0, 0], std=[1, 1, 1]),
    )
    assert arr.shape == (64, 80, 3)
    np.testing.assert_allclose(arr[0, 0], LETTERBOX_FILL / 255, atol=1e-6)  # a padded row
    box = targets_to_input_pixels(np.array([[1, 100, 30, 180, 90]]), (240, 150), (80, 64), None, letterbox=True)
    np.testing.assert_allclose(box[0, 1:], [100 / 3, 30 / 3 + 7, 180 / 3, 90 / 3 + 7])
    ys, xs = np.nonzero(arr[..., 0] > 0.9)
    np.testing.assert_allclose(box[0, 1:], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.0)


def test_letterbox_and_resize_are_one_choice():
    from pydantic import ValidationError

    from core.schemas import Preprocessing

    with pytest.raises(ValidationError, match="resize .* or letterbox"):
        Preprocessing(resize=256, letterbox=True)


# --------------------------------------------------------------------------------------------
# Box labels in dataset archives


def _yolo_files() -> dict[str, bytes | str]:
    return {
        "data/data.yaml": "path: .\nnames:\n  0: person\n  1: car\n  2: dog\n",
        "data/images/a.png": png_bytes(200, 100),
        "data/labels/a.txt": "0 0.5 0.5 0.2 0.4\n\n2 0.1 0.2 0.2 0.2\n",
        "data/images/b.jpg": png_bytes(100, 50),
        "data/labels/b.txt": "1 0.25 0.5 0.3 0.4 0.35 0.8\n",  # a polygon: its bounding box counts
        "data/images/c.png": png_bytes(64, 64),  # no label file: no objects
        "data/labels/orphan.txt": "0 0.5 0.5 0.1 0.1\n",  # no image: ignored
    }


@pytest.mark.parametrize("pack", [zip_of, tar_of])
def test_yolo_labels_are_read_in_original_pixels(tmp_path, pack):
    path = pack(tmp_path / ("d.zip" if pack is zip_of else "d.tar.gz"), _yolo_files())
    info = inspect_dataset(path)
    assert (info.label_type, info.labeled, info.num_samples, info.class_names) == (
        "boxes",
        True,
        3,
        ["person", "car", "dog"],
    )
    listing = list_images(path, info.format)
    assert listing.labels is None and listing.members == ["data/images/a.png", "data/images/b.jpg", "data/images/c.png"]
    targets = read_box_targets(path, info.format)
    np.testing.assert_allclose(targets["data/images/a.png"], [[0, 80, 30, 120, 70], [2, 0, 10, 40, 30]])
    np.testing.assert_allclose(targets["data/images/b.jpg"], [[1, 25, 20, 35, 40]])
    assert targets["data/images/c.png"].shape == (0, 5)
    assert image_sizes(path, info.format, listing.members) == [(200, 100), (100, 50), (64, 64)]


def test_yolo_class_names_from_classes_txt_or_ids(tmp_path):
    files = {"images/a.png": png_bytes(32, 32), "labels/a.txt": "4 0.5 0.5 0.5 0.5\n"}
    assert inspect_dataset(zip_of(tmp_path / "ids.zip", files)).class_names == ["0", "1", "2", "3", "4"]
    files["classes.txt"] = "cat\ndog\n"
    with pytest.raises(InvalidInput) as err:
        inspect_dataset(zip_of(tmp_path / "short.zip", files))
    assert err.value.code == "invalid_labels" and err.value.details["member"] == "labels/a.txt"
    files["labels/a.txt"] = "1 0.5 0.5 0.5 0.5\n"
    assert inspect_dataset(zip_of(tmp_path / "named.zip", files)).class_names == ["cat", "dog"]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("0 0.5 0.5 0.2", "values"),
        ("cat 0.5 0.5 0.2 0.2", "not numbers"),
        ("-1 0.5 0.5 0.2 0.2", "class index"),
        ("0 0.5 0.5 1.2 0.2", "outside 0..1"),
        ("0 120 80 20 20", "outside 0..1"),  # pixels, not normalized
    ],
)
def test_bad_yolo_lines_are_a_422_naming_the_file(tmp_path, line, why):
    files = {
        "images/a.png": png_bytes(32, 32),
        "labels/a.txt": "0 0.5 0.5 0.2 0.2\n",
        "images/b.png": png_bytes(32, 32),
        "labels/b.txt": "1 0.5 0.5 0.2 0.2\n" + line + "\n",
    }
    with pytest.raises(InvalidInput) as err:
        inspect_dataset(zip_of(tmp_path / "bad.zip", files))
    assert err.value.code == "invalid_labels"
    assert err.value.details["member"] == "labels/b.txt" and err.value.details["line"] == 2
    assert why in err.value.message


def test_a_hair_outside_zero_one_is_clipped_not_refused(tmp_path):
    path = zip_of(tmp_path / "ok.zip", {"images/a.png": png_bytes(100, 100), "labels/a.txt": "0 0.9 0.5 0.2005 0.2\n"})
    np.testing.assert_allclose(read_box_targets(path, "zip")["images/a.png"], [[0, 79.975, 40, 100, 60]])


def _coco_doc() -> dict:
    return {
        "images": [
            {"id": 10, "file_name": "images/x.png", "width": 100, "height": 80},
            {"id": 11, "file_name": "y.png", "width": 50, "height": 50},
            {"id": 12, "file_name": "not_in_the_zip.png", "width": 50, "height": 50},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 18, "bbox": [10, 20, 30, 40], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 1, "bbox": [90, 70, 20, 20]},  # clipped to the image
            {"id": 3, "image_id": 10, "category_id": 1, "bbox": [0, 0, 50, 50], "iscrowd": 1},  # a crowd: not read
            {"id": 4, "image_id": 12, "category_id": 3, "bbox": [0, 0, 5, 5]},
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }


def test_coco_labels_map_category_ids_to_contiguous_classes(tmp_path):
    path = zip_of(
        tmp_path / "coco.zip",
        {
            "instances.json": json.dumps(_coco_doc()),
            "images/x.png": png_bytes(100, 80),
            "images/y.png": png_bytes(50, 50),
        },
    )
    info = inspect_dataset(path)
    assert (info.label_type, info.num_samples, info.num_classes, info.class_names) == (
        "boxes",
        2,
        3,
        ["person", "car", "dog"],
    )
    targets = read_box_targets(path, "zip")
    assert sorted(targets) == ["images/x.png", "images/y.png"]
    np.testing.assert_allclose(targets["images/x.png"], [[2, 10, 20, 40, 60], [0, 90, 70, 100, 80]])
    assert targets["images/y.png"].shape == (0, 5)
    as_detections = Detections.from_targets(targets["images/x.png"])
    assert as_detections.labels.tolist() == [2, 0] and as_detections.boxes.shape == (2, 4)


def test_coco_in_a_wrapping_folder_as_roboflow_exports_it(tmp_path):
    doc = _coco_doc()
    doc["images"][0]["file_name"] = "x.png"
    path = tar_of(
        tmp_path / "rf.tar.gz",
        {
            "train/_annotations.coco.json": json.dumps(doc),
            "train/x.png": png_bytes(100, 80),
            "train/y.png": png_bytes(50, 50),
        },
    )
    targets = read_box_targets(path, "tar")
    np.testing.assert_allclose(targets["train/x.png"][:, 0], [2, 0])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            lambda d: d["annotations"].append({"id": 9, "image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1]}),
            "image_id 99",
        ),
        (
            lambda d: d["annotations"].append({"id": 9, "image_id": 10, "category_id": 7, "bbox": [0, 0, 1, 1]}),
            "category_id 7",
        ),
        (lambda d: d["annotations"].append({"id": 9, "image_id": 10, "category_id": 1, "bbox": [0, 0, -1, 1]}), "bbox"),
        (lambda d: d.update(images=[{"id": 1, "file_name": "elsewhere.png"}], annotations=[]), "none of the 1"),
    ],
)
def test_bad_coco_annotations_are_a_422_naming_the_file(tmp_path, change, reason):
    doc = _coco_doc()
    change(doc)
    path = zip_of(
        tmp_path / "coco.zip",
        {"labels.json": json.dumps(doc), "images/x.png": png_bytes(100, 80), "images/y.png": png_bytes(50, 50)},
    )
    with pytest.raises(InvalidInput) as err:
        inspect_dataset(path)
    assert err.value.code == "invalid_labels" and err.value.details["member"] == "labels.json"
    assert reason in err.value.message


def test_other_archives_keep_their_meaning(tmp_path):
    png = png_bytes(16, 16)
    folders = zip_of(tmp_path / "cls.zip", {"cat/1.png": png, "dog/2.png": png, "notes.json": '{"a": 1}'})
    info = inspect_dataset(folders)
    assert (info.label_type, info.class_names) == ("classes", ["cat", "dog"])
    flat = inspect_dataset(zip_of(tmp_path / "flat.zip", {"images/1.png": png, "images/2.png": png}))
    assert (flat.label_type, flat.labeled) == (None, False)
    with pytest.raises(InvalidInput) as err:
        read_box_targets(folders, "zip")
    assert err.value.code == "no_box_labels"
