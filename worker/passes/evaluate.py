"""evaluate: the task's metric for the original and every artifact so far, streamed batch by batch
over every sample of the set (the last partial batch runs at its own size, or padded for a
fixed-batch model).

- classification: top-1/top-5 with class labels; top-1 agreement with the original without.
- detection: decoded and NMS'd in numpy (worker.metrics.detection); mAP@0.5 and @0.5:0.95 with box
  labels; without, post-NMS agreement with the original's detections (precision, recall, F1, mean
  IoU of matches, score drift) and the worst class channel's SNR of a raw head.
- segmentation: pixel agreement and mean IoU of the masks against the original's.
Every entry also has whole-output fidelity (cosine, SNR, worst output channel's SNR) and one
``metric`` {name, value, reference, drop}: what the recommendation and its verdicts compare."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from core.errors import PassError
from worker.passes.base import (
    MEASURABLE_FORMATS,
    NEEDS_DATASET,
    ArtifactRef,
    Pass,
    PassConfig,
    PassContext,
    PassResult,
)


class EvaluateConfig(PassConfig):
    max_samples: int = Field(default=1000, ge=1, le=1_000_000)
    batch_size: int = Field(default=32, ge=1, le=1024)


def snr_db(reference, got) -> float:
    """10·log10(signal / noise) of ``got`` against ``reference`` (inf when they agree exactly)."""
    ref = np.asarray(reference, np.float64)
    noise = float(((np.asarray(got, np.float64).reshape(ref.shape) - ref) ** 2).sum())
    return float("inf") if noise == 0 else float(10 * np.log10(max(float((ref**2).sum()), 1e-30) / noise))


def _snr(signal: float, noise: float) -> float:
    return float(10 * np.log10(signal / noise)) if noise > 0 and signal > 0 else float("inf")


class Fidelity:
    """Whole-output agreement with the original, in running sums (memory does not grow with the set):
    cosine per sample, SNR, and per-channel SNR along ``channel_axis`` of the first output (a tail of one
    output can collapse under INT8 while the whole tensor still looks fine)."""

    def __init__(self, channel_axis: int = 1) -> None:
        self.channel_axis = channel_axis
        self.n = 0
        self.cos_sum = self.signal = self.noise = 0.0
        self.chan_signal: np.ndarray | None = None
        self.chan_noise: np.ndarray | None = None

    def add(self, got: np.ndarray, reference: np.ndarray) -> None:
        out = got.reshape(len(got), -1).astype(np.float64)
        ref = reference.reshape(len(reference), -1).astype(np.float64)
        self.n += len(out)
        denom = np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
        self.cos_sum += float(np.where(denom > 0, (out * ref).sum(1) / np.maximum(denom, 1e-30), 1.0).sum())
        self.signal += float((ref**2).sum())
        self.noise += float(((out - ref) ** 2).sum())
        axis = self.channel_axis if reference.ndim > self.channel_axis else reference.ndim - 1
        r = np.moveaxis(reference.astype(np.float64), axis, 1).reshape(len(reference), reference.shape[axis], -1)
        e = np.moveaxis(got.astype(np.float64).reshape(reference.shape), axis, 1).reshape(r.shape) - r
        sig, noi = (r**2).sum((0, 2)), (e**2).sum((0, 2))
        self.chan_signal = sig if self.chan_signal is None else self.chan_signal + sig
        self.chan_noise = noi if self.chan_noise is None else self.chan_noise + noi

    def channel_snrs(self) -> list[float]:
        return [_snr(s, n) for s, n in zip(self.chan_signal, self.chan_noise, strict=True)]

    def result(self) -> dict[str, float]:
        return {
            "cosine": self.cos_sum / self.n,
            "snr_db": _snr(self.signal, self.noise),
            "worst_channel_snr_db": min(self.channel_snrs()),
        }


class ClassificationTally:
    def __init__(self) -> None:
        self.n = self.top1 = self.top5 = self.agree = 0
        self.fidelity = Fidelity()

    def add(self, outputs: list[np.ndarray], reference: list[np.ndarray], labels, targets) -> None:
        out, ref = outputs[0], reference[0]
        flat = out.reshape(len(out), -1)
        self.n += len(flat)
        if labels is not None and flat.shape[1] > 1:
            order = np.argsort(-flat, axis=1)
            self.top1 += int((order[:, 0] == labels).sum())
            self.top5 += int((order[:, :5] == labels[:, None]).any(axis=1).sum())
        self.agree += int((flat.argmax(1) == ref.reshape(len(ref), -1).argmax(1)).sum())
        self.fidelity.add(out, ref)

    def result(self, labeled: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"fidelity": {**self.fidelity.result(), "top1_agreement": self.agree / self.n}}
        if labeled:
            out["accuracy"] = {"top1": self.top1 / self.n, "top5": self.top5 / self.n}
            out["metric"] = {"name": "top1", "value": out["accuracy"]["top1"]}
        else:
            out["metric"] = {"name": "top1_agreement", "value": out["fidelity"]["top1_agreement"]}
        return out


class DetectionTally:
    """Post-NMS agreement with the original's detections, mAP against box labels, and for raw heads the
    per-channel SNR of the head (its class channels are what INT8 destroys)."""

    def __init__(self, layout: str, options: dict[str, Any], channel_axis: int) -> None:
        from worker.metrics.detection import AgreementTally, MeanAveragePrecision

        self.layout, self.options = layout, options
        self.agreement = AgreementTally()
        self.map = MeanAveragePrecision()
        self.fidelity = Fidelity(channel_axis) if layout != "post_nms" else None
        self.n = 0

    def decode(self, outputs: list[np.ndarray], *, for_map: bool = False):
        from worker.metrics.detection import decode

        o = self.options
        return decode(
            outputs, self.layout, box_format=o.get("box_format", "xywh"),
            # mAP ranks every candidate (COCO practice); agreement compares what a user would keep.
            conf_threshold=0.001 if for_map else o.get("conf_threshold", 0.25),
            iou_threshold=o.get("iou_threshold", 0.45), max_detections=o.get("max_detections", 300),
        )

    def decode_all(self, outputs, *, for_map: bool = False):
        if isinstance(outputs, PerSample):
            return [d for sample in outputs for d in self.decode(sample, for_map=for_map)]
        return self.decode(outputs, for_map=for_map)

    def add(self, outputs, reference, labels, targets) -> None:
        reference_detections = self.decode_all(reference)
        self.n += len(reference_detections)
        self.agreement.add(reference_detections, self.decode_all(outputs))
        if targets is not None:
            self.map.add(self.decode_all(outputs, for_map=True), targets)
        if self.fidelity is not None and not isinstance(outputs, PerSample) and not isinstance(reference, PerSample):
            self.fidelity.add(outputs[0], reference[0])

    def result(self, labeled: bool) -> dict[str, Any]:
        agreement = self.agreement.result()
        fidelity: dict[str, Any] = {k: agreement[k] for k in ("f1", "precision", "recall", "mean_iou", "score_drift")}
        fidelity["detections"] = agreement.get("candidate_detections")
        if self.fidelity is not None and self.fidelity.n:
            fidelity.update(self.fidelity.result())
            channels = self.fidelity.channel_snrs()
            skip = 5 if self.layout == "yolo_objectness" else 4
            if len(channels) > skip:
                fidelity["worst_class_channel_snr_db"] = min(channels[skip:])
                fidelity["box_snr_db"] = min(channels[:4])
        out: dict[str, Any] = {"fidelity": fidelity}
        mean_ap = self.map.result() if labeled else None
        if mean_ap is not None and mean_ap["map50_95"] is not None:
            out["accuracy"] = {"map50": mean_ap["map50"], "map50_95": mean_ap["map50_95"]}
            out["metric"] = {"name": "map50_95", "value": mean_ap["map50_95"]}
        else:  # no labels, or labels with no object in any image measured: agreement with FP32 decides
            out["metric"] = {"name": "f1_vs_float", "value": fidelity["f1"]}
        return out


class SegmentationTally:
    """Masks (argmax over classes; a one-channel map thresholded at 0.5, or 0 for logits) against the
    original's: pixel agreement and mean IoU over the classes either mask has."""

    def __init__(self) -> None:
        self.pixels = self.agree = 0
        self.intersection: dict[int, int] = {}
        self.union: dict[int, int] = {}
        self.fidelity = Fidelity()

    @staticmethod
    def masks(out: np.ndarray) -> np.ndarray:
        if out.shape[1] > 1:
            return out.argmax(1)
        threshold = 0.5 if out.min() >= 0 and out.max() <= 1 else 0.0
        return (out[:, 0] > threshold).astype(np.int64)

    def add(self, outputs: list[np.ndarray], reference: list[np.ndarray], labels, targets) -> None:
        got, ref = self.masks(outputs[0]), self.masks(reference[0])
        self.pixels += ref.size
        self.agree += int((got == ref).sum())
        for c in np.union1d(np.unique(got), np.unique(ref)).tolist():
            g, r = got == c, ref == c
            self.intersection[c] = self.intersection.get(c, 0) + int((g & r).sum())
            self.union[c] = self.union.get(c, 0) + int((g | r).sum())
        self.fidelity.add(outputs[0], reference[0])

    def result(self, labeled: bool) -> dict[str, Any]:
        ious = [self.intersection[c] / self.union[c] for c in self.union if self.union[c]]
        fidelity = {**self.fidelity.result(), "pixel_agreement": self.agree / self.pixels,
                    "mean_iou": float(np.mean(ious)) if ious else 1.0}
        return {"fidelity": fidelity, "metric": {"name": "pixel_agreement", "value": fidelity["pixel_agreement"]}}


class Evaluate(Pass):
    name = "evaluate"
    description = "The task's metric (accuracy, mAP, or agreement with the original) of every artifact so far."
    Config = EvaluateConfig
    accepts = MEASURABLE_FORMATS
    produces = None
    needs = frozenset({NEEDS_DATASET})
    version = 3

    def run(self, ctx: PassContext, source: ArtifactRef, config: EvaluateConfig) -> PassResult:
        from worker.data import iter_batches
        from worker.runtime import load_runner, split_runnable

        dataset, used = ctx.evaluation_dataset, "evaluation"
        if dataset is None:
            dataset, used = ctx.calibration_dataset, "calibration"
        if dataset is None:
            raise PassError("evaluate needs an evaluation or calibration dataset", code="dataset_required")
        if len(ctx.input_spec) != 1:
            raise PassError("evaluate feeds single-input models only", code="unsupported_model")
        spec = ctx.input_spec[0]
        fixed = int(spec["shape"][0])
        batch_size = config.batch_size - config.batch_size % fixed or fixed
        variants, skipped = split_runnable([ctx.original, *ctx.artifacts])
        runners = [_BatchAdapter(load_runner(v, threads=ctx.threads), spec["name"], fixed) for v in variants]
        total = min(config.max_samples, dataset.num_samples)
        if total == 0:
            raise PassError(f"the {used} dataset has no samples", code="empty_dataset")
        targets = _box_targets(dataset, spec, ctx, total)

        tallies: list | None = None
        task, notes = ctx.task, []
        seen, start = 0, 0
        for x, labels in iter_batches(dataset, spec, ctx.preprocessing, batch_size=batch_size, limit=total):
            ctx.check_cancelled()
            reference = runners[0](x)
            if tallies is None:
                task, layout, notes = _resolve_task(ctx, spec, reference)
                tallies = [_tally(task, layout, ctx) for _ in variants]
            batch_targets = targets[start : start + len(x)] if targets is not None and task == "detection" else None
            if task == "classification" and labels is not None:
                _check_classes(labels, reference[0])
            for runner, tally in zip(runners, tallies, strict=True):
                tally.add(runner(x) if runner is not runners[0] else reference, reference, labels, batch_targets)
            seen += len(x)
            start += len(x)
            ctx.report_progress(seen / total)

        labeled = _labeled_for(task, dataset)
        results = []
        reference_value = None
        for v, tally in zip(variants, tallies, strict=True):
            entry = {"artifact": v.name, "step": v.step, "samples": seen, "task": task, **tally.result(labeled)}
            if reference_value is None:
                reference_value = entry["metric"]["value"]
            entry["metric"].update(reference=reference_value, drop=reference_value - entry["metric"]["value"],
                                   higher_is_better=True)
            results.append(entry)
        metrics: dict[str, Any] = {
            "dataset": used, "num_samples": seen, "task": task,
            "labels": dataset.label_type if labeled else None,
            "results": results + [{"artifact": v.name, "skipped": reason} for v, reason in skipped],
        }
        if notes:
            metrics["warning"] = "; ".join(notes)
        return PassResult(metrics=metrics)


def _labeled_for(task: str, dataset) -> bool:
    """Labels count when they are the task's kind: classes for a classifier, boxes for a detector."""
    kind = dataset.label_type or ("classes" if dataset.labeled else None)
    return (task == "classification" and kind == "classes") or (task == "detection" and kind == "boxes")


def _resolve_task(ctx: PassContext, spec: dict, reference: list[np.ndarray]) -> tuple[str, str | None, list[str]]:
    """(task, detection layout, notes) from the job and, for auto, the original's real outputs."""
    from core.tasks import detection_layout, infer_task, input_hw

    shapes = [list(o.shape) for o in reference]
    shape = spec["shape"]
    task, notes = ctx.task, []
    if task == "auto":
        task = infer_task(shapes, shape)
        if task is None:
            notes.append(f"the outputs {shapes} do not say the task; measured as classification (give the job's "
                         "task to choose)")
            task = "classification"
    layout = None
    if task == "detection":
        options = ctx.task_options.get("detection") or {}
        layout = detection_layout(shapes, input_hw(shape), options.get("layout", "auto"))
        if layout is None:
            raise PassError(
                f"the detector's outputs {shapes} are none of the layouts read (a YOLO head (N, 4+C, A) or "
                "(N, A, 5+C), or boxes/scores/labels); give detection.layout",
                code="unsupported_outputs", details={"outputs": shapes},
            )
    return task, layout, notes


def _tally(task: str, layout: str | None, ctx: PassContext):
    if task == "detection":
        options = ctx.task_options.get("detection") or {}
        return DetectionTally(layout, options, channel_axis=1)
    if task == "segmentation":
        return SegmentationTally()
    return ClassificationTally()


def _check_classes(labels: np.ndarray, out: np.ndarray) -> None:
    if out.ndim >= 2 and labels.size and labels.max() >= out.shape[1]:
        raise PassError(
            f"the dataset has labels up to {int(labels.max())} but the model scores {out.shape[1]} classes",
            code="classes_mismatch",
        )


def _box_targets(dataset, spec: dict, ctx: PassContext, total: int):
    """Each sample's boxes in model-input pixels (None unless the set has box labels), in the order
    iter_batches reads the images."""
    if dataset.label_type != "boxes":
        return None
    from core.datasets import image_sizes, list_images, read_box_targets
    from worker.metrics.detection import Detections, targets_to_input_pixels

    from core.tasks import input_hw

    height, width = input_hw(spec["shape"])
    members = list_images(dataset.path, dataset.format).members[:total]
    boxes = read_box_targets(dataset.path, dataset.format)
    targets = []
    for member, size in zip(members, image_sizes(dataset.path, dataset.format, members), strict=True):
        rows = boxes.get(member, np.zeros((0, 5)))
        mapped = targets_to_input_pixels(rows, size, (width, height), ctx.preprocessing.resize)
        targets.append(Detections(boxes=mapped[:, 1:5], scores=np.ones(len(mapped)),
                                  labels=mapped[:, 0].astype(np.int64)))
    return targets


class _BatchAdapter:
    """Feeds a batch to a variant, split into the upload's fixed batch size when it refuses
    another size (exports with batch fixed at 1 are common). Returns every output."""

    def __init__(self, runner, name: str, fixed_batch: int) -> None:
        self.runner, self.name, self.fixed_batch = runner, name, max(fixed_batch, 1)
        self.split = False

    def __call__(self, x) -> list[np.ndarray]:
        from worker.runtime import run_in_fixed_batches

        if not self.split:
            try:
                return _batched(self.runner({self.name: x}), len(x))
            except Exception:  # runtimes raise their own types for a shape they refuse
                if len(x) == self.fixed_batch:
                    raise
                self.split = True
        if self.fixed_batch == 1:
            # One sample at a time: also right for batch-less outputs (torchvision-style detections).
            per_sample = [_batched(self.runner({self.name: x[i : i + 1]}), 1) for i in range(len(x))]
            if any(len({p[k].shape for p in per_sample}) > 1 for k in range(len(per_sample[0]))):
                return PerSample(per_sample)  # a detection count that varies by image
            return [np.concatenate(parts) for parts in zip(*per_sample, strict=True)]
        return run_in_fixed_batches(self.runner, {self.name: x}, self.fixed_batch)


class PerSample(list):
    """Each sample's own outputs, when their shapes differ between samples (post-NMS detections of a
    batch-less export): only the detection measures take them."""


def _batched(outputs: list[np.ndarray], n: int) -> list[np.ndarray]:
    """Outputs with a leading batch axis: a batch-less export run on one sample gets one."""
    return [o[None] if n == 1 and (o.ndim == 0 or o.shape[0] != 1) else o for o in outputs]
