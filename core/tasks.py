"""What a model does, from the shapes of its outputs: the task decides the metric that every gate,
search, verdict and report uses. Pure Python over shapes (the API decides at POST /v1/jobs when the
file records them; the worker decides again from real outputs when it does not)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeGuard, cast

TASKS = ("classification", "detection", "segmentation")
YOLO_STRIDES = (8, 16, 32)
# P3-P5 heads, with a P6 head (YOLOv5-P6 / v8-P6), and with a P2 head (small-object variants).
STRIDE_SETS = (YOLO_STRIDES, (8, 16, 32, 64), (4, 8, 16, 32))
DETECTION_LAYOUTS = ("yolo", "yolo_objectness", "post_nms")
# The job's max_accuracy_drop when it gives none: one point of the task's metric.
DEFAULT_TOLERANCE = 0.01

Dim = int | str | None  # a size, a symbolic name, or unknown
Shape = Sequence[Dim]
HW = tuple[Dim, Dim]


def _known(d: object) -> TypeGuard[int]:
    return isinstance(d, int) and not isinstance(d, bool) and d > 0


def yolo_anchor_count(height: int, width: int, strides: Sequence[int] = YOLO_STRIDES) -> int:
    """Grid cells over a YOLO model's heads at this input size (ceil division, as padded convs give)."""
    return sum(-(-height // s) * -(-width // s) for s in strides)


def _same(a: object, b: object) -> bool:
    """Two dimensions that can be the same: equal, or either left open (symbolic or unknown)."""
    return not (_known(a) and _known(b)) or a == b


def _post_nms_boxes(shapes: list[list[Dim]]) -> bool:
    """Whether some output is boxes (…, K, 4) with a scores partner: the boxes' shape without its last
    dim ((N, K) or, batch-less, (K,)), or per-class scores (N, K, C) beside (N, K, 4) boxes. An (N, 4)
    beside an (N, C) is a classifier's auxiliary output, not boxes."""
    for i, boxes in enumerate(shapes):
        if len(boxes) not in (2, 3) or boxes[-1] != 4:
            continue
        for j, other in enumerate(shapes):
            if j == i:
                continue
            per_box = len(other) == len(boxes) - 1 or (len(boxes) == 3 and len(other) == 3)
            if per_box and all(_same(a, b) for a, b in zip(other, boxes[:-1], strict=False)):
                return True
    return False


def layout_fits(layout: str, output_shapes: Sequence[Shape]) -> bool:
    """Whether outputs of these shapes can hold ``layout``: the check a job's detection.layout gets
    (it names the layout the shapes are read as, so it must at least be readable as one)."""
    shapes = [list(s) for s in output_shapes]
    if not shapes:
        return False
    if layout in ("yolo", "yolo_objectness"):
        need = 5 if layout == "yolo" else 6
        known = [d for d in shapes[0][-2:] if _known(d)]
        return len(shapes[0]) in (2, 3) and (not known or min(known) >= need)
    if layout == "post_nms":
        if len(shapes) == 1:
            return len(shapes[0]) in (2, 3) and shapes[0][-1] == 6
        return _post_nms_boxes(shapes)
    return False


def detection_layout(output_shapes: Sequence[Shape], input_hw: HW | None = None, hint: str = "auto") -> str | None:
    """``yolo``, ``yolo_objectness``, ``post_nms``, or None when the outputs are not a detector's (or,
    with a ``hint`` other than auto, cannot hold that layout).

    One 3-D output (N, 4+C, A) or (N, A, 4+C) is a YOLO head when its anchor count matches the grid
    of strides 8/16/32 (or the P6 and P2 variants) at the input size, or is left open, as dynamic-size
    exports leave it. Anchor-based heads (YOLOv5/v7) have three anchors per cell and an objectness
    column (5+C); anchor-free ones (YOLOv8 and later) one per cell and none. A single (N, K, 6) output
    whose K is no grid is NMS-free rows [x1, y1, x2, y2, score, label] (YOLOv10 style). Several outputs
    are post-NMS detections (boxes, scores, labels [, count]) when one is boxes (N, K, 4) beside
    scores (N, K)."""
    if hint != "auto":
        return hint if layout_fits(hint, output_shapes) else None
    shapes = [list(s) for s in output_shapes]
    if len(shapes) >= 2:
        return "post_nms" if _post_nms_boxes(shapes) else None
    if len(shapes) != 1 or len(shapes[0]) != 3:
        return None
    _, a, b = shapes[0]
    if not (_known(a) or _known(b)):
        return None
    if not (_known(a) and _known(b)):
        # The anchor axis is left open (dynamic size). Anchors-first heads are YOLOv5/v7 exports (with
        # objectness) far more often than not; the job's detection.layout overrides.
        channels = cast(int, a if _known(a) else b)  # the known one
        if channels < 5:
            return None
        return "yolo" if _known(a) else "yolo_objectness"
    channels, anchors = min(a, b), max(a, b)
    if channels < 5 or input_hw is None or not all(_known(d) for d in input_hw):
        return None
    height, width = cast(tuple[int, int], input_hw)  # both known (checked above)
    if anchors == 3 * yolo_anchor_count(height, width) and channels >= 6:
        return "yolo_objectness"
    grids = {yolo_anchor_count(height, width, strides) for strides in STRIDE_SETS}
    if anchors in grids:
        return "yolo"
    if b == 6:
        return "post_nms"
    return None


def infer_task(output_shapes: Sequence[Shape | None], input_shape: Shape | None = None) -> str | None:
    """classification, detection, segmentation, or None when the shapes do not say."""
    hw = input_hw(input_shape)
    if not output_shapes or any(s is None for s in output_shapes):
        return None
    shapes = cast(Sequence[Shape], output_shapes)  # none is None (checked above)
    if detection_layout(shapes, hw) is not None:
        return "detection"
    first = list(shapes[0])
    if len(first) == 2 or (len(first) == 4 and first[2:] == [1, 1]):
        return "classification"
    if len(first) == 4 and all(_known(d) and d >= 8 for d in first[2:]):
        return "segmentation"
    if len(first) == 4 and not _known(first[2]) and not _known(first[3]):
        return "segmentation"  # maps as large as a dynamic-size input
    return None


def image_layout(input_shape: Shape | None) -> str:
    """NCHW or NHWC for an image model's 4-D input, raw for anything else: the one rule the dataset
    reader, the planner and the metrics share. A channel axis of 1 or 3 (what images convert to)."""
    if input_shape is None or len(input_shape) != 4:
        return "raw"
    if input_shape[1] in (1, 3):
        return "NCHW"
    if input_shape[3] in (1, 3):
        return "NHWC"
    return "raw"


def input_hw(input_shape: Shape | None) -> HW | None:
    """(height, width) of an image model's input, None when it is no image input."""
    if input_shape is None:
        return None
    layout = image_layout(input_shape)
    if layout == "NCHW":
        return input_shape[2], input_shape[3]
    if layout == "NHWC":
        return input_shape[1], input_shape[2]
    return None


def _detection_layout_or_raise(output_shapes: Sequence[Shape], input_shape: Shape | None, hint: str) -> str:
    from core.errors import InvalidInput

    shapes = [list(s) for s in output_shapes]
    if hint != "auto" and hint not in DETECTION_LAYOUTS:
        raise InvalidInput(
            f"unknown detection layout {hint!r} (one of auto, {', '.join(DETECTION_LAYOUTS)})",
            code="invalid_detection_layout",
            details={"layout": hint},
        )
    layout = detection_layout(shapes, input_hw(input_shape), hint)
    if layout is not None:
        return layout
    if hint != "auto":
        raise InvalidInput(
            f"detection.layout {hint!r} cannot read the model's outputs {shapes} ("
            + {
                "yolo": "one head (N, 4+C, A) or (N, A, 4+C), C >= 1",
                "yolo_objectness": "one head (N, 5+C, A) or (N, A, 5+C), C >= 1",
                "post_nms": "boxes (N, K, 4) with scores (N, K) [, labels, count], or one (N, K, 6)",
            }[hint]
            + "); give the layout they have, or auto",
            code="detection_layout_mismatch",
            details={"layout": hint, "outputs": shapes},
        )
    raise InvalidInput(
        f"task detection: the model's outputs {shapes} are none of the layouts read "
        "(a YOLO head (N, 4+C, A) / (N, A, 4+C) / (N, A, 5+C), or boxes (N, K, 4) with scores (N, K) and labels); "
        "give detection.layout if they are one of these",
        code="unsupported_outputs",
        details={"outputs": shapes},
    )


def resolve_task(
    requested: str, output_shapes: Sequence[Shape | None], input_shape: Shape | None, layout: str = "auto"
) -> str:
    """The job's task at POST /v1/jobs: ``auto`` decided from the file's output shapes when they say
    (else left ``auto`` for the worker); a detection.layout other than auto makes it a detection job.
    A detector whose recorded outputs fit no layout read, or not the one given, is a 422."""
    known = bool(output_shapes) and all(s is not None for s in output_shapes)
    if requested == "auto" and layout != "auto":
        requested = "detection"
    if requested == "auto":
        return (infer_task(output_shapes, input_shape) if known else None) or "auto"
    if requested == "detection" and known:
        _detection_layout_or_raise(cast(Sequence[Shape], output_shapes), input_shape, layout)
    return requested


def resolve_measured_task(
    requested: str, output_shapes: Sequence[Shape], input_shape: Shape | None, layout_hint: str = "auto"
) -> tuple[str, str | None, str | None]:
    """(task, detection layout or None, note or None) for measuring real outputs in the worker: the
    job's task, or for ``auto`` what the outputs say (classification, with a note, when they do not).
    Raises InvalidInput ``unsupported_outputs`` (a detector no layout reads) or
    ``detection_layout_mismatch`` (the job's detection.layout cannot hold the outputs)."""
    shapes = [list(s) for s in output_shapes]
    note = None
    task = "detection" if requested == "auto" and layout_hint != "auto" else requested
    if task == "auto":
        inferred = infer_task(shapes, input_shape)
        if inferred is None:
            note = f"the outputs {shapes} do not say the task; measured as classification (give the job's task)"
        task = inferred or "classification"
    if task != "detection":
        return task, None, note
    return task, _detection_layout_or_raise(shapes, input_shape, layout_hint), note
