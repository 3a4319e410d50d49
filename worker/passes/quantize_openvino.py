"""quantize_openvino: NNCF post-training INT8 of an ONNX model into an OpenVINO IR (the archive format of
convert_openvino: one zip of model.xml + model.bin), calibrated on the job's calibration images.

Mixed-scale detector heads stay float (NNCF's ignored scope), found by the same analysis the service's
own INT8 uses (worker.quantization.heads) on the ONNX graph; OpenVINO's ONNX frontend names each op
after the ONNX node (or, for an unnamed node, its output), so the names carry over.

Nothing ships unjudged: the INT8 IR is run as benchmark and evaluate run it (worker.runtime, in the
configured inference precision) against the ONNX source on the job's validation images, with the INT8
gate's tallies and rule (worker.quantization.gate: top-1 / mAP / agreement, the detection class-channel
SNR floor). Whole-output cosine is not enough: NNCF INT8 zeroed YOLOv8n's class channels at cosine 0.998.
A miss runs NNCF's quantize_with_accuracy_control on the same metric, then is judged again; a second
miss fails the step (int8_over_tolerance) with the metric, the drop and the tolerance.

static_shape fixes the IR's inputs at the job's shape after NNCF (calibration and accuracy control run on
the open-batch model); the judge then feeds the IR at that batch."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import PassError
from core.formats import OPENVINO_IR
from core.steps.quantize_openvino import QuantizeOpenvinoConfig, QuantizeOpenvinoSpec
from worker.openvino_ir import fix_input_shapes, read_source, save_ir_archive
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult

# Samples whose Concat inputs' ranges decide which heads stay float (ranges settle within a few batches).
HEAD_RANGE_SAMPLES = 32


class QuantizeOpenvino(QuantizeOpenvinoSpec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: QuantizeOpenvinoConfig) -> PassResult:
        from worker.quantization.gate import ValidationSet
        from worker.quantization.graph import graph_input

        if ctx.calibration_dataset is None:  # checked at POST /v1/jobs; kept for direct callers
            raise PassError("quantize_openvino needs a calibration dataset", code="calibration_dataset_required")
        if len(ctx.input_spec) != 1:
            raise PassError("calibration feeds single-input models only", code="unsupported_model")
        if not ctx.calibration_dataset.num_samples:
            raise PassError("the calibration dataset has no samples", code="empty_dataset")
        input_name, fixed_batch = graph_input(source.path)
        spec = dict(ctx.input_spec[0], name=input_name)
        ignored = _float_heads(ctx, source.path, spec, fixed_batch) if config.keep_heads_float else []
        outputs = _node_outputs(source.path) if ignored else {}
        tolerance = config.max_accuracy_drop
        if tolerance is None:
            tolerance = float(ctx.task_options.get("max_accuracy_drop", 0.01))

        nncf, model = _nncf(), read_source(source)
        missing = _attach_openvino_names(model, ignored, outputs)
        calibration = nncf.Dataset(_Calibration(ctx, spec, fixed_batch, config.subset_size))
        kwargs = _quantize_kwargs(nncf, config, ignored, calibration.get_length() or 0)
        quantized = nncf.quantize(model, calibration, **kwargs)
        ctx.report_progress(0.5)
        validation = ValidationSet(
            ctx,
            spec,
            source.path,
            batch_size=fixed_batch or 16,
            samples=config.validation_samples,
            fixed_batch=fixed_batch,
        )
        target = ctx.work_dir / "model.int8.openvino.zip"
        artifact = _save(ctx, config, quantized, target, spec)
        metric, precision = _judge(ctx, validation, artifact)
        report: dict[str, Any] = {"attempts": [{"route": "nncf.quantize", **_entry(metric)}]}
        if not _meets(metric, tolerance) and config.accuracy_control:
            ctx.check_cancelled()
            quantized, reverted = _with_accuracy_control(nncf, ctx, model, calibration, validation, tolerance, kwargs)
            artifact = _save(ctx, config, quantized, target, spec)
            metric, precision = _judge(ctx, validation, artifact)
            report["attempts"].append({"route": "nncf.quantize_with_accuracy_control", **_entry(metric)})
            report["accuracy_control_log"] = reverted
        ctx.report_progress(0.95)
        if not _meets(metric, tolerance):
            raise PassError(
                _over_tolerance(metric, tolerance, config.accuracy_control),
                code="int8_over_tolerance",
                details={"metric": metric, "tolerance": tolerance, **report},
            )
        metrics = {
            "task": validation.task,
            "metric": metric["name"],
            "validated_on": validation.source,
            "samples": validation.samples,
            "fp32": validation.baseline["value"],
            "int8": metric["value"],
            "drop": metric["drop"],
            "tolerance": tolerance,
            **({"floor": metric["floor"]} if metric.get("floor") else {}),
            "calibration_samples": calibration.get_length(),
            "preset": config.preset,
            "ignored_scope": ignored,
            "ignored_names_not_in_ir": missing,
            "inference_precision": precision,
            "inference_precision_hint": config.inference_precision,
            "static_shape": artifact.meta["static_shape"],
            "size_bytes": target.stat().st_size,
            "source_size_bytes": source.path.stat().st_size,
            **report,
        }
        if validation.note:
            metrics["warning"] = validation.note
        return PassResult(artifact=target, format=OPENVINO_IR, metrics=metrics, meta=artifact.meta)


def _nncf() -> Any:
    """nncf, with its usage telemetry off: NNCF swaps its telemetry for a stub at import when NNCF_CI is set
    (a worker has no business phoning home, and no network to do it with)."""
    os.environ.setdefault("NNCF_CI", "1")
    import nncf

    return nncf


class _Calibration:
    """The calibration batches as NNCF iterates them (more than once: statistics, then bias correction),
    read afresh each time; a fixed-batch model's batches at its batch, else one sample each, so that
    NNCF's subset_size counts samples."""

    def __init__(self, ctx: PassContext, spec: dict[str, Any], fixed_batch: int | None, subset_size: int) -> None:
        self.ctx, self.spec, self.batch = ctx, spec, fixed_batch or 1
        total = min(subset_size, ctx.calibration_dataset.num_samples)
        self.total = max(self.batch, total - total % self.batch)
        self.length = self.total // self.batch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        from worker.data import iter_batches

        dataset, prep = self.ctx.calibration_dataset, self.ctx.preprocessing
        for x, _ in iter_batches(dataset, self.spec, prep, batch_size=self.batch, limit=self.total):
            self.ctx.check_cancelled()
            if len(x) == self.batch:
                yield {self.spec["name"]: x}


def _float_heads(ctx: PassContext, onnx_path: Path, spec: dict[str, Any], fixed_batch: int | None) -> list[dict]:
    """The mixed-scale heads' nodes (worker.quantization.heads) from the ranges of every Concat input on the
    first calibration samples."""
    import onnx
    import onnxruntime as ort

    from worker.data import iter_batches
    from worker.quantization.heads import mixed_scale_heads

    model = onnx.load(str(onnx_path))
    produced = {t for n in model.graph.node for t in n.output}
    tensors = sorted({t for n in model.graph.node if n.op_type == "Concat" for t in n.input if t in produced})
    if not tensors:
        return []
    probe = onnx.load(str(onnx_path))
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in known)
    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.threads
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    ranges: dict[str, tuple[float, float]] = {}
    limit = min(HEAD_RANGE_SAMPLES, ctx.calibration_dataset.num_samples)
    batches = iter_batches(ctx.calibration_dataset, spec, ctx.preprocessing, batch_size=fixed_batch or 8, limit=limit)
    for x, _ in batches:
        if fixed_batch and len(x) != fixed_batch:
            continue
        for name, value in zip(names, session.run(names, {spec["name"]: x}), strict=True):
            if name in tensors:
                lo, hi = ranges.get(name, (np.inf, -np.inf))
                ranges[name] = (min(lo, float(np.min(value))), max(hi, float(np.max(value))))
    return mixed_scale_heads(model, ranges)


def _node_outputs(onnx_path: Path) -> dict[str, list[str]]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {node.name: list(node.output) for node in model.graph.node if node.name}


def _attach_openvino_names(model: Any, ignored: list[dict[str, Any]], outputs: dict[str, list[str]]) -> list[str]:
    """Give each ignored node the name its op has in the IR: the ONNX node's name, except for an op that writes
    a graph output, which the ONNX frontend names after that output tensor. (the ONNX names the IR lacks)."""
    names = {op.get_friendly_name() for op in model.get_ops()}
    missing = []
    for entry in ignored:
        found = [n for n in (entry["node"], *outputs.get(entry["node"], ())) if n in names]
        if found:
            entry["openvino_node"] = found[0]
        else:
            missing.append(entry["node"])
    return missing


def _quantize_kwargs(nncf: Any, config: QuantizeOpenvinoConfig, ignored: list[dict], samples: int) -> dict:
    names = [entry["openvino_node"] for entry in ignored if "openvino_node" in entry]
    return {
        "preset": nncf.QuantizationPreset.MIXED if config.preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
        "target_device": nncf.TargetDevice.CPU,
        "subset_size": max(1, samples),
        "fast_bias_correction": config.fast_bias_correction,
        "ignored_scope": nncf.IgnoredScope(names=names, validate=False) if names else None,
    }


def _save(
    ctx: PassContext, config: QuantizeOpenvinoConfig, model: Any, target: Path, spec: dict[str, Any]
) -> ArtifactRef:
    """The quantized model as the IR archive, with the meta the runtime compiles it by. static_shape
    fixes the inputs here, after NNCF: calibration and accuracy control run on the open-batch model at
    the batches they choose, and quantization does not depend on the batch."""
    static_shape = fix_input_shapes(model, [spec]) if config.static_shape else None
    save_ir_archive(model, ctx.work_dir, target, compress_to_fp16=False)
    meta = {
        "inference_precision": config.inference_precision,
        "weights": "int8",
        "runtime": "openvino",
        "precision": "int8",
        "static_shape": static_shape,
    }
    return ArtifactRef(name=target.name, format=OPENVINO_IR, path=target, meta=meta)


def _judge(ctx: PassContext, validation: Any, artifact: ArtifactRef) -> tuple[dict[str, Any], str]:
    """(the IR's task metric against the ONNX source, as the gate judges, the precision it computed in). An
    IR fixed at the job's shape runs the validation batches at its own batch."""
    from worker.metrics.tasks import with_drop
    from worker.runtime import BatchRunner, load_runner, runtime_info

    static_shape = artifact.meta.get("static_shape")
    ir_batch = static_shape[0][0] if static_shape else validation.fixed_batch
    run = BatchRunner(load_runner(artifact, threads=ctx.threads), validation.spec["name"], ir_batch)
    precision = str(runtime_info(artifact, threads=ctx.threads)["inference_precision"])
    tally = validation.tally()
    for batch in validation.batches():
        tally.add(run(batch.x), batch.reference, batch.labels, batch.targets)
    return with_drop(tally.result()["metric"], validation.baseline["value"]), precision


def _meets(metric: dict[str, Any], tolerance: float) -> bool:
    from worker.metrics.tasks import meets_tolerance

    return meets_tolerance(metric, tolerance)


def _entry(metric: dict[str, Any]) -> dict[str, Any]:
    from worker.quantization.gate import attempt_entry

    return attempt_entry(metric)


def _with_accuracy_control(
    nncf: Any,
    ctx: PassContext,
    model: Any,
    calibration: Any,
    validation: Any,
    tolerance: float,
    kwargs: dict[str, Any],
) -> tuple[Any, list[str]]:
    """NNCF's quantize_with_accuracy_control on the task's metric (the gate's tally over the validation
    batches, FP32's outputs as the reference); (the model, what NNCF logged about the layers it reverted)."""
    from worker.runtime import BatchRunner

    name, fixed = validation.spec["name"], validation.fixed_batch

    def validation_fn(compiled: Any, batches: Any) -> tuple[float, None]:
        run = BatchRunner(lambda feeds: list(compiled(feeds).to_tuple()), name, fixed)
        tally = validation.tally()
        for batch in batches:
            tally.add(run(batch.x), batch.reference, batch.labels, batch.targets)
        return float(tally.result()["metric"]["value"]), None

    batches = list(validation.batches())
    dataset = nncf.Dataset(batches, lambda batch: {name: batch.x})
    log = _NncfLog()
    logging.getLogger("nncf").addHandler(log)
    try:
        quantized = nncf.quantize_with_accuracy_control(
            model, calibration, dataset, validation_fn, max_drop=tolerance, drop_type=nncf.DropType.ABSOLUTE, **kwargs
        )
    finally:
        logging.getLogger("nncf").removeHandler(log)
    return quantized, log.lines


class _NncfLog(logging.Handler):
    """Keeps what NNCF's accuracy restorer says about the layers it reverted to float (it returns only the model)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(word in message for word in ("Reverted", "reverted", "floating-point", "metric")):
            self.lines.append(message[:2000])


def _over_tolerance(metric: dict[str, Any], tolerance: float, controlled: bool) -> str:
    floor = metric.get("floor")
    floor_text = f", {floor['name']} {floor['value']:.1f} (floor {floor['min']:g})" if floor else ""
    after = "after NNCF's accuracy control" if controlled else "(accuracy_control off)"
    return (
        f"the OpenVINO INT8 IR misses the tolerance {after}: {metric['name']} {metric['value']:.4f} against "
        f"{metric['reference']:.4f} for the float source, drop {metric['drop']:.4f} (tolerance {tolerance:g})"
        f"{floor_text}"
    )
