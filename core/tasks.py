"""What a model does, from the shapes of its outputs: the task decides the metric that every gate,
search, verdict and report uses. Pure Python over shapes (the API decides at POST /v1/jobs when the
file records them; the worker decides again from real outputs when it does not)."""

from __future__ import annotations

from collections.abc import Sequence

TASKS = ("classification", "detection", "segmentation")
YOLO_STRIDES = (8, 16, 32)
# P3-P5 heads, with a P6 head (YOLOv5-P6 / v8-P6), and with a P2 head (small-object variants).
STRIDE_SETS = (YOLO_STRIDES, (8, 16, 32, 64), (4, 8, 16, 32))
DETECTION_LAYOUTS = ("yolo", "yolo_objectness", "post_nms")

Shape = Sequence[int | str | None]


def _known(d) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d > 0


def yolo_anchor_count(height: int, width: int, strides: Sequence[int] = YOLO_STRIDES) -> int:
    """Grid cells over a YOLO model's heads at this input size (ceil division, as padded convs give)."""
    return sum(-(-height // s) * -(-width // s) for s in strides)


def detection_layout(output_shapes: Sequence[Shape], input_hw: tuple[int, int] | None = None,
                     hint: str = "auto") -> str | None:
    """``yolo``, ``yolo_objectness``, ``post_nms``, or None when the outputs are not a detector's.

    One 3-D output (N, 4+C, A) or (N, A, 4+C) is a YOLO head when its anchor count matches the grid
    of strides 8/16/32 (or the P6 and P2 variants) at the input size, or is left open, as dynamic-size
    exports leave it. Anchor-based heads (YOLOv5/v7) have three anchors per cell and an objectness
    column (5+C); anchor-free ones (YOLOv8 and later) one per cell and none. A single (N, K, 6) output
    whose K is no grid is NMS-free rows [x1, y1, x2, y2, score, label] (YOLOv10 style). Several outputs,
    one ending in 4 coordinates, are post-NMS detections (boxes, scores, labels [, count])."""
    if hint != "auto":
        return hint
    shapes = [list(s) for s in output_shapes]
    if len(shapes) >= 2:
        return "post_nms" if any(len(s) in (2, 3) and s[-1] == 4 for s in shapes) else None
    if len(shapes) != 1 or len(shapes[0]) != 3:
        return None
    _, a, b = shapes[0]
    if not (_known(a) or _known(b)):
        return None
    if not (_known(a) and _known(b)):
        # The anchor axis is left open (dynamic size). Anchors-first heads are YOLOv5/v7 exports (with
        # objectness) far more often than not; the job's detection.layout overrides.
        channels = a if _known(a) else b
        if channels < 5:
            return None
        return "yolo" if _known(a) else "yolo_objectness"
    channels, anchors = min(a, b), max(a, b)
    if channels < 5 or input_hw is None or not all(_known(d) for d in input_hw):
        return None
    if anchors == 3 * yolo_anchor_count(*input_hw) and channels >= 6:
        return "yolo_objectness"
    grids = {yolo_anchor_count(*input_hw, strides) for strides in STRIDE_SETS}
    if anchors in grids:
        return "yolo"
    if b == 6:
        return "post_nms"
    return None


def infer_task(output_shapes: Sequence[Shape], input_shape: Shape | None = None) -> str | None:
    """classification, detection, segmentation, or None when the shapes do not say."""
    hw = input_hw(input_shape)
    if not output_shapes or any(s is None for s in output_shapes):
        return None
    if detection_layout(output_shapes, hw) is not None:
        return "detection"
    first = list(output_shapes[0])
    if len(first) == 2 or (len(first) == 4 and first[2:] == [1, 1]):
        return "classification"
    if len(first) == 4 and all(_known(d) and d >= 8 for d in first[2:]):
        return "segmentation"
    if len(first) == 4 and not _known(first[2]) and not _known(first[3]):
        return "segmentation"  # maps as large as a dynamic-size input
    return None


def input_hw(input_shape: Shape | None) -> tuple | None:
    if input_shape is None or len(input_shape) != 4:
        return None
    # NCHW when the channel axis is small, else NHWC.
    return (input_shape[2], input_shape[3]) if _known(input_shape[1]) and input_shape[1] <= 4 else (
        input_shape[1], input_shape[2])


def resolve_task(requested: str, output_shapes: Sequence[Shape | None], input_shape: Shape | None,
                 layout: str = "auto") -> str:
    """The job's task at POST /v1/jobs: ``auto`` decided from the file's output shapes when they say
    (else left ``auto`` for the worker); a detector whose recorded outputs fit no layout read is a 422."""
    from core.errors import InvalidInput

    known = bool(output_shapes) and all(s is not None for s in output_shapes)
    if requested == "auto":
        return (infer_task(output_shapes, input_shape) if known else None) or "auto"
    if requested == "detection" and known and layout == "auto" and detection_layout(
            output_shapes, input_hw(input_shape)) is None:
        raise InvalidInput(
            f"task detection: the model's outputs {[list(s) for s in output_shapes]} are none of the layouts read "
            "(a YOLO head (N, 4+C, A) / (N, A, 4+C) / (N, A, 5+C), or boxes (N, K, 4) with scores and labels); "
            "give detection.layout if they are one of these",
            code="unsupported_outputs", details={"outputs": [list(s) for s in output_shapes]},
        )
    return requested
