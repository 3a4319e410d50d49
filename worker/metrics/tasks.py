"""The task's metric of a candidate against its float original, batch after batch: one tally per
task, shared by evaluate (its verdicts) and quantize_int8 (its gate), so that the gate's metric IS
the verdict's metric.

A tally is fed each batch's candidate outputs beside the original's (``add``); ``result()`` gives
``{"metric": {"name", "value"[, "floor"]}, "fidelity": {...}[, "accuracy": {...}]}``. The drop is
the original's value minus the candidate's (the original's tally, fed its own outputs, gives the
reference value); ``meets_tolerance`` is the verdict on it.

- classification: top-1 (class labels) or top-1 agreement with the original.
- detection: mAP@0.5:0.95 (box labels with an object) or post-NMS F1 against the original's
  detections; a raw head also has a floor, its worst score channel's SNR.
- segmentation: pixel agreement of the masks with the original's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from core.datasets import image_sizes, read_box_targets
from core.errors import PassError
from core.recommend import over_tolerance
from core.schemas import DetectionOptions
from core.tasks import input_hw, resolve_measured_task
from worker.metrics.detection import (
    RAW_HEAD_LAYOUTS,
    AgreementTally,
    Detections,
    MeanAveragePrecision,
    PerSample,
    decode,
    head_channel_snrs,
    scores_are_logits,
    targets_to_input_pixels,
)
from worker.metrics.fidelity import Fidelity

# Outputs of one batch: every output batch-first, or each sample's own (worker.runtime.BatchRunner).
Outputs = list[np.ndarray] | PerSample
# mAP ranks every candidate box (COCO practice); agreement compares what a user would keep.
MAP_CONF_THRESHOLD = 0.001


def labels_fit_task(task: str, dataset) -> bool:
    """Labels count when they are the task's kind: classes for a classifier, boxes for a detector."""
    kind = dataset.label_type or ("classes" if dataset.labeled else None)
    return (task == "classification" and kind == "classes") or (task == "detection" and kind == "boxes")


def detection_options(task_options: dict[str, Any]) -> DetectionOptions:
    """The job's detection options with their defaults (one place for 0.25 / 0.45 / 300 / xywh)."""
    return DetectionOptions.model_validate(task_options.get("detection") or {})


def meets_tolerance(metric: dict[str, Any], tolerance: float) -> bool:
    """Within ``tolerance`` of the original on the task's metric, and above the metric's floor when
    it has one: the rule core.recommend judges artifacts by."""
    return not over_tolerance(metric, tolerance)


def with_drop(metric: dict[str, Any], reference: float) -> dict[str, Any]:
    return {**metric, "reference": reference, "drop": reference - metric["value"], "higher_is_better": True}


def make_tally(task: str, layout: str | None, task_options: dict[str, Any], *, labeled: bool):
    """The tally of ``task`` (``layout``: the detection layout, core.tasks.resolve_measured_task)."""
    if task == "detection":
        return DetectionTally(layout, detection_options(task_options), labeled=labeled)
    if task == "segmentation":
        return SegmentationTally()
    return ClassificationTally(labeled=labeled)


class ClassificationTally:
    """Top-1/top-5 against class labels, and top-1 agreement with the original."""

    def __init__(self, *, labeled: bool) -> None:
        self.labeled = labeled
        self.n = self.top1 = self.top5 = self.agree = 0
        self.fidelity = Fidelity()

    def add(
        self,
        outputs: Outputs,
        reference: Outputs,
        labels: np.ndarray | None = None,
        targets: Sequence[Detections] | None = None,
    ) -> None:
        out, ref = outputs[0], reference[0]
        flat = out.reshape(len(out), -1)
        self.n += len(flat)
        if self.labeled and labels is not None and flat.shape[1] > 1:
            if labels.size and labels.max() >= flat.shape[1]:
                raise PassError(
                    f"the dataset has labels up to {int(labels.max())} but the model scores {flat.shape[1]} classes",
                    code="classes_mismatch",
                )
            order = np.argsort(-flat, axis=1)
            self.top1 += int((order[:, 0] == labels).sum())
            self.top5 += int((order[:, :5] == labels[:, None]).any(axis=1).sum())
        self.agree += int((flat.argmax(1) == ref.reshape(len(ref), -1).argmax(1)).sum())
        self.fidelity.add(out, ref)

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fidelity": {**self.fidelity.result(), "top1_agreement": self.agree / self.n}}
        if self.labeled:
            out["accuracy"] = {"top1": self.top1 / self.n, "top5": self.top5 / self.n}
            out["metric"] = {"name": "top1", "value": out["accuracy"]["top1"]}
        else:
            out["metric"] = {"name": "top1_agreement", "value": out["fidelity"]["top1_agreement"]}
        return out


class DetectionTally:
    """Post-NMS agreement with the original's detections, mAP against box labels, and for a raw
    head the SNR of its channels: the worst score channel is the metric's floor (INT8 flattens
    class channels while F1 at one threshold and the whole tensor's cosine still look fine)."""

    def __init__(self, layout: str, options: DetectionOptions, *, labeled: bool) -> None:
        self.layout, self.options, self.labeled = layout, options, labeled
        self.agreement = AgreementTally()
        self.map = MeanAveragePrecision()
        # A raw head's channels lie along its shorter axis, as Fidelity's do: its per-channel sums
        # give both the fidelity and the score channels' SNR.
        self.fidelity = Fidelity() if layout in RAW_HEAD_LAYOUTS else None
        self.logits: bool | None = None
        self.logits_decided = False

    def decode(self, outputs: Outputs, *, for_map: bool = False) -> list[Detections]:
        o = self.options
        samples = outputs if isinstance(outputs, PerSample) else [outputs]
        return [
            d
            for sample in samples
            for d in decode(
                sample,
                self.layout,
                box_format=o.box_format,
                conf_threshold=MAP_CONF_THRESHOLD if for_map else o.conf_threshold,
                iou_threshold=o.iou_threshold,
                max_detections=o.max_detections,
                scores_are_logits=self.logits,
            )
        ]

    def add(
        self,
        outputs: Outputs,
        reference: Outputs,
        labels: np.ndarray | None = None,
        targets: Sequence[Detections] | None = None,
    ) -> None:
        if not self.logits_decided:
            # Once, from the original: every candidate's scores are read the way FP32's are.
            first = reference[0] if isinstance(reference, PerSample) else reference
            self.logits, self.logits_decided = scores_are_logits(first, self.layout), True
        reference_detections = self.decode(reference)
        # The original's own tally is fed its outputs as both: decoded once.
        self.agreement.add(reference_detections, reference_detections if outputs is reference else self.decode(outputs))
        if self.labeled and targets is not None:
            self.map.add(self.decode(outputs, for_map=True), list(targets))
        if self.fidelity is not None and not isinstance(outputs, PerSample) and not isinstance(reference, PerSample):
            self.fidelity.add(outputs[0], reference[0])

    def head_snrs(self) -> dict[str, float]:
        return head_channel_snrs(self.fidelity.channels) if self.fidelity is not None else {}

    def floor(self) -> dict[str, Any] | None:
        measured = self.head_snrs()
        if "worst_class_channel_snr_db" not in measured:
            return None
        value = measured["worst_class_channel_snr_db"]
        least = self.options.min_class_channel_snr_db
        return {"name": "worst_class_channel_snr_db", "min": least, "value": value, "met": bool(value >= least)}

    def result(self) -> dict[str, Any]:
        agreement = self.agreement.result()
        fidelity: dict[str, Any] = {k: agreement[k] for k in ("f1", "precision", "recall", "mean_iou", "score_drift")}
        fidelity["detections"] = agreement["candidate_detections"]
        if self.fidelity is not None and self.fidelity.samples:
            fidelity.update(self.fidelity.result())
            fidelity.update(self.head_snrs())
        out: dict[str, Any] = {"fidelity": fidelity}
        mean_ap = self.map.result() if self.labeled else None
        if mean_ap is not None and mean_ap["map50_95"] is not None:
            out["accuracy"] = {"map50": mean_ap["map50"], "map50_95": mean_ap["map50_95"]}
            out["metric"] = {"name": "map50_95", "value": mean_ap["map50_95"]}
        else:  # no labels, or labels with no object in any image measured: agreement with FP32 decides
            out["metric"] = {"name": "f1_vs_float", "value": fidelity["f1"]}
        floor = self.floor()
        if floor is not None:
            out["metric"]["floor"] = floor
        return out


class SegmentationTally:
    """Masks (argmax over classes; a one-channel map thresholded at 0.5, or at 0 for logits, as the
    original's first batch says) against the original's: pixel agreement and mean IoU over the
    classes either mask has."""

    def __init__(self) -> None:
        self.pixels = self.agree = 0
        self.intersection: dict[int, int] = {}
        self.union: dict[int, int] = {}
        self.fidelity = Fidelity()
        self.threshold: float | None = None

    def masks(self, out: np.ndarray) -> np.ndarray:
        if out.ndim < 3 or out.shape[1] > 1:
            return out.argmax(1)
        return (out[:, 0] > self.threshold).astype(np.int64)

    def add(
        self,
        outputs: Outputs,
        reference: Outputs,
        labels: np.ndarray | None = None,
        targets: Sequence[Detections] | None = None,
    ) -> None:
        if self.threshold is None:
            ref = reference[0]
            self.threshold = 0.5 if ref.min() >= 0 and ref.max() <= 1 else 0.0
        got, ref = self.masks(outputs[0]), self.masks(reference[0])
        self.pixels += ref.size
        self.agree += int((got == ref).sum())
        for c in np.union1d(np.unique(got), np.unique(ref)).tolist():
            g, r = got == c, ref == c
            self.intersection[c] = self.intersection.get(c, 0) + int((g & r).sum())
            self.union[c] = self.union.get(c, 0) + int((g | r).sum())
        self.fidelity.add(outputs[0], reference[0])

    def result(self) -> dict[str, Any]:
        ious = [self.intersection[c] / self.union[c] for c in self.union if self.union[c]]
        fidelity = {
            **self.fidelity.result(),
            "pixel_agreement": self.agree / self.pixels if self.pixels else 1.0,
            "mean_iou": float(np.mean(ious)) if ious else 1.0,
        }
        return {"fidelity": fidelity, "metric": {"name": "pixel_agreement", "value": fidelity["pixel_agreement"]}}


def box_targets(dataset, input_shape: Sequence[int], preprocessing, total: int) -> list[Detections] | None:
    """Each of the first ``total`` samples' boxes in model-input pixels (None unless the set has box
    labels), in the order worker.data.iter_batches reads the images."""
    if dataset.label_type != "boxes":
        return None
    height, width = input_hw(input_shape)
    boxes = read_box_targets(dataset.path, dataset.format)  # keyed in the listing's order
    members = list(boxes)[:total]
    targets = []
    for member, size in zip(members, image_sizes(dataset.path, dataset.format, members), strict=True):
        rows = boxes[member]
        mapped = targets_to_input_pixels(
            rows, size, (width, height), preprocessing.resize, letterbox=preprocessing.letterbox
        )
        targets.append(
            Detections(boxes=mapped[:, 1:5], scores=np.ones(len(mapped)), labels=mapped[:, 0].astype(np.int64))
        )
    return targets


def measured_task(
    task: str, task_options: dict[str, Any], outputs: Outputs, input_shape: Sequence[int]
) -> tuple[str, str | None, str | None]:
    """(task, detection layout or None, note or None) from the job and the original's real outputs
    (core.tasks.resolve_measured_task; a detector no layout reads fails the step with its code)."""
    first = outputs[0] if isinstance(outputs, PerSample) else outputs
    return resolve_measured_task(
        task, [list(o.shape) for o in first], list(input_shape), detection_options(task_options).layout
    )
