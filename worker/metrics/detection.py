"""Detection metrics: decode a detector's outputs into boxes, and compare boxes.

Pure numpy, so the evaluate pass can score any runtime's outputs the same way. Two questions are
answered here: does a candidate artifact find the boxes its float original finds (agreement,
needs no labels), and how good are its boxes against labels (COCO mAP, computed exactly as
pycocotools computes it for bounding boxes, area "all", 100 detections per image and class).

Layouts of the outputs (see the project's detection contract):

* ``yolo``: one ``(N, 4 + C, A)`` or ``(N, A, 4 + C)`` tensor, boxes then class scores.
* ``yolo_objectness``: ``(N, A, 5 + C)`` or ``(N, 5 + C, A)``; score = objectness x class score.
* ``post_nms``: boxes ``(N, K, 4)`` xyxy pixels, scores ``(N, K)``, labels ``(N, K)``, an
  optional count ``(N,)``; a batch-less export drops N. Also read: one ``(N, K, 6)`` tensor
  ``[x1, y1, x2, y2, score, label]`` (NMS-free exports such as YOLOv10 and YOLO26), and boxes
  with a per-class score matrix ``(N, K, C)`` (NMS then runs here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import PassError
from worker.data import letterbox_geometry
from worker.metrics.fidelity import ChannelSums, channel_axis

LAYOUTS = ("yolo", "yolo_objectness", "post_nms")
BOX_FORMATS = ("xywh", "xyxy")
# COCO's grids, exactly as pycocotools builds them: a threshold computed another way can differ
# in the last bit and flip a match that sits on it.
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
COCO_RECALL_POINTS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
COCO_MAX_DETECTIONS = 100
# Anchors kept for NMS at most (as Ultralytics' max_nms): a near-zero threshold on an untrained
# or broken head must not turn NMS quadratic in the anchor count.
MAX_NMS_CANDIDATES = 30_000
# Scores a little outside 0..1 are quantization or FP16 noise on probabilities, not logits:
# squashing them again would make a faithful INT8 candidate look broken.
PROBABILITY_SLACK = 1e-2


@dataclass
class Detections:
    """One image's boxes: ``boxes`` (K, 4) xyxy pixels, ``scores`` (K,), ``labels`` (K,) class indices."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if not (len(self.boxes) == len(self.scores) == len(self.labels)):
            raise ValueError(
                f"boxes, scores and labels disagree on the count: {len(self.boxes)}, {len(self.scores)}, "
                f"{len(self.labels)}"
            )

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))

    @classmethod
    def from_targets(cls, targets: np.ndarray) -> Detections:
        """Labels ``(M, 5)`` ``[cls, x1, y1, x2, y2]`` (core.datasets.read_box_targets) as Detections."""
        targets = np.asarray(targets, dtype=np.float64).reshape(-1, 5)
        return cls(targets[:, 1:], np.ones(len(targets)), targets[:, 0].astype(np.int64))


# --------------------------------------------------------------------------------------------
# Geometry


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (K, 4) with every box in ``b`` (M, 4), both xyxy: (K, M).
    Boxes without area overlap nothing (0, not NaN)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    half = boxes[..., 2:4] / 2
    return np.concatenate([boxes[..., 0:2] - half, boxes[..., 0:2] + half], axis=-1)


def nms(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float, *, max_keep: int | None = None
) -> np.ndarray:
    """Greedy class-aware non-maximum suppression: indices of the kept boxes, best score first.

    A box is dropped when it overlaps a better-scored box of its own class by IoU above
    ``iou_threshold`` (torchvision's rule). Boxes with a non-finite coordinate or score are never
    kept. ``max_keep`` stops early, which bounds the work on heads with thousands of candidates.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    valid = np.flatnonzero(np.isfinite(boxes).all(axis=1) & np.isfinite(scores))
    if valid.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = valid[np.argsort(-scores[valid], kind="stable")]
    b = boxes[order]
    # Classes are moved apart by more than the boxes' whole extent, so one IoU pass is class-aware.
    extent = float(b.max() - b.min()) + 1.0
    lab = labels[order]
    b = b + ((lab - lab.min()) * extent)[:, None]
    x1, y1, x2, y2 = (np.ascontiguousarray(b[:, k]) for k in range(4))
    area = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)

    def overlapping(i, rest: np.ndarray) -> np.ndarray:
        """IoU above the threshold of box(es) ``i`` against ``rest``, as inter > t * union (no
        division; a zero union, two empty boxes, suppresses nothing)."""
        w = np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])
        h = np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])
        inter = np.maximum(w, 0) * np.maximum(h, 0)
        return inter > iou_threshold * (area[i] + area[rest] - inter)

    n = len(order)
    keep: list[int] = []
    # Survivors among the best-scored boxes depend on those boxes alone, so with a cap the
    # candidates are taken in growing blocks: most heads fill the cap from the first block.
    block = n if max_keep is None else max(4 * max_keep, 1024)
    start = 0
    while start < n and (max_keep is None or len(keep) < max_keep):
        stop = min(n, start + block)
        rest = np.arange(start, stop)
        if keep:
            kept = np.asarray(keep)[:, None]
            rest = rest[~overlapping(kept, rest[None, :]).any(axis=0)]
        while rest.size:
            i = rest[0]
            keep.append(i)
            if max_keep is not None and len(keep) >= max_keep:
                break
            rest = rest[1:]
            rest = rest[~overlapping(i, rest)]
        start, block = stop, block * 2
    return order[np.asarray(keep, dtype=np.int64)]


def targets_to_input_pixels(
    boxes_xyxy: np.ndarray,
    image_wh: tuple[int, int],
    input_wh: tuple[int, int],
    resize: int | None,
    *,
    letterbox: bool = False,
) -> np.ndarray:
    """Boxes in an original image's pixels, moved to the model input's pixels the way
    worker/data.py ``_image_to_array`` moves the image: a straight resize to ``input_wh``, or
    (``resize`` set) the shorter side scaled to ``resize`` then a centre crop of ``input_wh``, or
    (``letterbox``) scaled to fit whole and centred on a padded canvas.

    ``boxes_xyxy`` is (M, 4) xyxy, or (M, 5) ``[cls, x1, y1, x2, y2]`` (the class column is
    kept). Boxes are clipped to the input; those left without area are dropped.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64)
    columns = boxes.shape[-1] if boxes.ndim == 2 else 4
    if columns not in (4, 5):
        raise ValueError(f"boxes must be (M, 4) xyxy or (M, 5) [cls, xyxy], got shape {list(boxes.shape)}")
    boxes = boxes.reshape(-1, columns).copy()
    xyxy = boxes[:, columns - 4 :]
    img_w, img_h = (int(v) for v in image_wh)
    in_w, in_h = (int(v) for v in input_wh)
    if letterbox:
        new_w, new_h, left, top = letterbox_geometry((img_w, img_h), (in_w, in_h))
        left, top = -left, -top  # the image moves right and down on its canvas
    elif resize:
        # Mirrors _image_to_array: the resized size is rounded and never below the crop.
        scale = resize / min(img_w, img_h)
        new_w, new_h = max(in_w, round(img_w * scale)), max(in_h, round(img_h * scale))
        left, top = (new_w - in_w) // 2, (new_h - in_h) // 2
    else:
        new_w, new_h, left, top = in_w, in_h, 0, 0
    # PIL's resize maps pixel edges to pixel edges: x' = x * new_w / img_w.
    xyxy[:, [0, 2]] = xyxy[:, [0, 2]] * (new_w / img_w) - left
    xyxy[:, [1, 3]] = xyxy[:, [1, 3]] * (new_h / img_h) - top
    xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, in_w)
    xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, in_h)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    return boxes[keep]


# --------------------------------------------------------------------------------------------
# Layouts


class PerSample(list):
    """Each sample's own outputs (a list of output lists, batch axis 1), when their shapes differ
    between samples: post-NMS detections of a batch-less export (batchless_post_nms). Only the
    detection measures take them."""


def batchless_post_nms(output_shapes: list[tuple[int, ...]]) -> bool:
    """Whether outputs are one image's post-NMS detections with no batch axis (torchvision-style
    exports): boxes (K, 4) beside scores (K,). Decided from the ranks, never from a count: with
    exactly one detection, boxes (1, 4) look like a batch of one."""
    shapes = [tuple(s) for s in output_shapes]
    return any(len(b) == 2 and b[-1] == 4 and any(len(o) == 1 and o[0] == b[0] for o in shapes) for b in shapes)


def _anchor_rows(output: np.ndarray) -> np.ndarray:
    """A raw head as (N, anchors, channels): channels are the shorter axis (fidelity.channel_axis)."""
    out = np.asarray(output)
    if out.ndim == 2:
        out = out[None]
    if out.ndim != 3:
        raise PassError(
            f"a YOLO head is one (N, 4 + C, A) or (N, A, 4 + C) tensor, got shape {list(out.shape)}",
            code="detection_layout_mismatch",
        )
    return out if channel_axis(out.shape) == 2 else out.transpose(0, 2, 1)


def _are_logits(x: np.ndarray) -> bool:
    """Whether scores are logits: any finite value clearly outside 0..1."""
    if not x.size:
        return False
    lo, hi = float(np.min(x)), float(np.max(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = x[np.isfinite(x)]
        if not finite.size:
            return False
        lo, hi = float(finite.min()), float(finite.max())
    return lo < -PROBABILITY_SLACK or hi > 1 + PROBABILITY_SLACK


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # no exp overflow


def _as_probabilities(x: np.ndarray, logits: bool | None = None) -> np.ndarray:
    """Scores as 0..1: logits go through a sigmoid (``logits`` None: decided from ``x``)."""
    x = np.asarray(x)
    if logits is None:
        logits = _are_logits(x)
    return _sigmoid(x) if logits else x.astype(np.float64)


def scores_are_logits(outputs: list[np.ndarray], layout: str) -> bool | None:
    """Whether this output's score tensors (a raw head's class and objectness channels, or a
    post-NMS per-class score matrix) are logits; None when the layout has none to decide.

    Decide it once, from the float original's output, and pass it to ``decode`` for every
    candidate: decided per call, an INT8 candidate whose probabilities round a hair past 1 would be
    squashed again (and one whose logits all land in 0..1 would not be), so its boxes would rank
    differently from FP32's for no fault of their own."""
    if layout in ("yolo", "yolo_objectness"):
        _, class_scores, objectness = _raw_head_parts(outputs[0], layout)
        scores = class_scores if objectness is None else np.concatenate([class_scores, objectness[..., None]], axis=2)
        return _are_logits(scores)
    if layout == "post_nms" and len(outputs) > 1:
        matrix = _class_score_matrix(outputs)
        return None if matrix is None else _are_logits(matrix)
    return None


def _raw_head_parts(output: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(boxes (N, A, 4), class scores (N, A, C), objectness (N, A) or None) of a raw head."""
    rows = _anchor_rows(output)
    first_class = 5 if layout == "yolo_objectness" else 4
    if rows.shape[2] <= first_class:
        raise PassError(
            f"a {layout!r} head needs more than {first_class} channels, got shape {list(rows.shape)}",
            code="detection_layout_mismatch",
        )
    objectness = rows[..., 4] if layout == "yolo_objectness" else None
    return rows[..., :4], rows[..., first_class:], objectness


def _select(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    conf_threshold: float,
    iou_threshold: float | None,
    max_detections: int,
) -> Detections:
    """Thresholded, (optionally) NMS-ed and capped detections of one image."""
    keep = np.flatnonzero((scores > conf_threshold) & np.isfinite(scores) & np.isfinite(boxes).all(axis=1))
    if keep.size > MAX_NMS_CANDIDATES:
        keep = keep[np.argsort(-scores[keep], kind="stable")[:MAX_NMS_CANDIDATES]]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if iou_threshold is None:
        kept = np.argsort(-scores, kind="stable")[:max_detections]
    else:
        kept = nms(boxes, scores, labels, iou_threshold, max_keep=max_detections)
    return Detections(boxes[kept], scores[kept], labels[kept])


def _decode_raw_head(
    output: np.ndarray, layout: str, *, box_format: str, logits: bool | None, **select: Any
) -> list[Detections]:
    raw_boxes, class_scores, objectness = _raw_head_parts(output, layout)
    if logits is None:
        logits = scores_are_logits([output], layout)
    # The sigmoid keeps the order, so only each anchor's best class needs it.
    labels = class_scores.argmax(axis=2)
    scores = np.take_along_axis(class_scores, labels[..., None], axis=2)[..., 0]
    scores = _sigmoid(scores) if logits else scores.astype(np.float64)
    if objectness is not None:
        scores = scores * _as_probabilities(objectness, logits)
    raw_boxes = np.asarray(raw_boxes, dtype=np.float64)
    boxes = xywh_to_xyxy(raw_boxes) if box_format == "xywh" else raw_boxes
    return [_select(boxes[i], scores[i], labels[i], **select) for i in range(len(boxes))]


def _labels_and_scores(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which of two (N, K) outputs holds class labels: the integer one, else the one whose values
    are all whole numbers, else (both whole, as with all-zero padding) the first, which is where
    torchvision and TensorFlow exports put labels."""
    a_int, b_int = a.dtype.kind in "iub", b.dtype.kind in "iub"
    if a_int != b_int:
        return (a, b) if a_int else (b, a)

    def whole(x: np.ndarray) -> bool:
        f = x[np.isfinite(x)]
        return bool(np.all(f == np.round(f)))

    a_whole, b_whole = whole(a), whole(b)
    if a_whole != b_whole:
        return (a, b) if a_whole else (b, a)
    if a_whole:
        if (b.max(initial=0) > 1) and not (a.max(initial=0) > 1):
            return b, a
        return a, b
    raise PassError(
        "cannot tell the labels output from the scores output: neither holds whole class numbers",
        code="detection_layout_mismatch",
    )


def _per_box_outputs(outputs: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None]:
    """(boxes (N, K, 4), the outputs with one value or row per box, counts (N,) or None) of post-NMS
    outputs (several; a batch-less export gets its batch axis)."""
    outs = [np.asarray(o) for o in outputs]
    box_index = next((i for i, o in enumerate(outs) if o.ndim in (2, 3) and o.shape[-1] == 4), None)
    if box_index is None:
        raise PassError(
            f"no post-NMS boxes output (N, K, 4) among shapes {[list(o.shape) for o in outs]}",
            code="detection_layout_mismatch",
        )
    boxes = outs[box_index]
    others = [o for i, o in enumerate(outs) if i != box_index]
    if boxes.ndim == 2:  # a batch-less export: one image
        boxes = boxes[None]
        others = [o[None] for o in others]
    n, k = boxes.shape[:2]
    per_box, counts = [], []
    for o in others:
        if o.ndim in (2, 3) and o.shape[:2] == (n, k):
            per_box.append(o.reshape(n, k) if o.ndim == 3 and o.shape[2] == 1 else o)
        elif o.size == n:
            counts.append(o)
    return boxes, per_box, (np.asarray(counts[0]).reshape(n) if counts else None)


def _class_score_matrix(outputs: list[np.ndarray]) -> np.ndarray | None:
    """The per-class score matrix (N, K, C) of post-NMS outputs that have one and no score vector."""
    _, per_box, _ = _per_box_outputs(outputs)
    matrices = [o for o in per_box if o.ndim == 3]
    return matrices[0] if matrices and not any(o.ndim == 2 for o in per_box) else None


def _post_nms_parts(
    outputs: list[np.ndarray], logits: bool | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, bool]:
    """(boxes (N, K, 4), scores (N, K), labels (N, K), counts (N,) or None, needs NMS)."""
    outs = [np.asarray(o) for o in outputs]
    if len(outs) == 1:
        rows = outs[0]
        if rows.ndim == 2:
            rows = rows[None]
        if rows.ndim != 3 or rows.shape[2] != 6:
            raise PassError(
                f"a single post-NMS output must be (N, K, 6) [x1, y1, x2, y2, score, label], got "
                f"shape {list(outs[0].shape)}",
                code="detection_layout_mismatch",
            )
        return rows[..., :4], rows[..., 4], rows[..., 5], None, False
    boxes, per_box, count = _per_box_outputs(outs)
    n, k = boxes.shape[:2]
    matrix = _class_score_matrix(outs)
    vectors = [o for o in per_box if o.ndim == 2]
    if matrix is not None:
        scores = _as_probabilities(matrix, logits)
        labels = scores.argmax(axis=2)
        return boxes, np.take_along_axis(scores, labels[..., None], axis=2)[..., 0], labels, count, True
    if len(vectors) == 1:  # a single-class detector exports no labels
        return boxes, vectors[0], np.zeros((n, k), np.int64), count, False
    if len(vectors) >= 2:
        labels, scores = _labels_and_scores(vectors[0], vectors[1])
        return boxes, scores, labels, count, False
    raise PassError(
        f"no scores output (N, K) beside the boxes among shapes {[list(o.shape) for o in outs]}",
        code="detection_layout_mismatch",
    )


def _decode_post_nms(
    outputs: list[np.ndarray], *, logits: bool | None, conf_threshold: float, iou_threshold: float, max_detections: int
) -> list[Detections]:
    boxes, scores, labels, count, needs_nms = _post_nms_parts(outputs, logits)
    boxes = np.asarray(boxes, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.where(np.isfinite(labels), labels, -1).astype(np.int64)
    result = []
    for i in range(len(boxes)):
        valid = min(int(count[i]), boxes.shape[1]) if count is not None else boxes.shape[1]
        s = scores[i, :valid]
        # Padding rows score 0 (or -1): never a detection, whatever the threshold.
        s = np.where(s > 0, s, -np.inf)
        # The model ran its own NMS; running ours again would drop boxes it chose to keep.
        result.append(
            _select(
                boxes[i, :valid],
                s,
                labels[i, :valid],
                conf_threshold=conf_threshold,
                iou_threshold=iou_threshold if needs_nms else None,
                max_detections=max_detections,
            )
        )
    return result


def decode(
    outputs: list[np.ndarray],
    layout: str,
    *,
    box_format: str = "xywh",
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_detections: int = 300,
    scores_are_logits: bool | None = None,
) -> list[Detections]:
    """One image's detections per batch row: scores above ``conf_threshold``, class-aware NMS at
    ``iou_threshold`` (raw heads), at most ``max_detections`` best-scored boxes.

    ``scores_are_logits``: whether score tensors go through a sigmoid; None decides from these
    outputs (see ``scores_are_logits``, which a caller comparing models runs once on the original's)."""
    if box_format not in BOX_FORMATS:
        raise PassError(
            f"unknown box format {box_format!r} (one of {', '.join(BOX_FORMATS)})", code="invalid_detection_options"
        )
    select = {"conf_threshold": conf_threshold, "iou_threshold": iou_threshold, "max_detections": max_detections}
    if layout in ("yolo", "yolo_objectness"):
        return _decode_raw_head(outputs[0], layout, box_format=box_format, logits=scores_are_logits, **select)
    if layout == "post_nms":
        return _decode_post_nms(outputs, logits=scores_are_logits, **select)
    raise PassError(
        f"unknown detection layout {layout!r} (one of {', '.join(LAYOUTS)})", code="invalid_detection_layout"
    )


# --------------------------------------------------------------------------------------------
# Agreement with the float original (no labels needed)


@dataclass
class _ImageMatch:
    matched: int
    iou_sum: float
    drift_sum: float


def _match_image(reference: Detections, candidate: Detections, iou: float) -> _ImageMatch:
    """Greedy matching: candidates by falling score, each to the unmatched reference box of its
    class it overlaps most, at IoU ``iou`` or more."""
    if not len(reference) or not len(candidate):
        return _ImageMatch(0, 0.0, 0.0)
    order = np.argsort(-candidate.scores, kind="stable")
    ious = box_iou(candidate.boxes[order], reference.boxes)
    ious[candidate.labels[order][:, None] != reference.labels[None, :]] = -1.0
    taken = np.zeros(len(reference), dtype=bool)
    matched, iou_sum, drift_sum = 0, 0.0, 0.0
    for row, c in zip(ious, order, strict=True):
        row = np.where(taken, -1.0, row)
        r = int(row.argmax())
        if row[r] >= iou:
            taken[r] = True
            matched += 1
            iou_sum += float(row[r])
            drift_sum += abs(float(candidate.scores[c]) - float(reference.scores[r]))
    return _ImageMatch(matched, iou_sum, drift_sum)


@dataclass
class AgreementTally:
    """Post-NMS agreement of a candidate's detections with the reference's over many images:
    a reference box is found when a candidate box of the same class overlaps it at IoU >= 0.5."""

    iou: float = 0.5
    matched: int = 0
    reference_detections: int = 0
    candidate_detections: int = 0
    iou_sum: float = 0.0
    drift_sum: float = 0.0
    images: int = field(default=0)

    def add(self, reference: list[Detections], candidate: list[Detections]) -> None:
        if len(reference) != len(candidate):
            raise ValueError(f"{len(reference)} reference images but {len(candidate)} candidate images")
        for ref, cand in zip(reference, candidate, strict=True):
            m = _match_image(ref, cand, self.iou)
            self.matched += m.matched
            self.iou_sum += m.iou_sum
            self.drift_sum += m.drift_sum
            self.reference_detections += len(ref)
            self.candidate_detections += len(cand)
            self.images += 1

    def result(self) -> dict[str, float | int]:
        """precision and recall (1.0 when there was nothing to get wrong), F1 = 2 matched /
        (reference + candidate) (1.0 for two empty sets), mean IoU and mean |score change| of the
        matched pairs."""
        total = self.reference_detections + self.candidate_detections
        if self.matched:
            mean_iou, drift = self.iou_sum / self.matched, self.drift_sum / self.matched
        else:
            mean_iou, drift = (1.0 if total == 0 else 0.0), 0.0
        return {
            "precision": self.matched / self.candidate_detections if self.candidate_detections else 1.0,
            "recall": self.matched / self.reference_detections if self.reference_detections else 1.0,
            "f1": 2 * self.matched / total if total else 1.0,
            "mean_iou": mean_iou,
            "score_drift": drift,
            "reference_detections": self.reference_detections,
            "candidate_detections": self.candidate_detections,
        }


def match_agreement(reference: list[Detections], candidate: list[Detections], iou: float = 0.5) -> dict:
    tally = AgreementTally(iou=iou)
    tally.add(reference, candidate)
    return tally.result()


# --------------------------------------------------------------------------------------------
# COCO mAP against labels


def _coco_matches(dt_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """(T, D) booleans: detection d (sorted by falling score) matched at IoU threshold t.
    pycocotools' evaluateImg for crowd-free targets, including its tie rule (the last of equally
    good targets wins)."""
    thresholds = np.minimum(COCO_IOU_THRESHOLDS, 1 - 1e-10)
    matched = np.zeros((len(thresholds), len(dt_boxes)), dtype=bool)
    if not len(dt_boxes) or not len(gt_boxes):
        return matched
    ious = box_iou(dt_boxes, gt_boxes)
    taken = np.zeros((len(thresholds), len(gt_boxes)), dtype=bool)
    last = len(gt_boxes) - 1
    for d, row in enumerate(ious):
        ok = ~taken & (row[None, :] >= thresholds[:, None])
        hit = ok.any(axis=1)
        if not hit.any():
            continue
        best = last - np.argmax(np.where(ok, row[None, :], -1.0)[:, ::-1], axis=1)
        t = np.flatnonzero(hit)
        taken[t, best[t]] = True
        matched[t, d] = True
    return matched


class MeanAveragePrecision:
    """COCO box mAP accumulated image by image: 101-point interpolated precision, IoU
    0.50:0.05:0.95, the 100 best detections per image and class, area "all", averaged over the
    classes present in the targets. Targets are crowd-free (crowd regions are not read)."""

    def __init__(self, max_detections: int = COCO_MAX_DETECTIONS) -> None:
        self.max_detections = max_detections
        self.images = 0
        self._scores: dict[int, list[np.ndarray]] = {}
        self._matches: dict[int, list[np.ndarray]] = {}
        self._targets: dict[int, int] = {}

    def add(self, predictions: list[Detections], targets: list[Detections]) -> None:
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predicted images but {len(targets)} target images")
        for pred, target in zip(predictions, targets, strict=True):
            self.images += 1
            for c in np.union1d(pred.labels, target.labels):
                p = np.flatnonzero(pred.labels == c)
                p = p[np.argsort(-pred.scores[p], kind="mergesort")][: self.max_detections]
                g = np.flatnonzero(target.labels == c)
                key = int(c)
                self._targets[key] = self._targets.get(key, 0) + len(g)
                self._scores.setdefault(key, []).append(pred.scores[p])
                self._matches.setdefault(key, []).append(_coco_matches(pred.boxes[p], target.boxes[g]))

    def _class_precision(self, key: int) -> np.ndarray:
        """(T, R) interpolated precision of one class (pycocotools' accumulate)."""
        scores = np.concatenate(self._scores[key])
        order = np.argsort(-scores, kind="mergesort")
        tps = np.concatenate(self._matches[key], axis=1)[:, order]
        tp_sum = np.cumsum(tps, axis=1).astype(float)
        fp_sum = np.cumsum(~tps, axis=1).astype(float)
        precision = np.zeros((len(COCO_IOU_THRESHOLDS), len(COCO_RECALL_POINTS)))
        n = tps.shape[1]
        if n == 0:
            return precision
        for t, (tp, fp) in enumerate(zip(tp_sum, fp_sum, strict=True)):
            recall = tp / self._targets[key]
            pr = tp / (fp + tp + np.spacing(1))
            pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision envelope, from the right
            at = np.searchsorted(recall, COCO_RECALL_POINTS, side="left")
            precision[t] = np.where(at < n, pr[np.minimum(at, n - 1)], 0.0)
        return precision

    def result(self) -> dict[str, float | int | None]:
        """``map50`` and ``map50_95`` (None when no image has a target), ``images``, ``targets``."""
        classes = sorted(k for k, n in self._targets.items() if n > 0)
        out: dict[str, float | int | None] = {
            "map50": None,
            "map50_95": None,
            "images": self.images,
            "targets": int(sum(self._targets.values())),
        }
        if classes:
            precision = np.stack([self._class_precision(k) for k in classes], axis=-1)  # (T, R, K)
            out["map50"] = float(np.mean(precision[0]))
            out["map50_95"] = float(np.mean(precision))
        return out


# --------------------------------------------------------------------------------------------
# Raw-head fidelity


RAW_HEAD_LAYOUTS = ("yolo", "yolo_objectness")


class HeadChannelSnr:
    """SNR of a raw head's candidate against its reference per kind of channel, batch after batch:
    the worst score channel (each class, and objectness, on its own: a class that INT8 flattens
    hides in a whole-tensor SNR dominated by box pixels) and the four box channels together. The
    channel axis is the head's shorter one, whether it is (N, 4+C, A) or (N, A, 5+C)."""

    def __init__(self, layout: str) -> None:
        if layout not in RAW_HEAD_LAYOUTS:
            raise ValueError(f"{layout!r} is no raw head: its rows are not the same boxes in both models")
        self.layout = layout
        self.channels = ChannelSums()

    def add(self, reference_out: np.ndarray, candidate_out: np.ndarray) -> None:
        ref, cand = _anchor_rows(reference_out), _anchor_rows(candidate_out)
        if ref.shape != cand.shape:
            raise ValueError(f"reference {list(ref.shape)} and candidate {list(cand.shape)} heads differ in shape")
        self.channels.add(ref, cand, axis=2)

    def result(self) -> dict[str, float]:
        """{"worst_class_channel_snr_db", "box_snr_db"}; empty before any sample."""
        return head_channel_snrs(self.channels)


def head_channel_snrs(channels: ChannelSums) -> dict[str, float]:
    """A raw head's per-channel sums (4 box channels first, then its score channels) read as
    {"worst_class_channel_snr_db", "box_snr_db"}; empty before any sample."""
    scores = channels.snrs(slice(4, None))
    if not scores:
        return {}
    return {"worst_class_channel_snr_db": min(scores), "box_snr_db": channels.pooled_snr(slice(0, 4))}


def class_channel_snr_db(reference_out: np.ndarray, candidate_out: np.ndarray, layout: str) -> dict[str, float]:
    """HeadChannelSnr over one pair of outputs; empty for ``post_nms``, whose rows are not the same
    boxes in both models."""
    if layout not in RAW_HEAD_LAYOUTS:
        return {}
    tally = HeadChannelSnr(layout)
    tally.add(reference_out, candidate_out)
    return tally.result()
