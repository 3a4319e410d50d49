"""quantize_int8: ONNX Runtime static post-training quantization (QDQ), per-channel weights,
calibrated on the job's calibration dataset streamed in batches (worker.quantization does the work).

Mixed-scale heads stay in float by default: a Concat whose inputs' calibrated ranges differ by
a large factor (a YOLO head joins 0..640 pixel boxes with 0..1 class scores) cannot share one
INT8 scale, so it and everything after it up to the outputs are excluded, and the branches
before it are quantized each at its own scale.

With a tolerance (``max_accuracy_drop``, or the job's with ``search_speed``) quality is judged on
the task's metric against the FP32 model, with the evaluate step's own tallies: accuracy (class
labels) or top-1 agreement for a classifier; mAP (box labels) or post-NMS F1 against FP32 for a
detector, whose raw head must also keep every score channel at 15 dB SNR or more; pixel agreement
of the masks for a segmenter. When the quantized model is out of tolerance, nodes are ranked by
the error each one ADDS (its twin fed with the FP32 model's own inputs through the same Q/DQ,
against the FP32 node), not the error accumulated up to it, and the worst are kept in float,
doubling their number, until the metric is within the tolerance. Calibration runs once; every
candidate reuses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import PassError
from core.formats import ONNX
from core.steps.quantize_int8 import QuantizeInt8Config, QuantizeInt8Spec
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult
from worker.quantization.graph import cpu_has_vnni  # noqa: F401  (bench/real_models.py reports it)

if TYPE_CHECKING:
    from worker.quantization.quantizer import Quantizer


class QuantizeInt8(QuantizeInt8Spec, Pass):
    def _dynamic(self, ctx: PassContext, source: ArtifactRef, config: QuantizeInt8Config) -> PassResult:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from worker.quantization.graph import count_nodes, quantizable_graph

        out = ctx.work_dir / "model.int8.dynamic.onnx"
        graph, per_channel, opset_metrics = quantizable_graph(source.path, ctx.work_dir, config.per_channel, ctx.log)
        quantize_dynamic(
            str(graph),
            str(out),
            per_channel=per_channel,
            weight_type={"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[config.weight_type],
            op_types_to_quantize=config.op_types,
            nodes_to_exclude=config.exclude_nodes,
        )
        quantized = sum(
            count_nodes(out, op)
            for op in ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul")
        )
        if quantized == 0:
            raise PassError("nothing in the model could be quantized dynamically", code="nothing_quantized")
        return PassResult(
            artifact=out,
            format=ONNX,
            meta={"quant_format": "dynamic"},
            metrics={
                "mode": "dynamic",
                "quantized_nodes": quantized,
                "weight_type": config.weight_type,
                "per_channel": per_channel,
                **opset_metrics,
            },
        )

    def run(self, ctx: PassContext, source: ArtifactRef, config: QuantizeInt8Config) -> PassResult:
        if config.mode == "dynamic":
            return self._dynamic(ctx, source, config)
        from worker.quantization.graph import count_nodes

        if ctx.calibration_dataset is None:  # checked at POST /v1/jobs; kept for direct callers
            raise PassError("quantize_int8 needs a calibration dataset", code="calibration_dataset_required")
        if len(ctx.input_spec) != 1:
            raise PassError("calibration feeds single-input models only", code="unsupported_model")
        quantizer, spec, fixed_batch, opset_metrics = _calibrated_quantizer(ctx, source, config)
        out, float_nodes = quantizer.first_candidate(ctx.work_dir, ctx.log)
        metrics: dict[str, Any] = {
            "calibration_samples": quantizer.reader.seen,
            "calibration_method": config.calibration_method,
            "quantize_linear_nodes": count_nodes(out, "QuantizeLinear"),
            "activation_type": config.activation_type,
            "weight_type": config.weight_type,
            "per_channel": quantizer.per_channel,
            "reduce_range": quantizer.reduce_range,
            "quant_format": "QDQ",
            "float_nodes": float_nodes,
            **opset_metrics,
        }
        tolerance = config.max_accuracy_drop
        if tolerance is None and config.search_speed:
            tolerance = ctx.task_options.get("max_accuracy_drop")
        if tolerance is not None or config.search_speed:
            out = _judge_and_search(ctx, config, tolerance, quantizer, spec, fixed_batch, out, metrics)
            metrics["quantize_linear_nodes"] = count_nodes(out, "QuantizeLinear")
        # The report's label for the artifact (ONNX Runtime INT8 QDQ or QOperator).
        return PassResult(artifact=out, format=ONNX, metrics=metrics, meta={"quant_format": metrics["quant_format"]})


def _calibrated_quantizer(
    ctx: PassContext, source: ArtifactRef, config: QuantizeInt8Config
) -> tuple[Quantizer, dict[str, Any], int | None, dict[str, Any]]:
    """(the quantizer of the prepared graph with its calibration reader, the input spec as the graph
    names it, the graph's fixed batch or None, the opset metrics). Every calibration sample counts:
    a fixed-batch model's last, short batch is padded, never dropped."""
    from worker.quantization.calibration import job_calibration_reader
    from worker.quantization.graph import graph_input, prepared_graph, quantizable_graph
    from worker.quantization.quantizer import Quantizer, reduce_range_for

    graph, per_channel, opset_metrics = quantizable_graph(source.path, ctx.work_dir, config.per_channel, ctx.log)
    prepared = prepared_graph(graph, ctx.work_dir, ctx.log)
    input_name, fixed_batch = graph_input(prepared)
    reader = job_calibration_reader(ctx, input_name, fixed_batch, config)
    if reader.total == 0:
        raise PassError("the calibration dataset has no samples", code="empty_dataset")
    quantizer = Quantizer(
        prepared=prepared,
        config=config,
        per_channel=per_channel,
        reader=reader,
        ranges=ctx.work_dir / "calibration.json",
        reduce_range=reduce_range_for(config),
    )
    return quantizer, reader.spec, fixed_batch, opset_metrics


def _judge_and_search(
    ctx: PassContext,
    config: QuantizeInt8Config,
    tolerance: float | None,
    quantizer: Quantizer,
    spec: dict[str, Any],
    fixed_batch: int | None,
    out: Path,
    metrics: dict[str, Any],
) -> Path:
    """The graph the gate chooses: the per-layer fallback on the task's metric, then (search_speed)
    the fastest candidate within the tolerance. Writes their reports into ``metrics``."""
    from worker.quantization.gate import ValidationSet, per_layer_fallback, speed_search

    validation = ValidationSet(
        ctx,
        spec,
        quantizer.prepared,
        batch_size=fixed_batch or config.batch_size,
        samples=config.validation_samples,
        fixed_batch=fixed_batch,
    )
    out, judged, metrics["fallback"] = per_layer_fallback(ctx, config, tolerance, quantizer, validation, out)
    if config.search_speed:
        out, metrics["speed_search"] = speed_search(
            ctx, config, tolerance, quantizer, validation, out, judged, metrics["fallback"]
        )
        metrics["quant_format"] = "QOperator" if metrics["speed_search"]["chosen"] == "qoperator" else "QDQ"
    warnings = [
        w for w in (metrics.get("warning"), validation.note, metrics.get("speed_search", {}).get("warning")) if w
    ]
    if warnings:
        metrics["warning"] = "; ".join(warnings)
    return out
