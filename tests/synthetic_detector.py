"""A tiny YOLOv8-style detector trained on synthetic shapes, and the box-labelled datasets built
from the same generator: a real detector whose boxes we know, for the detection-mAP tests and
for detector-safe INT8.

The images are squares, circles and triangles on a noisy background, drawn from exact geometry
(a pixel belongs to a shape when its centre does), so every box is known to the pixel. The
generator needs only numpy and PIL, so fast tests can build datasets without torch.

The model's ONNX output is the Ultralytics export's: ``(N, 4 + 3, A)``, boxes ``cx, cy, w, h`` in
input pixels concatenated with 0..1 class scores. That mix of scales in one tensor is what
per-tensor INT8 of the output destroys, and the reason this fixture exists. Inputs are RGB
``(N, 3, H, W)`` float32 in 0..1 (preprocessing ``scale=1/255, mean=0, std=1``); any H and W that
are multiples of 32 work.

``python -m tests.synthetic_detector train`` regenerates ``tests/fixtures/shapes_yolo*.onnx`` and
``shapes_yolo.pt`` (seeded; single-threaded so that a rerun on the same machine gives the same
weights).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

CLASS_NAMES = ("square", "circle", "triangle")
NUM_CLASSES = len(CLASS_NAMES)
STRIDES = (8, 16, 32)
IMAGE_SIZE = 128
MIN_SIDE, MAX_SIDE = 14, 50
MAX_OBJECTS = 4
# The service's preprocessing for these models (worker/data.py applies ImageNet's by default).
PREPROCESSING = {"scale": 1 / 255, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
# In the post-NMS export: the rows kept per image, and the score under which NMS drops a box
# (low, as for mAP: a thresholded export would cap recall before the metric sees it).
POST_NMS_DETECTIONS = 100
POST_NMS_SCORE_THRESHOLD = 0.001
POST_NMS_IOU_THRESHOLD = 0.45
# COCO category ids of the classes: not 0-based on purpose, so readers must map them.
COCO_CATEGORY_IDS = (1, 2, 3)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_FILES = {
    "yolo": "shapes_yolo.onnx",
    "yolo_objectness": "shapes_yolo_objectness.onnx",
    "post_nms": "shapes_yolo_postnms.onnx",
    "state_dict": "shapes_yolo.pt",
}
TRAIN_SEED, HELD_OUT_SEED, CALIBRATION_SEED = 0, 1_000, 2_000


# --------------------------------------------------------------------------------------------
# Synthetic images (numpy + PIL only)


def _shape_mask(cls: int, box: tuple[float, float, float, float], size: int, flip: bool) -> np.ndarray:
    """Pixels whose centres lie inside the shape whose exact extent is ``box`` (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = box
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    if cls == 0:
        return (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
    if cls == 1:
        cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    # Isosceles triangle, apex at the top (or bottom when flipped), base on the other side.
    apex_y, base_y = (y2, y1) if flip else (y1, y2)
    t = (ys - apex_y) / (base_y - apex_y)  # 0 at the apex, 1 at the base
    half = t * (x2 - x1) / 2
    cx = (x1 + x2) / 2
    return (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= half)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_image(seed: int, index: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of the stream ``seed``: (H x W x 3 uint8, (M, 5) float64 [cls, x1, y1, x2, y2]
    in pixels). Each image has its own generator, so a longer stream starts with the shorter one."""
    rng = np.random.default_rng([seed, index, size])
    background = rng.uniform(20, 235, size=3)
    # A gentle gradient plus noise: texture for the network to ignore, not a flat colour to key on.
    ramp = np.linspace(-1, 1, size)
    gradient = rng.uniform(-25, 25, size=(2, 3))
    canvas = background + ramp[None, :, None] * gradient[0] + ramp[:, None, None] * gradient[1]
    canvas = np.broadcast_to(canvas, (size, size, 3)).copy()

    targets: list[list[float]] = []
    wanted = int(rng.integers(1, MAX_OBJECTS + 1))
    for _ in range(wanted * 20):
        if len(targets) == wanted:
            break
        cls = int(rng.integers(0, NUM_CLASSES))
        w = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        h = w if cls != 2 else int(np.clip(round(w * rng.uniform(0.75, 1.0)), MIN_SIDE, MAX_SIDE))
        x1, y1 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        box = np.array([x1, y1, x1 + w, y1 + h], dtype=np.float64)
        # Partial overlap is allowed; a shape mostly hidden behind another has no fair box.
        if any(_iou(box, np.asarray(t[1:])) > 0.3 for t in targets):
            continue
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - background) < 90:
            continue
        mask = _shape_mask(cls, tuple(box), size, flip=bool(rng.integers(0, 2)))
        canvas[mask] = colour
        targets.append([cls, *box])
    canvas += rng.normal(0, 6, size=canvas.shape)
    image = np.clip(canvas, 0, 255).round().astype(np.uint8)
    return image, np.asarray(targets, dtype=np.float64).reshape(-1, 5)


def make_images(n: int, seed: int, size: int = IMAGE_SIZE) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` images (H x W x 3 uint8) and their targets ((M, 5) [cls, x1, y1, x2, y2] pixels)."""
    pairs = [make_image(seed, i, size) for i in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_yolo_zip(path: Path, n: int, seed: int, size: int = IMAGE_SIZE) -> Path:
    """images/<name>.png, labels/<name>.txt ("class cx cy w h" normalized to 0..1), classes.txt."""
    images, targets = make_images(n, seed, size)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("classes.txt", "\n".join(CLASS_NAMES) + "\n")
        for i, (image, target) in enumerate(zip(images, targets, strict=True)):
            name = f"shape_{i:05d}"
            zf.writestr(f"images/{name}.png", _png(image))
            lines = []
            for cls, x1, y1, x2, y2 in target:
                cx, cy, w, h = (x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size
                lines.append(f"{int(cls)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            zf.writestr(f"labels/{name}.txt", "".join(line + "\n" for line in lines))
    return path


def coco_annotations(targets: list[np.ndarray], file_names: list[str], size: int) -> dict[str, Any]:
    images, annotations = [], []
    for image_id, (target, file_name) in enumerate(zip(targets, file_names, strict=True), start=1):
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for cls, x1, y1, x2, y2 in target:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": COCO_CATEGORY_IDS[int(cls)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": cid, "name": name} for cid, name in zip(COCO_CATEGORY_IDS, CLASS_NAMES, strict=True)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco_zip(path: Path, n: int, seed: int, size: int = IMAGE_SIZE) -> Path:
    """PNG images at the zip root plus annotations.json (COCO: bbox [x, y, w, h] pixels,
    category ids 1..3)."""
    images, targets = make_images(n, seed, size)
    file_names = [f"shape_{i:05d}.png" for i in range(n)]
    with zipfile.ZipFile(path, "w") as zf:
        for image, file_name in zip(images, file_names, strict=True):
            zf.writestr(file_name, _png(image))
        zf.writestr("annotations.json", json.dumps(coco_annotations(targets, file_names, size)))
    return path


def to_model_input(images: list[np.ndarray]) -> np.ndarray:
    """(N, 3, H, W) float32 in 0..1: what the models take."""
    return (np.stack(images).astype(np.float32) / 255.0).transpose(0, 3, 1, 2).copy()


# --------------------------------------------------------------------------------------------
# A quick numpy decoder and COCO-style mAP, to check the fixture (the service's own lives in
# worker/metrics/detection.py)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(K, 4) x (L, 4) xyxy -> (K, L) IoU."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms_per_class(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    keep: list[int] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        while len(idx):
            keep.append(int(idx[0]))
            idx = idx[1:][box_iou(boxes[idx[:1]], boxes[idx[1:]])[0] <= iou_threshold]
    keep_arr = np.asarray(keep, dtype=np.int64)
    return keep_arr[np.argsort(-scores[keep_arr], kind="stable")]


def decode_yolo(
    output: np.ndarray, *, conf_threshold: float = 0.001, iou_threshold: float = 0.6, max_detections: int = 100
) -> list[np.ndarray]:
    """(N, 4 + C, A) -> per image (K, 6) [x1, y1, x2, y2, score, cls], best class per anchor."""
    detections = []
    for image_out in output:
        cx, cy, w, h = image_out[:4]
        scores_all = image_out[4:]
        labels, scores = scores_all.argmax(0), scores_all.max(0)
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float64)
        sel = scores > conf_threshold
        boxes, scores, labels = boxes[sel], scores[sel].astype(np.float64), labels[sel]
        keep = nms_per_class(boxes, scores, labels, iou_threshold)[:max_detections]
        detections.append(np.concatenate([boxes[keep], scores[keep, None], labels[keep, None]], 1))
    return detections


def mean_average_precision(detections: list[np.ndarray], targets: list[np.ndarray]) -> dict[str, float]:
    """COCO-style: 101-point interpolated AP per class at IoU .50:.05:.95, mean over classes present."""
    thresholds = np.linspace(0.5, 0.95, 10)
    aps = np.zeros((NUM_CLASSES, len(thresholds)))
    present = []
    for cls in range(NUM_CLASSES):
        num_targets = sum(int((t[:, 0] == cls).sum()) for t in targets)
        if num_targets == 0:
            continue
        present.append(cls)
        records = []  # (score, image, detection box)
        for image, det in enumerate(detections):
            for row in det[det[:, 5] == cls]:
                records.append((row[4], image, row[:4]))
        records.sort(key=lambda r: -r[0])
        for ti, threshold in enumerate(thresholds):
            matched = [np.zeros(int((t[:, 0] == cls).sum()), bool) for t in targets]
            hits = np.zeros(len(records))
            for k, (_, image, box) in enumerate(records):
                gt = targets[image][targets[image][:, 0] == cls, 1:5]
                if len(gt) == 0:
                    continue
                ious = box_iou(box[None], gt)[0]
                ious[matched[image]] = -1
                best = int(ious.argmax())
                if ious[best] >= threshold:
                    matched[image][best] = True
                    hits[k] = 1
            tp = np.cumsum(hits)
            recall = tp / num_targets
            precision = tp / np.arange(1, len(records) + 1)
            precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
            points = np.linspace(0, 1, 101)
            at = np.searchsorted(recall, points, side="left")
            aps[cls, ti] = np.mean([precision[i] if i < len(precision) else 0.0 for i in at])
    if not present:
        return {"map50": 0.0, "map50_95": 0.0}
    per_class = aps[present]
    return {"map50": float(per_class[:, 0].mean()), "map50_95": float(per_class.mean())}


# --------------------------------------------------------------------------------------------
# The detector (torch, imported inside the functions)


def build_detector():
    """A YOLOv8-like anchor-free detector (287k parameters): Conv-BN-SiLU backbone with C2f-style
    blocks, a top-down neck, decoupled box/class heads at strides 8, 16 and 32. ``forward`` returns
    what an Ultralytics export returns; ``head_outputs`` returns the raw per-level maps for training."""
    import torch
    from torch import nn

    class Conv(nn.Sequential):
        def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1) -> None:
            super().__init__(nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())

    class C2f(nn.Module):
        """Half the channels pass through, the other half through a residual pair; both are joined."""

        def __init__(self, c: int) -> None:
            super().__init__()
            self.split = Conv(c, c, 1)
            self.inner = nn.Sequential(Conv(c // 2, c // 2), Conv(c // 2, c // 2))
            self.join = Conv(c + c // 2, c, 1)

        def forward(self, x):
            a, b = self.split(x).chunk(2, 1)
            return self.join(torch.cat([a, b, b + self.inner(b)], 1))

    class Head(nn.Module):
        """One shared 3x3 conv, then a box branch and a class branch (YOLOv8's decoupled head)."""

        def __init__(self, c: int, width: int = 32) -> None:
            super().__init__()
            self.shared = Conv(c, width)
            self.box = nn.Sequential(Conv(width, width), nn.Conv2d(width, 4, 1))
            self.cls = nn.Sequential(Conv(width, width), nn.Conv2d(width, NUM_CLASSES, 1))

        def forward(self, x):
            x = self.shared(x)
            return self.box(x), self.cls(x)

    class ShapesYolo(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(Conv(3, 16, 3, 2), Conv(16, 32, 3, 2), C2f(32))
            self.down3 = nn.Sequential(Conv(32, 48, 3, 2), C2f(48))  # stride 8
            self.down4 = nn.Sequential(Conv(48, 64, 3, 2), C2f(64))  # stride 16
            self.down5 = nn.Sequential(Conv(64, 64, 3, 2), C2f(64))  # stride 32
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.fuse4 = Conv(64 + 64, 64, 1)
            self.fuse3 = Conv(64 + 48, 48, 1)
            self.heads = nn.ModuleList([Head(48), Head(64), Head(64)])
            for head in self.heads:
                # Start with scores near 1% so the many background anchors do not swamp early training.
                nn.init.constant_(head.cls[-1].bias, -4.6)
                nn.init.constant_(head.box[-1].bias, 1.0)

        def head_outputs(self, image):
            x = self.stem(image)
            p3 = self.down3(x)
            p4 = self.down4(p3)
            p5 = self.down5(p4)
            n4 = self.fuse4(torch.cat([self.up(p5), p4], 1))
            n3 = self.fuse3(torch.cat([self.up(n4), p3], 1))
            return [head(f) for head, f in zip(self.heads, (n3, n4, p5), strict=True)]

        def forward(self, image):
            boxes, scores = [], []
            for (box_raw, cls_raw), stride in zip(self.head_outputs(image), STRIDES, strict=True):
                boxes.append(decode_level(box_raw, stride).flatten(2))
                scores.append(cls_raw.sigmoid().flatten(2))
            # Pixel boxes and 0..1 scores in one tensor, as Ultralytics exports it.
            return torch.cat([torch.cat(boxes, 2), torch.cat(scores, 2)], 1)

    return ShapesYolo()


def anchor_grid(height: int, width: int, stride: int, like):
    """Cell centres (x, y) in input pixels, each (height, width), built from the feature map's own
    size so that an ONNX export keeps height and width dynamic."""
    import torch

    ys = (torch.arange(height, dtype=like.dtype, device=like.device) + 0.5) * stride
    xs = (torch.arange(width, dtype=like.dtype, device=like.device) + 0.5) * stride
    ay, ax = torch.meshgrid(ys, xs, indexing="ij")
    return ax, ay


def decode_level(box_raw, stride: int):
    """Raw (N, 4, h, w) distances to the box's left, top, right and bottom edges (softplus, in
    strides) -> (N, 4, h, w) cx, cy, w, h in input pixels."""
    import torch
    import torch.nn.functional as F

    ax, ay = anchor_grid(box_raw.shape[2], box_raw.shape[3], stride, box_raw)
    left, top, right, bottom = (F.softplus(box_raw) * stride).unbind(1)
    return torch.stack([ax + (right - left) / 2, ay + (bottom - top) / 2, left + right, top + bottom], 1)


def _anchors(size: int):
    """Every anchor of a ``size`` x ``size`` input, in the output's order: (A, 2) centres in pixels and
    (A,) strides."""
    import torch

    centres, strides = [], []
    for stride in STRIDES:
        cells = size // stride
        ax, ay = anchor_grid(cells, cells, stride, torch.zeros(()))
        centres.append(torch.stack([ax.flatten(), ay.flatten()], 1))
        strides.append(torch.full((cells * cells,), float(stride)))
    return torch.cat(centres), torch.cat(strides)


# Which levels learn an object, by its longer side in pixels (the ranges overlap so that sizes
# near a boundary are learned by both neighbours).
LEVEL_SIDES = {8: (0, 30), 16: (22, 46), 32: (38, 10_000)}


def assign_targets(targets: list[np.ndarray], centres, strides):
    """Centre-prior assignment: an anchor learns a box when the anchor lies inside it, the box's size
    suits the anchor's level, and the anchor is within 1.5 strides of the box centre (the cell
    holding the centre always qualifies). An anchor claimed by several boxes takes the smallest.
    Returns (B, A) target class (-1: background) and (B, A, 4) x1, y1, x2, y2 target boxes."""
    import torch

    batch, num_anchors = len(targets), centres.shape[0]
    labels = torch.full((batch, num_anchors), -1, dtype=torch.long)
    boxes = torch.zeros(batch, num_anchors, 4)
    low = torch.tensor([LEVEL_SIDES[int(s)][0] for s in strides.tolist()])
    high = torch.tensor([LEVEL_SIDES[int(s)][1] for s in strides.tolist()])
    for b, target in enumerate(targets):
        if len(target) == 0:
            continue
        t = torch.from_numpy(target).float()
        x1, y1, x2, y2 = (t[:, i, None] for i in range(1, 5))
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        side = torch.maximum(x2 - x1, y2 - y1)
        ax, ay = centres[None, :, 0], centres[None, :, 1]
        inside = (ax > x1) & (ax < x2) & (ay > y1) & (ay < y2)
        near = ((ax - cx).abs() < 1.5 * strides) & ((ay - cy).abs() < 1.5 * strides)
        centre_cell = ((ax - cx).abs() <= strides / 2) & ((ay - cy).abs() <= strides / 2)
        sized = (side >= low) & (side <= high)
        candidate = sized & ((inside & near) | centre_cell)  # (M, A)
        area = ((x2 - x1) * (y2 - y1)).expand_as(candidate)
        area = torch.where(candidate, area, torch.full_like(area, float("inf")))
        best_area, best = area.min(0)
        positive = torch.isfinite(best_area)
        labels[b, positive] = t[best[positive], 0].long()
        boxes[b, positive] = t[best[positive], 1:5]
    return labels, boxes


def _xywh_to_xyxy(boxes):
    import torch

    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _giou(a, b):
    """Generalized IoU of matching rows of two (K, 4) xyxy tensors, and their IoU."""
    import torch

    inter_w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    inter_h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = inter_w * inter_h
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    iou = inter / union.clamp(min=1e-9)
    hull = (torch.maximum(a[:, 2], b[:, 2]) - torch.minimum(a[:, 0], b[:, 0])) * (
        torch.maximum(a[:, 3], b[:, 3]) - torch.minimum(a[:, 1], b[:, 1])
    )
    return iou - (hull - union) / hull.clamp(min=1e-9), iou


def detection_loss(output, labels, target_boxes, strides):
    """BCE on every anchor's class scores (the positive class's target is the IoU the box reached,
    so scores rank boxes by quality, as in YOLOv8's task-aligned loss) plus GIoU and L1 on the
    positives' boxes. ``output`` is the model's (N, 4 + C, A)."""
    import torch
    import torch.nn.functional as F

    pred_boxes = _xywh_to_xyxy(output[:, :4].transpose(1, 2))  # (N, A, 4)
    scores = output[:, 4:].transpose(1, 2).clamp(1e-6, 1 - 1e-6)  # (N, A, C)
    positive = labels >= 0
    num_pos = max(int(positive.sum()), 1)
    giou, iou = _giou(pred_boxes[positive], target_boxes[positive])
    score_target = torch.zeros_like(scores)
    score_target[positive, labels[positive]] = iou.detach().clamp(min=0.1)
    cls_loss = F.binary_cross_entropy(scores, score_target, reduction="sum") / num_pos
    scale = strides.expand_as(labels)[positive][:, None]
    l1 = F.l1_loss(pred_boxes[positive] / scale, target_boxes[positive] / scale, reduction="sum") / num_pos
    box_loss = (1 - giou).sum() / num_pos
    return cls_loss + 2.5 * box_loss + 0.5 * l1, {
        "cls": float(cls_loss.detach()),
        "box": float(box_loss.detach()),
        "l1": float(l1.detach()),
    }


def train_detector(
    *, train_images: int = 6_000, epochs: int = 6, batch_size: int = 32, seed: int = TRAIN_SEED, log=print
):
    """Train on ``train_images`` synthetic 128 x 128 images with horizontal flips; single-threaded
    (reproducible, and on a shared 2-core machine no slower than two threads)."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    images, targets = make_images(train_images, seed)
    x_all = torch.from_numpy(to_model_input(images))
    centres, strides = _anchors(IMAGE_SIZE)
    labels_all, boxes_all = assign_targets(targets, centres, strides)
    flipped_order = _flip_permutation(IMAGE_SIZE)

    net = build_detector()
    steps = epochs * (train_images // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=4e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start, step = time.monotonic(), 0
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(train_images, generator=generator)
        for i in range(0, train_images - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            x, labels, boxes = x_all[idx], labels_all[idx], boxes_all[idx]
            flip = torch.rand(batch_size, generator=generator) < 0.5
            if flip.any():  # the batch is already a copy (fancy indexing): flip it in place
                x[flip] = x[flip].flip(3)
                # A mirrored image's anchors are the same anchors in mirrored order.
                labels[flip] = labels[flip][:, flipped_order]
                mirrored = boxes[flip][:, flipped_order]
                boxes[flip] = torch.stack(
                    [IMAGE_SIZE - mirrored[..., 2], mirrored[..., 1], IMAGE_SIZE - mirrored[..., 0], mirrored[..., 3]],
                    -1,
                )
            loss, parts = detection_loss(net(x), labels, boxes, strides)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                log(
                    f"epoch {epoch} step {step}/{steps} loss {float(loss):.3f} "
                    + " ".join(f"{k} {v:.3f}" for k, v in parts.items())
                    + f" {time.monotonic() - start:.0f}s"
                )
    return net.eval()


def _flip_permutation(size: int):
    """Index of each anchor's mirror image (x -> size - x) in the output's anchor order."""
    import torch

    order, offset = [], 0
    for stride in STRIDES:
        cells = size // stride
        grid = torch.arange(cells * cells).reshape(cells, cells).flip(1).flatten()
        order.append(grid + offset)
        offset += cells * cells
    return torch.cat(order)


# --------------------------------------------------------------------------------------------
# Export variants


def _onnx_nms_function():
    """ONNX NonMaxSuppression as a torch function: eager runs torchvision's per-class NMS, export
    writes the one ONNX op (batched and class-aware, so batch stays dynamic). Returns (S, 3) int64
    rows [image, class, anchor], as the op does."""
    import torch
    import torchvision

    class OnnxNms(torch.autograd.Function):
        @staticmethod
        def forward(ctx, boxes, scores, max_per_class: int, iou_threshold: float, score_threshold: float):
            rows = []
            for b in range(scores.shape[0]):
                for c in range(scores.shape[1]):
                    candidates = torch.nonzero(scores[b, c] > score_threshold).flatten()
                    keep = torchvision.ops.nms(boxes[b, candidates], scores[b, c, candidates], iou_threshold)
                    anchors = candidates[keep[:max_per_class]]
                    rows.append(torch.stack([torch.full_like(anchors, b), torch.full_like(anchors, c), anchors], 1))
            return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.long)

        @staticmethod
        def symbolic(g, boxes, scores, max_per_class: int, iou_threshold: float, score_threshold: float):
            return g.op(
                "NonMaxSuppression",
                boxes,
                scores,
                g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.long)),
                g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float)),
                g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float)),
                center_point_box_i=0,
            )

    return OnnxNms


def export_variants(net):
    """The three modules exported as fixtures: ``yolo`` (the net), ``yolo_objectness`` and
    ``post_nms`` (wrappers around the same weights)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    nms = _onnx_nms_function()

    class ObjectnessLayout(nn.Module):
        """(N, A, 5 + C) anchors first, YOLOv5/v7 style, with three rows per cell (one per "anchor"
        shape in YOLOv5; here three copies of the cell's one prediction, so that A = 3 x cells as
        layout detection expects, and NMS removes the copies). Objectness is the best class score
        and the class scores are divided by it, so objectness x class score is exactly the class
        score of the ``yolo`` layout."""

        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, image):
            levels = []
            for (box_raw, cls_raw), stride in zip(self.inner.head_outputs(image), STRIDES, strict=True):
                boxes = decode_level(box_raw, stride).flatten(2)
                logits = cls_raw.flatten(2)
                best = logits.amax(1, keepdim=True)
                # sigmoid(l) / sigmoid(best) from log-sigmoids: the plain ratio divides two numbers
                # that onnxruntime's Sigmoid rounds to 0 on background cells.
                relative = torch.exp(F.softplus(-best) - F.softplus(-logits))
                rows = torch.cat([boxes, best.sigmoid(), relative], 1)  # (N, 5+C, cells)
                levels.append(rows.unsqueeze(1).expand(-1, 3, -1, -1).transpose(2, 3).flatten(1, 2))
            return torch.cat(levels, 1)

    class PostNms(nn.Module):
        """boxes (N, K, 4) x1 y1 x2 y2 pixels, scores (N, K), labels (N, K) int64; K fixed, rows past
        the detections padded with score 0, label 0 and a zero box."""

        def __init__(self, inner, k: int = POST_NMS_DETECTIONS) -> None:
            super().__init__()
            self.inner, self.k = inner, k

        def forward(self, image):
            out = self.inner(image)
            boxes = _xywh_to_xyxy(out[:, :4].transpose(1, 2))  # (N, A, 4)
            scores = out[:, 4:]  # (N, C, A)
            n, c, a = scores.shape
            kept = nms.apply(boxes, scores, self.k, POST_NMS_IOU_THRESHOLD, POST_NMS_SCORE_THRESHOLD)
            flat = (kept[:, 0] * c + kept[:, 1]) * a + kept[:, 2]
            mask = torch.zeros(n * c * a, dtype=scores.dtype).scatter(0, flat, 1.0).reshape(n, c * a)
            # Zero columns beyond the candidates, so that top-K works however few anchors there are.
            candidates = torch.cat([scores.flatten(1) * mask, torch.zeros(n, self.k, dtype=scores.dtype)], 1)
            top_scores, top = candidates.topk(self.k, 1)
            valid = top_scores > 0
            anchor = torch.where(valid, top % a, torch.zeros_like(top))
            labels = torch.where(valid, top // a, torch.zeros_like(top))
            top_boxes = torch.gather(boxes, 1, anchor.unsqueeze(2).expand(-1, -1, 4))
            return top_boxes * valid.unsqueeze(2).to(boxes.dtype), top_scores, labels

    return {"yolo": net, "yolo_objectness": ObjectnessLayout(net).eval(), "post_nms": PostNms(net).eval()}


def export_onnx(net, directory: Path) -> dict[str, Path]:
    """The three ONNX files (opset 17, dynamic batch, height and width)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(to_model_input(make_images(2, HELD_OUT_SEED)[0]))
    image_axes = {0: "batch", 2: "height", 3: "width"}
    k = POST_NMS_DETECTIONS
    # Output shapes as the graph declares them: the exporter leaves even the fixed sizes symbolic
    # (4 + C, K), and a reader that infers the layout from declared shapes needs them.
    specs = {
        "yolo": {"output0": ["batch", 4 + NUM_CLASSES, "anchors"]},
        "yolo_objectness": {"output0": ["batch", "anchors", 5 + NUM_CLASSES]},
        "post_nms": {"boxes": ["batch", k, 4], "scores": ["batch", k], "labels": ["batch", k]},
    }
    paths = {}
    for name, module in export_variants(net).items():
        outputs = specs[name]
        paths[name] = directory / FIXTURE_FILES[name]
        axes = {out: {i: d for i, d in enumerate(dims) if isinstance(d, str)} for out, dims in outputs.items()}
        with torch.no_grad():
            torch.onnx.export(
                module,
                (example,),
                str(paths[name]),
                dynamo=False,
                opset_version=17,
                input_names=["images"],
                output_names=list(outputs),
                dynamic_axes={"images": image_axes, **axes},
            )
        _declare_output_shapes(paths[name], outputs)
    return paths


def _declare_output_shapes(path: Path, outputs: dict[str, list[int | str]]) -> None:
    import onnx

    model = onnx.load(str(path))
    for output in model.graph.output:
        for dim, size in zip(output.type.tensor_type.shape.dim, outputs[output.name], strict=True):
            if isinstance(size, int):
                dim.dim_value = size
            else:
                dim.dim_param = size
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def load_detector(path: Path | None = None):
    """The trained torch model from the committed state_dict."""
    import torch

    net = build_detector()
    net.load_state_dict(torch.load(path or FIXTURES / FIXTURE_FILES["state_dict"], weights_only=True))
    return net.eval()


def check_onnx_matches_torch(net, paths: dict[str, Path], tolerance: float = 1e-3) -> dict[str, float]:
    """Largest |onnxruntime - torch| per variant over 128 and 160 pixel inputs, batch 1 and 3;
    AssertionError past ``tolerance`` or on any shape or dtype difference."""
    import onnxruntime as ort
    import torch

    variants = export_variants(net)
    worst: dict[str, float] = {}
    for name, path in paths.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        worst[name] = 0.0
        for size in (128, 160):
            for batch in (1, 3):
                x = torch.from_numpy(to_model_input(make_images(batch, HELD_OUT_SEED + size, size)[0]))
                with torch.no_grad():
                    expected = variants[name](x)
                expected = expected if isinstance(expected, tuple) else (expected,)
                got = session.run(None, {"images": x.numpy()})
                for g, e in zip(got, expected, strict=True):
                    e = e.numpy()
                    assert g.shape == e.shape and g.dtype == e.dtype, (name, size, batch, g.shape, e.shape)
                    worst[name] = max(worst[name], float(np.abs(g.astype(np.float64) - e).max()))
        assert worst[name] <= tolerance, (name, worst[name])
    return worst


def detections_from_outputs(name: str, outputs: list[np.ndarray]) -> list[np.ndarray]:
    """Per image (K, 6) [x1, y1, x2, y2, score, cls] from any of the three variants' outputs."""
    if name == "yolo":
        return decode_yolo(outputs[0])
    if name == "yolo_objectness":
        rows = outputs[0]  # (N, A, 5 + C): back to the yolo layout, score = objectness x class
        return decode_yolo(np.concatenate([rows[..., :4], rows[..., 4:5] * rows[..., 5:]], 2).transpose(0, 2, 1))
    boxes, scores, labels = outputs
    return [
        np.concatenate([b[s > 0], s[s > 0, None], c[s > 0, None]], 1).astype(np.float64)
        for b, s, c in zip(boxes, scores, labels, strict=True)
    ]


def evaluate_onnx(path: Path, name: str, n: int = 200, seed: int = HELD_OUT_SEED) -> dict[str, float]:
    """mAP of an ONNX variant on ``n`` held-out images."""
    import onnxruntime as ort

    images, targets = make_images(n, seed)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    detections: list[np.ndarray] = []
    x = to_model_input(images)
    for i in range(0, n, 50):
        detections += detections_from_outputs(name, session.run(None, {"images": x[i : i + 50]}))
    return mean_average_precision(detections, targets)


def snr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - candidate) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(signal / max(noise, 1e-30))


def int8_check(directory: Path, model: Path | None = None, n: int = 200) -> dict[str, Any]:
    """The problem this fixture exists for: onnxruntime's quantize_static (QDQ, per-channel weights,
    MinMax, 64 calibration images) of the yolo head, and the SNR of each output channel and the
    mAP afterwards, against FP32."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    model = model or FIXTURES / FIXTURE_FILES["yolo"]
    calibration = to_model_input(make_images(64, CALIBRATION_SEED)[0])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(calibration[i : i + 1] for i in range(len(calibration)))

        def get_next(self):
            row = next(self.rows, None)
            return None if row is None else {"images": row}

    quantized = directory / "shapes_yolo_int8.onnx"
    quantize_static(
        str(model),
        str(quantized),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
    )
    images, targets = make_images(n, HELD_OUT_SEED)
    x = to_model_input(images)
    fp32 = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    int8 = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    channels = [snr_db(fp32[:, c], int8[:, c]) for c in range(fp32.shape[1])]
    return {
        "box_channel_snr_db": channels[:4],
        "class_channel_snr_db": channels[4:],
        "fp32": mean_average_precision(decode_yolo(fp32), targets),
        "int8": mean_average_precision(decode_yolo(int8), targets),
        "max_abs_score_error": float(np.abs(fp32[:, 4:] - int8[:, 4:]).max()),
    }


def regenerate(directory: Path = FIXTURES, *, train: bool = True, log=print) -> dict[str, Any]:
    """Train (or load the committed weights), export the three ONNX variants, check them against
    torch and measure them on the held-out images."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    if train:
        net = train_detector(log=log)
        torch.save(net.state_dict(), directory / FIXTURE_FILES["state_dict"])
    else:
        # Re-exporting elsewhere (a scratch directory) starts from the committed weights.
        weights = directory / FIXTURE_FILES["state_dict"]
        net = load_detector(weights if weights.exists() else None)
    trained_s = time.monotonic() - start
    paths = export_onnx(net, directory)
    report: dict[str, Any] = {
        "train_s": round(trained_s, 1),
        "params": sum(p.numel() for p in net.parameters()),
        "onnx_vs_torch_max_abs": check_onnx_matches_torch(net, paths),
        "bytes": {k: p.stat().st_size for k, p in paths.items()},
    }
    report["held_out_map"] = {name: evaluate_onnx(path, name) for name, path in paths.items()}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.synthetic_detector", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "command",
        choices=["train", "export", "int8-check"],
        help="train: retrain and rewrite every fixture; export: re-export the ONNX files "
        "from the committed weights; int8-check: quantize shapes_yolo.onnx and compare",
    )
    parser.add_argument("--out", type=Path, default=FIXTURES, help="where the fixtures go (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "int8-check":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(int8_check(Path(tmp), args.out / FIXTURE_FILES["yolo"]), indent=2))
        return 0
    print(json.dumps(regenerate(args.out, train=args.command == "train"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
