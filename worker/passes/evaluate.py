"""evaluate: the task's metric for the original and every artifact so far, streamed batch by batch
over every sample of the set (the last partial batch runs at its own size, or padded for a
fixed-batch model).

- classification: top-1/top-5 with class labels; top-1 agreement with the original without.
- detection: decoded and NMS'd in numpy (worker.metrics.detection); mAP@0.5 and @0.5:0.95 with box
  labels; without, post-NMS agreement with the original's detections (precision, recall, F1, mean
  IoU of matches, score drift). A raw head's worst score channel SNR is the metric's floor.
- segmentation: pixel agreement and mean IoU of the masks against the original's.
Every entry also has whole-output fidelity (cosine, SNR, worst output channel's SNR) and one
``metric`` {name, value, reference, drop[, floor]}: what the recommendation and its verdicts
compare. The tallies are worker.metrics.tasks', the same the INT8 gate judges with."""

from __future__ import annotations

from typing import Any

from core.errors import PassError
from core.steps.evaluate import EvaluateConfig, EvaluateSpec
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult


class Evaluate(EvaluateSpec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: EvaluateConfig) -> PassResult:
        from worker.data import iter_batches
        from worker.metrics.tasks import box_targets, labels_fit_task, make_tally, measured_task, with_drop
        from worker.runtime import BatchRunner, load_runner, split_runnable

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
        runners = [BatchRunner(load_runner(v, threads=ctx.threads), spec["name"], fixed) for v in variants]
        total = min(config.max_samples, dataset.num_samples)
        if total == 0:
            raise PassError(f"the {used} dataset has no samples", code="empty_dataset")
        targets = box_targets(dataset, spec["shape"], ctx.preprocessing, total)

        tallies: list | None = None
        task, note = ctx.task, None
        seen = 0
        for x, labels in iter_batches(dataset, spec, ctx.preprocessing, batch_size=batch_size, limit=total):
            ctx.check_cancelled()
            reference = runners[0](x)
            if tallies is None:
                task, layout, note = measured_task(ctx.task, ctx.task_options, reference, spec["shape"])
                labeled = labels_fit_task(task, dataset)
                tallies = [make_tally(task, layout, ctx.task_options, labeled=labeled) for _ in variants]
            batch_targets = targets[seen : seen + len(x)] if targets is not None else None
            for runner, tally in zip(runners, tallies, strict=True):
                tally.add(runner(x) if runner is not runners[0] else reference, reference, labels, batch_targets)
            seen += len(x)
            ctx.report_progress(seen / total)
        if tallies is None:
            raise PassError(f"the {used} dataset yielded no samples", code="empty_dataset")

        results = []
        reference_value = None
        for v, tally in zip(variants, tallies, strict=True):
            entry = {"artifact": v.name, "step": v.step, "samples": seen, "task": task, **tally.result()}
            if reference_value is None:
                reference_value = entry["metric"]["value"]
            entry["metric"] = with_drop(entry["metric"], reference_value)
            results.append(entry)
        metrics: dict[str, Any] = {
            "dataset": used,
            "num_samples": seen,
            "task": task,
            "labels": dataset.label_type if labeled else None,
            "results": results + [{"artifact": v.name, "skipped": reason} for v, reason in skipped],
        }
        if note:
            metrics["warning"] = note
        return PassResult(metrics=metrics)
