"""quantize_qat: quantization-aware recovery, for when post-training INT8 misses the tolerance on a model the
service can train. The model (any trainable format, batch norms folded) is first quantized as it is by the
service's own quantizer (worker.quantization, quantize_int8's settings, the layers that make the outputs
kept float): that post-training graph is the number to beat and the rounding to train with. The module then
rounds every tensor and weight that graph rounds (worker.qat), is fine-tuned against the job's FP32
original (worker.distillation, label-free by default) and is quantized again by the same quantizer with the
activation ranges it was trained with.

Both graphs are judged as quantize_int8 judges: the task's metric against the FP32 original, within the
tolerance (the config's, else the job's), a detector's score channels above their SNR floor (ptq_metric,
ptq_drop, qat_metric, qat_drop). The step returns the trained graph, or the post-training one where that
judged better; over the tolerance it fails (int8_over_tolerance) with both numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import PassError
from core.formats import ONNX
from core.steps.quantize_int8 import QuantizeInt8Config
from core.steps.quantize_qat import QuantizeQatConfig, QuantizeQatSpec
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult

if TYPE_CHECKING:
    from worker.quantization.gate import ValidationSet
    from worker.trainable import Trainable

# Progress shares: post-training INT8 and the FP32 reference up to PTQ_PROGRESS, training up to
# TRAINED_PROGRESS, the Q/DQ graph and its judgement the rest.
PTQ_PROGRESS, TRAINED_PROGRESS = 0.15, 0.85
# Calibration images the graph's tensors are looked up in the module on (by their values).
PROBE_IMAGES = 2


@dataclass
class _Int8Graph:
    path: Path
    prepared: Path  # the float graph it was quantized from
    spec: dict[str, Any]  # the job's input spec, named as the graph names it
    fixed_batch: int | None
    nodes: dict[str, tuple[str, str]]  # layer -> (ONNX node, its input tensor)
    float_nodes: list[dict[str, Any]]  # mixed-scale heads the quantizer kept float
    calibration_samples: int
    ranges_written: int = 0


@dataclass
class _Model:
    """The step's model made trainable, folded, and what of it stays float."""

    trainable: Trainable
    teacher: Any  # the FP32 original as a torch module
    gm: Any  # torch.fx.GraphModule, batch norms folded
    layers: dict[str, Any]  # every convolution and linear, by name
    kept: dict[str, str]  # layer -> why it stays float
    folded: int
    conversion_error: float


def _share(ctx: PassContext, start: float, end: float) -> PassContext:
    """``ctx`` whose progress 0..1 is reported as start..end of the step's."""
    report = ctx.report_progress
    return dataclasses.replace(ctx, report_progress=lambda f: report(start + (end - start) * min(max(f, 0.0), 1.0)))


def _int8_config(config: QuantizeQatConfig) -> QuantizeInt8Config:
    """quantize_int8's settings (u8 activations, s8 weights, reduce_range by the CPU, heads kept float)
    with this step's per_channel, calibration method and batch."""
    return QuantizeInt8Config(
        per_channel=config.per_channel, calibration_method=config.calibration_method, batch_size=config.batch_size
    )


def _load(ctx: PassContext, source: ArtifactRef, config: QuantizeQatConfig) -> _Model:
    from worker.data import job_feeds, sample_tensors
    from worker.qat import WEIGHTED_TYPES, fold_batch_norms, kept_float_layers
    from worker.quantization.graph import PER_CHANNEL_OPSET
    from worker.trainable import check_round_trip, load_trainable

    feeds = job_feeds(ctx)
    student = load_trainable(source, ctx)
    conversion_error = check_round_trip(student, source, ctx, feeds)
    teacher = load_trainable(ctx.original, ctx)
    check_round_trip(teacher, ctx.original, ctx, feeds)
    if config.per_channel:  # per-channel Q/DQ needs opset 13: exported there rather than converted
        student.opset = max(student.opset, PER_CHANNEL_OPSET)
    # A TorchScript upload's outputs are named by the exporter that converted it ("39"), which no export
    # can set again: they become output, output1, ...
    names = [f"output{i or ''}" if n.isdigit() else n for i, n in enumerate(student.output_names)]
    renamed = dict(zip(student.output_names, names, strict=True))
    student.dynamic_axes = {renamed.get(k, k): v for k, v in student.dynamic_axes.items()}
    student.output_names = names
    gm, folded = fold_batch_norms(student.module)
    layers = {name: m for name, m in gm.named_modules() if isinstance(m, WEIGHTED_TYPES)}
    if not layers:
        raise PassError("the model has no convolution or linear layer to quantize", code="nothing_quantized")
    kept = kept_float_layers(gm, sample_tensors(ctx.input_spec))
    return _Model(student, teacher.module, gm, layers, kept, folded, conversion_error)


def _int8_graph(
    ctx: PassContext,
    model: _Model,
    module: Any,
    qconfig: QuantizeInt8Config,
    work: Path,
    *,
    heads: list[str] | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> _Int8Graph:
    """``module`` exported as ONNX and quantized by the service's quantizer, the kept layers float. With
    ``heads`` those nodes are the mixed-scale heads kept float (not found again), and with ``ranges``
    ({tensor: trained range}) those replace the calibrated ones."""
    from worker.data import sample_tensors
    from worker.qat import onnx_layers, write_trained_ranges
    from worker.quantization.calibration import job_calibration_reader
    from worker.quantization.graph import graph_input, prepared_graph, quantizable_graph
    from worker.quantization.quantizer import Quantizer, reduce_range_for
    from worker.trainable import write_onnx

    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "model.fp32.onnx"
    write_onnx(model.trainable, module, sample_tensors(ctx.input_spec), fp32)
    graph, per_channel, _ = quantizable_graph(fp32, work, qconfig.per_channel, ctx.log)
    prepared = prepared_graph(graph, work, ctx.log)
    input_name, fixed_batch = graph_input(prepared)
    nodes = onnx_layers(prepared, model.layers)
    exclude = sorted({nodes[n][0] for n in model.kept if n in nodes} | set(heads or ()))
    update: dict[str, Any] = {"exclude_nodes": exclude}
    if heads is not None:
        update["keep_mixed_scale_heads_float"] = False
    config = qconfig.model_copy(update=update)
    reader = job_calibration_reader(ctx, input_name, fixed_batch, config)
    cache = work / "calibration.json"
    cache.unlink(missing_ok=True)  # a rerun in the same directory calibrates its own model again
    quantizer = Quantizer(
        prepared=prepared,
        config=config,
        per_channel=per_channel,
        reader=reader,
        ranges=cache,
        reduce_range=reduce_range_for(config),
    )
    out, float_nodes = quantizer.first_candidate(work, ctx.log)
    written = 0
    if ranges is not None:
        written = write_trained_ranges(quantizer.ranges, ranges)
        out = quantizer.quantize([], work / "model.int8.qat.onnx")
    return _Int8Graph(out, prepared, reader.spec, fixed_batch, nodes, float_nodes, reader.seen, written)


def _rounding_model(ctx: PassContext, model: _Model, ptq: _Int8Graph, scheme: Any) -> tuple[Any, Any, dict]:
    """(the module rounding what the post-training graph rounds, that graph's plan, which of its tensors
    were found in the module), the tensors found by their values on the first calibration images."""
    import torch

    from worker.data import iter_batches
    from worker.qat import graph_values, match_tensors, module_values, prepare_qat, read_qdq_graph
    from worker.runtime import pad_batch

    plan = read_qdq_graph(ptq.path)
    dataset = ctx.calibration_dataset
    assert dataset is not None
    size = ptq.fixed_batch or PROBE_IMAGES
    x, _ = next(iter_batches(dataset, ptq.spec, ctx.preprocessing, batch_size=size, limit=size))
    x = pad_batch(x, ptq.fixed_batch) if ptq.fixed_batch else x
    values = graph_values(ptq.prepared, list(plan.activations), {ptq.spec["name"]: x})
    matches = match_tensors(values, module_values(model.gm, torch.from_numpy(x)))
    layer_nodes = {layer: node for layer, (node, _) in ptq.nodes.items()}
    return prepare_qat(model.gm, plan, matches, layer_nodes, scheme), plan, matches


def _objective(task: str, config: QuantizeQatConfig) -> str:
    """The task train_module is told. Label-free, every model (classifiers too) learns the original's outputs
    by its dense objective, normalised MSE per output channel: the rounding's error is what the judge sees,
    and the held-out score is continuous, where a classifier's top-1 agreement is 1.0 already on epoch 0 and
    would keep the untrained weights (train_module keeps an epoch only when it scores higher). With beta > 0
    a classifier trains on KL plus the labels' CE."""
    if config.beta:
        return task
    return "detection" if task == "detection" else "segmentation"


def _reference(ctx: PassContext, model: _Model, input_name: str) -> Path:
    """The FP32 original as ONNX under the step's input name: the upload itself when it is that, else the
    teacher module exported."""
    from worker.data import sample_tensors
    from worker.quantization.graph import graph_input
    from worker.trainable import write_onnx

    if ctx.original.format == ONNX and graph_input(ctx.original.path)[0] == input_name:
        return ctx.original.path
    out = ctx.work_dir / "original.fp32.onnx"
    write_onnx(model.trainable, model.teacher, sample_tensors(ctx.input_spec), out)
    return out


class QuantizeQat(QuantizeQatSpec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: QuantizeQatConfig) -> PassResult:
        from core.tasks import DEFAULT_TOLERANCE
        from worker.metrics.tasks import meets_tolerance
        from worker.quantization.gate import ValidationSet
        from worker.quantization.graph import count_nodes

        if ctx.calibration_dataset is None:  # checked at POST /v1/jobs; kept for direct callers
            raise PassError("quantize_qat needs a calibration dataset", code="calibration_dataset_required")
        if len(ctx.input_spec) != 1:
            raise PassError("quantize_qat takes single-input models only", code="unsupported_model")
        tolerance = config.max_accuracy_drop
        if tolerance is None:
            tolerance = float(ctx.task_options.get("max_accuracy_drop", DEFAULT_TOLERANCE))
        qconfig = _int8_config(config)
        model = _load(ctx, source, config)
        # Post-training INT8 of the same FP32 model by the same quantizer: the number to beat, and the graph
        # whose rounding training reproduces.
        ptq = _int8_graph(_share(ctx, 0.0, 0.1), model, model.gm, qconfig, ctx.work_dir / "ptq")
        validation = ValidationSet(
            _share(ctx, 0.1, PTQ_PROGRESS),
            ptq.spec,
            _reference(ctx, model, ptq.spec["name"]),
            batch_size=ptq.fixed_batch or qconfig.batch_size,
            samples=qconfig.validation_samples,
            fixed_batch=ptq.fixed_batch,
        )
        ptq_metric = validation.judge(ptq.path)
        qat, training = _quantization_aware(ctx, model, ptq, config, qconfig)
        qat_metric = validation.judge(qat.path)
        ctx.report_progress(1.0)
        metrics = _metrics(model, validation, tolerance, ptq, qat, ptq_metric, qat_metric)
        metrics.update(training)
        # The trained graph, unless the untrained one judged better (training picks its epoch on a few held-out
        # images; the judgement is on the validation samples): the step returns the better INT8 graph.
        chosen = "ptq" if _badness(ptq_metric) < _badness(qat_metric) else "qat"
        metrics["chosen"] = chosen
        metrics["tolerance_met"] = meets_tolerance(ptq_metric if chosen == "ptq" else qat_metric, tolerance)
        artifact = ptq.path if chosen == "ptq" else qat.path
        metrics["quantize_linear_nodes"] = count_nodes(artifact, "QuantizeLinear")
        _check_tolerance(metrics, qat_metric, tolerance)
        return PassResult(
            artifact=artifact, format=ONNX, metrics=metrics, meta={"quant_format": "QDQ", "trained": chosen == "qat"}
        )


def _quantization_aware(
    ctx: PassContext, model: _Model, ptq: _Int8Graph, config: QuantizeQatConfig, qconfig: QuantizeInt8Config
) -> tuple[_Int8Graph, dict[str, Any]]:
    """The model trained rounding as ``ptq`` rounds, and its Q/DQ graph with the trained ranges (the same
    quantizer, the same nodes float); the training's metrics."""
    from worker.distillation import train_module
    from worker.qat import QuantScheme, governing_ranges, strip_fake_quant, trained_ranges
    from worker.quantization.quantizer import reduce_range_for

    scheme = QuantScheme(config.per_channel, reduce_range_for(qconfig), config.calibration_method, qconfig.percentile)
    rounding, plan, matches = _rounding_model(ctx, model, ptq, scheme)
    objective = _objective(ctx.task, config)
    rounding, training = train_module(
        _share(ctx, PTQ_PROGRESS, TRAINED_PROGRESS),
        rounding,
        model.teacher,
        config,
        step="quantize_qat",
        task=objective,
    )
    ranges = governing_ranges(trained_ranges(rounding), plan)
    weights_rounded = len(rounding.layers())
    trained = strip_fake_quant(rounding)
    heads = [n["node"] for n in ptq.float_nodes]
    work = ctx.work_dir / "qat"
    qat = _int8_graph(_share(ctx, TRAINED_PROGRESS, 0.97), model, trained, qconfig, work, heads=heads, ranges=ranges)
    return qat, {
        "epochs": training["epochs"],
        "best_epoch": training["best_epoch"],
        "training": {
            "objective": "KL and the labels' CE" if objective == ctx.task and config.beta else "normalised MSE",
            **{k: v for k, v in training.items() if k not in ("epochs", "best_epoch", "task")},
        },
        "per_channel": scheme.per_channel,
        "reduce_range": scheme.reduce_range,
        "weight_bits": 7 if scheme.reduce_range else 8,
        "calibration_method": config.calibration_method,
        "activation_ranges": "the quantizer's calibrated ranges, then a moving average of each training batch's (EMA)",
        "rounded_tensors": len(matches),
        "tensors_not_found_in_model": sorted(set(plan.activations) - set(matches)),
        "int8_weight_layers": weights_rounded,
        "trained_ranges_applied": qat.ranges_written,
    }


def _badness(metric: dict[str, Any]) -> tuple[bool, float]:
    """Ordering of judged graphs: under the floor is worse than any drop."""
    floor = metric.get("floor")
    return (bool(floor and not floor["met"]), float(metric["drop"]))


def _metrics(
    model: _Model,
    validation: ValidationSet,
    tolerance: float,
    ptq: _Int8Graph,
    qat: _Int8Graph,
    ptq_metric: dict[str, Any],
    qat_metric: dict[str, Any],
) -> dict[str, Any]:
    from worker.quantization.gate import attempt_entry

    baseline = validation.baseline
    return {
        "task": validation.task,
        "metric": baseline["name"],
        "validated_on": validation.source,
        "validation_samples": validation.samples,
        "fp32": baseline["value"],
        "tolerance": tolerance,
        "ptq_metric": ptq_metric["value"],
        "ptq_drop": ptq_metric["drop"],
        "qat_metric": qat_metric["value"],
        "qat_drop": qat_metric["drop"],
        "ptq": attempt_entry(ptq_metric),
        "qat": attempt_entry(qat_metric),
        "kept_float": [
            {"layer": name, "node": qat.nodes.get(name, (None, None))[0], "reason": why}
            for name, why in sorted(model.kept.items())
        ],
        "float_nodes": ptq.float_nodes,
        "batch_norms_folded": model.folded,
        "activation_type": "uint8",
        "weight_type": "int8",
        "quant_format": "QDQ",
        "calibration_samples": qat.calibration_samples,
        "conversion_error": model.conversion_error,
    }


def _check_tolerance(metrics: dict[str, Any], qat_metric: dict[str, Any], tolerance: float) -> None:
    """QAT over the tolerance (or under a detector's floor) fails the step with both numbers."""
    if metrics["tolerance_met"]:
        return
    floor = qat_metric.get("floor")
    below_floor = f", {floor['name']} {floor['value']:.1f} under {floor['min']:g}" if floor and not floor["met"] else ""
    raise PassError(
        f"INT8 is still over the tolerance after quantization-aware training: {metrics['metric']} drop "
        f"{metrics['qat_drop']:.4f} (post-training INT8: {metrics['ptq_drop']:.4f}), tolerance {tolerance:g}"
        f"{below_floor}; keep the FP32 model, train longer (epochs) or raise max_accuracy_drop",
        code="int8_over_tolerance",
        details={
            k: metrics[k]
            for k in ("metric", "fp32", "tolerance", "ptq_metric", "ptq_drop", "qat_metric", "qat_drop", "epochs")
        },
    )
