"""INT8 candidates judged on the task's metric against the FP32 graph, with the tallies the verdicts
use (worker.metrics.tasks): a classifier's top-1 (class labels) or top-1 agreement, a detector's
mAP (box labels) or post-NMS F1 against FP32 plus its raw head's class-channel floor, a segmenter's
pixel agreement. The per-layer fallback and the speed search search on that judgement."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import PassError
from core.formats import ONNX
from core.steps.quantize_int8 import QuantizeInt8Config
from worker.metrics.detection import Detections, PerSample
from worker.metrics.tasks import (
    Outputs,
    box_targets,
    labels_fit_task,
    make_tally,
    measured_task,
    meets_tolerance,
    with_drop,
)
from worker.passes.base import ArtifactRef, DatasetRef, PassContext
from worker.runtime import BatchRunner, load_runner, pad_batch

if TYPE_CHECKING:
    from worker.quantization.quantizer import Quantizer

# The added-error probe holds every intermediate tensor of a batch twice (FP32 and twin): a few
# small batches do.
PROBE_SAMPLES = 32
PROBE_BATCH = 4
# Validation inputs and FP32's outputs on them are kept in memory up to this size, else read and run
# again for each candidate (a YOLOv8n head is 2.8 MB a sample).
VALIDATION_CACHE_BYTES = 256 * 2**20
# Progress shares: the gate starts after calibration, the search takes the rest.
GATE_PROGRESS, SEARCH_PROGRESS = 0.65, 0.7


@dataclass
class _Batch:
    x: np.ndarray
    reference: Outputs  # the FP32 graph's outputs
    labels: np.ndarray | None
    targets: list[Detections] | None


def _nbytes(outputs: Outputs) -> int:
    samples = outputs if isinstance(outputs, PerSample) else [outputs]
    return sum(o.nbytes for sample in samples for o in sample)


class ValidationSet:
    """The validation samples (the evaluation dataset, else the calibration one), FP32's outputs on
    them, the task measured from those outputs and FP32's own value of its metric (the reference
    every drop is taken from)."""

    def __init__(
        self,
        ctx: PassContext,
        spec: dict[str, Any],
        fp32: Path,
        *,
        batch_size: int,
        samples: int,
        fixed_batch: int | None,
    ) -> None:
        self.ctx, self.spec, self.fixed_batch, self.batch_size = ctx, spec, fixed_batch, batch_size
        self.dataset: DatasetRef = ctx.evaluation_dataset or ctx.calibration_dataset
        self.source = "evaluation" if ctx.evaluation_dataset else "calibration"
        self.samples = min(samples, self.dataset.num_samples)
        self.fp32 = self.runner(fp32)
        self.task: str | None = None
        self.layout: str | None = None
        self.note: str | None = None
        self.labeled = False
        self.targets: list[Detections] | None = None
        self.cached: list[_Batch] | None = []
        self.baseline = self._measure_fp32()

    def runner(self, graph: Path) -> BatchRunner:
        run = load_runner(ArtifactRef(graph.name, ONNX, graph), threads=self.ctx.threads)
        return BatchRunner(run, self.spec["name"], self.fixed_batch)

    def _measure_fp32(self) -> dict[str, Any]:
        tally, cached_bytes = None, 0
        for batch in self._stream():
            if tally is None:
                tally = self.tally()
            tally.add(batch.reference, batch.reference, batch.labels, batch.targets)
            cached_bytes += batch.x.nbytes + _nbytes(batch.reference)
            if self.cached is not None and cached_bytes <= VALIDATION_CACHE_BYTES:
                self.cached.append(batch)
            else:
                self.cached = None  # too large to hold: each candidate reads and runs FP32 again
        if tally is None:
            raise PassError(f"the {self.source} dataset yielded no samples", code="empty_dataset")
        self.ctx.report_progress(GATE_PROGRESS)
        metric = tally.result()["metric"]
        return with_drop(metric, metric["value"])

    def _read(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        from worker.data import iter_batches

        for x, labels in iter_batches(
            self.dataset, self.spec, self.ctx.preprocessing, batch_size=self.batch_size, limit=self.samples
        ):
            self.ctx.check_cancelled()
            yield x, labels

    def _stream(self) -> Iterator[_Batch]:
        seen = 0
        for x, labels in self._read():
            reference = self.fp32(x)
            if self.task is None:
                self._resolve_task(reference)
            targets = self.targets[seen : seen + len(x)] if self.targets is not None else None
            seen += len(x)
            yield _Batch(x, reference, labels, targets)

    def _resolve_task(self, reference: Outputs) -> None:
        self.task, self.layout, self.note = measured_task(
            self.ctx.task, self.ctx.task_options, reference, self.spec["shape"]
        )
        if self.note:
            self.ctx.log.warning(self.note)
        self.labeled = labels_fit_task(self.task, self.dataset)
        if self.task == "detection" and self.labeled:
            self.targets = box_targets(self.dataset, self.spec["shape"], self.ctx.preprocessing, self.samples)

    def batches(self) -> Iterator[_Batch]:
        yield from self.cached if self.cached is not None else self._stream()

    def tally(self):
        return make_tally(self.task, self.layout, self.ctx.task_options, labeled=self.labeled)

    def judge(self, candidate: Path) -> dict[str, Any]:
        """The candidate's metric {name, value, reference, drop[, floor]}, as evaluate would give it."""
        run, tally = self.runner(candidate), self.tally()
        for batch in self.batches():
            tally.add(run(batch.x), batch.reference, batch.labels, batch.targets)
        return with_drop(tally.result()["metric"], self.baseline["value"])

    def inputs(self) -> Iterator[np.ndarray]:
        if self.cached is not None:
            yield from (batch.x for batch in self.cached)
        else:
            yield from (x for x, _ in self._read())

    def probe_batches(self) -> Iterator[np.ndarray]:
        """The first PROBE_SAMPLES samples in batches the model takes (a fixed batch padded with
        copies of the last sample: a duplicate weighs one sample twice, harmlessly)."""
        size = self.fixed_batch or PROBE_BATCH
        left = PROBE_SAMPLES
        for x in self.inputs():
            for i in range(0, len(x), size):
                if left <= 0:
                    return
                part = x[i : i + min(size, left)]
                left -= len(part)
                yield pad_batch(part, self.fixed_batch) if self.fixed_batch else part

    def timing_feed(self) -> np.ndarray:
        """One batch-1 input (or the fixed batch's worth) for timing."""
        x = next(iter(self.inputs()))
        return pad_batch(x[: self.fixed_batch or 1], self.fixed_batch or 1)


def attempt_entry(metric: dict[str, Any]) -> dict[str, Any]:
    """One candidate's line in the report: {<metric name>: value, "drop"[, <floor name>: value, "floor_met"]}."""
    out: dict[str, Any] = {metric["name"]: metric["value"], "drop": metric["drop"]}
    floor = metric.get("floor")
    if floor:
        out[floor["name"]] = floor["value"]
        out["floor_met"] = floor["met"]
    return out


def _badness(metric: dict[str, Any]) -> tuple[bool, float]:
    """Ordering of candidates that all miss: under the floor is worse than any drop."""
    floor = metric.get("floor")
    return (bool(floor and not floor["met"]), float(metric["drop"]))


def _float_counts(most: int) -> list[int]:
    """1, 2, 4, ... up to ``most`` nodes kept in float: each try doubles the last."""
    return sorted({min(2**i, most) for i in range(most.bit_length() + 1)} - {0})


def per_layer_fallback(
    ctx: PassContext,
    config: QuantizeInt8Config,
    tolerance: float | None,
    quantizer: Quantizer,
    validation: ValidationSet,
    full: Path,
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(the chosen graph, its metric, the report): ``full`` when it meets the tolerance (or none is given), else
    the nodes that add the most error kept in float, doubling their number, until the task's metric
    is within the tolerance (and above its floor); the best found when none is."""
    from worker.quantization.probe import added_error_ranking

    report = _fallback_report(validation, tolerance)
    metric = validation.judge(full)
    report["attempts"].append({"float_layers": 0, **attempt_entry(metric)})
    ctx.report_progress(SEARCH_PROGRESS)
    if tolerance is None or meets_tolerance(metric, tolerance):
        report.update(tolerance_met=None if tolerance is None else True, result=metric["value"])
        return full, metric, report

    ranked = added_error_ranking(
        quantizer.prepared,
        full,
        validation.probe_batches(),
        validation.spec["name"],
        skip=set(config.exclude_nodes) | set(quantizer.head_nodes),
        threads=ctx.threads,
    )
    report["ranked_by"] = "added_error"
    report["most_damaging"] = ranked[:16]
    best: tuple[dict[str, Any], Path, list[dict[str, Any]]] = (metric, full, [])
    most = min(config.max_float_layers, len(ranked))
    for k in _float_counts(most):
        ctx.check_cancelled()
        candidate = quantizer.quantize(
            [layer["node"] for layer in ranked[:k]], ctx.work_dir / f"model.int8.fallback{k}.onnx"
        )
        metric = validation.judge(candidate)
        report["attempts"].append({"float_layers": k, **attempt_entry(metric)})
        if _badness(metric) < _badness(best[0]):
            best = (metric, candidate, ranked[:k])
        ctx.report_progress(SEARCH_PROGRESS + (1 - SEARCH_PROGRESS) * k / most)
        if meets_tolerance(metric, tolerance):
            break
    metric, chosen, kept = best
    report["kept_float"] = kept_float_entries(kept)
    report["tolerance_met"] = meets_tolerance(metric, tolerance)
    report["result"] = metric["value"]
    if not report["tolerance_met"]:
        report["reason"] = shortfall_reason(metric, tolerance, most)
        ctx.log.warning(report["reason"])
    return chosen, metric, report


def _fallback_report(validation: ValidationSet, tolerance: float | None) -> dict[str, Any]:
    baseline = validation.baseline
    report: dict[str, Any] = {
        "task": validation.task,
        "metric": baseline["name"],
        "validated_on": validation.source,
        "samples": validation.samples,
        "tolerance": tolerance,
        "fp32": baseline["value"],
        "attempts": [],
        "kept_float": [],
    }
    if validation.task == "detection":
        report["layout"] = validation.layout
    if baseline.get("floor"):
        report["floor"] = {"name": baseline["floor"]["name"], "min": baseline["floor"]["min"]}
    return report


def kept_float_entries(kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        dict(
            layer,
            reason=(
                f"alone, its quantization leaves its worst output channel at {layer['worst_channel_snr_db']:.1f} dB "
                f"SNR against FP32 on the same inputs (whole tensor {layer['snr_db']:.1f} dB): among the "
                f"{len(kept)} nodes that add the most error"
            ),
        )
        for layer in kept
    ]


def shortfall_reason(metric: dict[str, Any], tolerance: float, most: int) -> str:
    floor = metric.get("floor")
    if metric["drop"] > tolerance:
        shortfall = f"the {metric['name']} drop within {tolerance}"
    else:
        shortfall = f"{floor['name']} to {floor['min']:g} or more"
    measured = f", {floor['name']} {floor['value']:.1f}" if floor else ""
    return (
        f"keeping up to {most} layers in float did not bring {shortfall}; returning the best found "
        f"(drop {metric['drop']:.4f}{measured})"
    )


def speed_search(
    ctx: PassContext,
    config: QuantizeInt8Config,
    tolerance: float | None,
    quantizer: Quantizer,
    validation: ValidationSet,
    chosen: Path,
    chosen_metric: dict[str, Any],
    fallback: dict[str, Any],
) -> tuple[Path, dict[str, Any]]:
    """Time the quality-approved INT8 graph (``chosen``, judged ``chosen_metric`` by the fallback)
    against alternatives and the FP32 graph, on this worker, and keep the fastest INT8 that still
    meets the tolerance."""
    from worker.timing import time_interleaved

    kept = [layer["node"] for layer in fallback["kept_float"]]
    limit = tolerance if tolerance is not None else 1.0
    candidates: dict[str, Path] = {"qdq": chosen}
    try:
        candidates["qoperator"] = quantizer.quantize(kept, ctx.work_dir / "model.int8.qop.onnx", fmt="qoperator")
    except Exception as exc:  # QOperator lacks kernels for some graphs: not a candidate then
        ctx.log.warning("QOperator candidate failed: %s", exc)
    if config.op_types is None:
        candidates["qdq_weighted_only"] = quantizer.quantize(
            kept, ctx.work_dir / "model.int8.weighted.onnx", op_types=["Conv", "Gemm", "MatMul"]
        )
    judged = {label: chosen_metric if label == "qdq" else validation.judge(path) for label, path in candidates.items()}
    results = {
        label: {**attempt_entry(judged[label]), "size_bytes": path.stat().st_size} for label, path in candidates.items()
    }
    timings = time_interleaved(
        {"fp32": quantizer.prepared, **candidates},
        {validation.spec["name"]: validation.timing_feed()},
        runs=9,
        threads=ctx.threads,
    )
    for label in candidates:
        results[label]["p50_ms"] = timings[label]["p50_ms"]
    fp32_p50 = timings["fp32"]["p50_ms"]
    ok = [label for label in candidates if meets_tolerance(judged[label], limit)]
    best = min(ok or list(candidates), key=lambda label: results[label]["p50_ms"])
    report: dict[str, Any] = {"fp32_p50_ms": fp32_p50, "candidates": results, "chosen": best}
    if results[best]["p50_ms"] > fp32_p50:
        size_ratio = results[best]["size_bytes"] / quantizer.prepared.stat().st_size
        report["warning"] = (
            f"the fastest INT8 candidate ({best}, p50 {results[best]['p50_ms']:.3f} ms at batch 1) is slower "
            f"than the FP32 graph ({fp32_p50:.3f} ms) on this worker; it is {size_ratio:.2f}x "
            "the size. Keep the FP32 ONNX artifact where speed matters."
        )
        ctx.log.warning(report["warning"])
    if not ok:
        report["reason"] = "no candidate met the tolerance; returning the fastest of them"
    return candidates[best], report
