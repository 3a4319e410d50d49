"""quantize_int8: ONNX Runtime static post-training quantization (QDQ), per-channel weights,
calibrated on the job's calibration dataset streamed in batches.

With ``max_accuracy_drop`` it also does per-layer fallback (mixed precision): when the fully
quantized model loses more than that (accuracy with labels, top-1 agreement with the FP32
model without), it ranks the layers by how much their output differs from FP32 (worst output
channel's SNR in dB on validation samples) and keeps the worst ones in float, doubling their
number, until the drop is within the tolerance. Calibration runs once; every candidate reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from core.errors import PassError
from worker.passes.base import (
    NEEDS_CALIBRATION,
    ONNX,
    ArtifactRef,
    Pass,
    PassConfig,
    PassContext,
    PassResult,
)


class QuantizeInt8Config(PassConfig):
    mode: Literal["static", "dynamic"] = Field(
        default="static",
        description="dynamic: weights INT8 ahead of time, activations quantized at run time (no calibration "
        "dataset; suits Linear/MatMul-heavy models, little gain for convolutions).",
    )
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    num_calibration_samples: int = Field(default=256, ge=1, le=100_000)
    batch_size: int = Field(default=16, ge=1, le=1024, description="Calibration batch (models with an open batch axis).")
    per_channel: bool = True
    # u8 activations with s8 weights ran fastest on x86 CPUs without VNNI (measured here).
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    symmetric_activations: bool = False
    reduce_range: bool | None = Field(
        default=None,
        description="7-bit weights. Default: on for u8 activations with s8 weights on x86 CPUs without VNNI, "
        "whose u8s8 kernels saturate with full 8-bit weights (measured: 12 points of accuracy lost).",
    )
    percentile: float = Field(default=99.999, gt=90, le=100)
    op_types: list[str] | None = Field(default=None, description="Only quantize these op types (default: all supported).")
    exclude_nodes: list[str] = Field(default_factory=list, description="Node names to keep in float.")
    max_accuracy_drop: float | None = Field(
        default=None, ge=0, le=1,
        description="Per-layer fallback: keep the most damaged layers in float until accuracy (or, "
        "without labels, top-1 agreement with FP32) is within this of the FP32 model (0.01 = 1 point).",
    )
    max_float_layers: int = Field(default=16, ge=1, le=1000, description="Fallback keeps at most this many layers in float.")
    validation_samples: int = Field(default=512, ge=16, le=100_000, description="Samples that judge the fallback.")
    search_speed: bool = Field(
        default=False,
        description="Also try QOperator and quantizing only Conv/Gemm/MatMul, time every candidate and the "
        "FP32 graph on this worker, and keep the fastest that meets max_accuracy_drop.",
    )


@dataclass
class _Validation:
    batches: list  # model-input arrays
    labels: object  # np.ndarray or None
    source: str
    input_name: str
    reference: object  # the FP32 graph's top-1 on the batches

    def quality(self, path: Path) -> float:
        """Accuracy with labels, else top-1 agreement with the FP32 graph."""
        pred = _predict(path, self.input_name, self.batches)
        target = self.labels if self.labels is not None else self.reference
        return float((pred == target).mean())


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (int8 dot products without 16-bit intermediate saturation)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686"):
        return True  # not x86: the u8s8 saturation problem is x86's
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


# Per-channel Q/DQ (DequantizeLinear's axis) exists from this opset on; ORT's quantizer keeps an older
# opset and writes per-channel nodes that the opset does not allow.
PER_CHANNEL_OPSET = 13


def quantizable_graph(source: Path, work_dir: Path, per_channel: bool, log) -> tuple[Path, bool, dict]:
    """(graph to quantize, per_channel, metrics). ORT's quantizers take weights from initializers only, so
    weights held in Constant nodes move there; a graph below opset 13 is converted to 13 for per-channel
    weights, and when the converter cannot, the weights are quantized per tensor and the metrics say why."""
    import onnx
    from onnx import version_converter

    from worker.passes.export_onnx import constants_to_initializers

    model = onnx.load(str(source))
    changed = constants_to_initializers(model) > 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), PER_CHANNEL_OPSET)
    metrics: dict = {}
    if per_channel and opset < PER_CHANNEL_OPSET:
        try:
            converted = version_converter.convert_version(model, PER_CHANNEL_OPSET)
            onnx.checker.check_model(converted)
        except Exception as exc:  # the converter raises RuntimeError, the checker ValidationError
            per_channel = False
            reason = (f"the model's opset {opset} has no per-channel quantization and converting it to opset "
                      f"{PER_CHANNEL_OPSET} failed ({str(exc).splitlines()[0][:200]}); weights are quantized "
                      "per tensor")
            log.warning(reason)
            metrics = {"opset": opset, "warning": reason}
        else:
            model, changed = converted, True
            metrics = {"opset": PER_CHANNEL_OPSET, "converted_from_opset": opset}
    if not changed:
        return source, per_channel, metrics
    out = work_dir / "quantizable.onnx"
    onnx.save(model, str(out))
    return out, per_channel, metrics


def _stride(batches: int) -> int:
    """Calibration is collected this many batches at a time: ORT merges ranges (and histograms)
    between chunks, so memory is bounded by the chunk, not the dataset."""
    return max(d for d in range(1, min(batches, 8) + 1) if batches % d == 0)


class QuantizeInt8(Pass):
    name = "quantize_int8"
    description = "INT8 static quantization (ONNX Runtime, QDQ) calibrated on the calibration dataset."
    Config = QuantizeInt8Config
    accepts = frozenset({ONNX})
    produces = ONNX
    needs = frozenset({NEEDS_CALIBRATION})
    version = 3

    def requirements(self, config: QuantizeInt8Config) -> frozenset[str]:
        return frozenset() if config.mode == "dynamic" else self.needs

    def _dynamic(self, ctx: PassContext, source: ArtifactRef, config: QuantizeInt8Config) -> PassResult:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out = ctx.work_dir / "model.int8.dynamic.onnx"
        graph, per_channel, opset_metrics = quantizable_graph(source.path, ctx.work_dir, config.per_channel, ctx.log)
        quantize_dynamic(
            str(graph), str(out), per_channel=per_channel,
            weight_type={"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[config.weight_type],
            op_types_to_quantize=config.op_types, nodes_to_exclude=config.exclude_nodes,
        )
        quantized = sum(_count(out, op) for op in ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul"))
        if quantized == 0:
            raise PassError("nothing in the model could be quantized dynamically", code="nothing_quantized")
        return PassResult(artifact=out, format=ONNX, metrics={"mode": "dynamic", "quantized_nodes": quantized,
                                                              "weight_type": config.weight_type,
                                                              "per_channel": per_channel, **opset_metrics})

    def run(self, ctx: PassContext, source: ArtifactRef, config: QuantizeInt8Config) -> PassResult:
        if config.mode == "dynamic":
            return self._dynamic(ctx, source, config)
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        from worker.data import iter_batches

        dataset = ctx.calibration_dataset
        if dataset is None:  # checked at POST /v1/jobs; kept for direct callers
            raise PassError("quantize_int8 needs a calibration dataset", code="calibration_dataset_required")
        if len(ctx.input_spec) != 1:
            raise PassError("calibration feeds single-input models only", code="unsupported_model")

        graph, per_channel, opset_metrics = quantizable_graph(source.path, ctx.work_dir, config.per_channel, ctx.log)
        prepared = ctx.work_dir / "prepared.onnx"
        try:
            # Symbolic shape inference fails on some dynamic-shape graphs; ONNX's own is enough.
            quant_pre_process(str(graph), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # optional optimisation: quantize the graph as it is
            ctx.log.warning("quant_pre_process failed, quantizing without it: %s", exc)
            prepared = graph

        model = onnx.load(str(prepared), load_external_data=False)
        graph_input = model.graph.input[0]
        dims = graph_input.type.tensor_type.shape.dim
        fixed_batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
        batch_size = fixed_batch or config.batch_size
        spec = dict(ctx.input_spec[0], name=graph_input.name)
        total = min(config.num_calibration_samples, dataset.num_samples)
        if fixed_batch:
            total -= total % fixed_batch
            if total == 0:
                raise PassError(
                    f"the model's batch is fixed at {fixed_batch}; give at least that many calibration samples",
                    code="calibration_dataset_too_small",
                )
        n_batches = -(-total // batch_size)

        class Reader(CalibrationDataReader):
            """Streams the calibration batches; ORT asks for them a chunk at a time."""

            def __init__(self) -> None:
                self.seen = 0
                self.set_range(0, n_batches)

            def __len__(self) -> int:
                return n_batches

            def set_range(self, start_index: int, end_index: int) -> None:
                first = start_index * batch_size
                self.batches = (
                    x for x, _ in iter_batches(dataset, spec, ctx.preprocessing, batch_size=batch_size,
                                               offset=first, limit=min(end_index * batch_size, total) - first)
                )

            def get_next(self):
                ctx.check_cancelled()
                x = next(self.batches, None)
                if x is None:
                    return None
                self.seen += len(x)
                ctx.report_progress(0.6 * self.seen / total)
                return {graph_input.name: x}

        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[config.calibration_method]
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        reader = Reader()
        ranges = ctx.work_dir / "calibration.json"
        reduce_range = config.reduce_range
        if reduce_range is None:
            reduce_range = (config.activation_type, config.weight_type) == ("uint8", "int8") and not cpu_has_vnni()

        def quantize(exclude: list[str], out: Path, *, fmt=QuantFormat.QDQ, op_types=config.op_types) -> Path:
            quantize_static(
                str(prepared), str(out),
                # After the first call the ranges come from the cache file: calibrated once.
                reader if not ranges.exists() else None,
                quant_format=fmt,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=qtype[config.activation_type],
                weight_type=qtype[config.weight_type],
                calibrate_method=method,
                op_types_to_quantize=op_types,
                nodes_to_exclude=sorted(set(config.exclude_nodes) | set(exclude)),
                calibration_cache_path=str(ranges),
                extra_options={
                    "ActivationSymmetric": config.symmetric_activations,
                    "CalibPercentile": config.percentile,
                    # Not CalibMaxIntermediateOutputs: ORT 1.32 drops (not merges) what it
                    # collected when that cap is reached. The strided reader bounds memory.
                    "CalibStridedMinMax": _stride(n_batches),
                },
            )
            return out

        out = quantize([], ctx.work_dir / "model.int8.onnx")
        if reader.seen == 0:
            raise PassError("the calibration dataset yielded no samples", code="empty_dataset")
        q_nodes = _count(out, "QuantizeLinear")
        if q_nodes == 0:
            raise PassError("nothing in the model could be quantized (no supported ops)", code="nothing_quantized")
        metrics = {
            "calibration_samples": reader.seen,
            "calibration_method": config.calibration_method,
            "quantize_linear_nodes": q_nodes,
            "activation_type": config.activation_type,
            "weight_type": config.weight_type,
            "per_channel": per_channel,
            "reduce_range": reduce_range,
            "quant_format": "QDQ",
            **opset_metrics,
        }
        if config.max_accuracy_drop is not None or config.search_speed:
            val = self._validation(ctx, config, spec, batch_size, prepared)
            out, metrics["fallback"] = self._fallback(ctx, config, prepared, out, quantize, spec, batch_size, val)
            if config.search_speed:
                out, metrics["speed_search"] = self._search_speed(ctx, config, prepared, out, quantize, spec, val, metrics["fallback"])
                metrics["quant_format"] = "QOperator" if metrics["speed_search"]["chosen"] == "qoperator" else "QDQ"
                if metrics["speed_search"].get("warning"):
                    metrics["warning"] = "; ".join(
                        w for w in (opset_metrics.get("warning"), metrics["speed_search"]["warning"]) if w
                    )
            metrics["quantize_linear_nodes"] = _count(out, "QuantizeLinear")
        return PassResult(artifact=out, format=ONNX, metrics=metrics)

    # -- speed search --------------------------------------------------------------------------------

    def _search_speed(self, ctx, config, prepared: Path, chosen: Path, quantize, spec, val, fallback) -> tuple[Path, dict]:
        """Time the accuracy-approved INT8 graph against alternatives and the FP32 graph, on this
        worker, and keep the fastest INT8 that still meets the tolerance."""
        from onnxruntime.quantization import QuantFormat

        from worker.passes.benchmark import time_interleaved

        kept = [layer["node"] for layer in fallback["kept_float"]]
        tolerance = config.max_accuracy_drop if config.max_accuracy_drop is not None else 1.0
        candidates: dict[str, Path] = {"qdq": chosen}
        try:
            candidates["qoperator"] = quantize(kept, ctx.work_dir / "model.int8.qop.onnx", fmt=QuantFormat.QOperator)
        except Exception as exc:  # QOperator lacks kernels for some graphs: not a candidate then
            ctx.log.warning("QOperator candidate failed: %s", exc)
        if config.op_types is None:
            candidates["qdq_weighted_only"] = quantize(
                kept, ctx.work_dir / "model.int8.weighted.onnx", op_types=["Conv", "Gemm", "MatMul"]
            )
        name = spec["name"]
        baseline = fallback["fp32"]
        results = {
            label: {"drop": baseline - val.quality(path), "size_bytes": path.stat().st_size}
            for label, path in candidates.items()
        }
        feeds = {name: val.batches[0][:1] if len(val.batches[0]) >= 1 else val.batches[0]}
        timings = time_interleaved({"fp32": prepared, **candidates}, feeds, runs=9, threads=ctx.threads)
        for label in candidates:
            results[label]["p50_ms"] = timings[label]["p50_ms"]
        fp32_p50 = timings["fp32"]["p50_ms"]
        ok = [label for label in candidates if results[label]["drop"] <= tolerance]
        pool = ok or list(candidates)
        best = min(pool, key=lambda label: results[label]["p50_ms"])
        report = {"fp32_p50_ms": fp32_p50, "candidates": results, "chosen": best}
        if results[best]["p50_ms"] > fp32_p50:
            report["warning"] = (
                f"the fastest INT8 candidate ({best}, p50 {results[best]['p50_ms']:.3f} ms at batch 1) is slower "
                f"than the FP32 graph ({fp32_p50:.3f} ms) on this worker; it is {results[best]['size_bytes'] / prepared.stat().st_size:.2f}x "
                "the size. Keep the FP32 ONNX artifact where speed matters."
            )
            ctx.log.warning(report["warning"])
        if not ok:
            report["reason"] = "no candidate met the tolerance; returning the fastest of them"
        return candidates[best], report

    # -- per-layer fallback ------------------------------------------------------------------------

    def _validation(self, ctx: PassContext, config: QuantizeInt8Config, spec: dict, batch_size: int,
                    prepared: Path) -> _Validation:
        import numpy as np

        from worker.data import iter_batches

        dataset = ctx.evaluation_dataset or ctx.calibration_dataset
        source = "evaluation" if ctx.evaluation_dataset else "calibration"
        batches, labels = [], []
        for x, y in iter_batches(dataset, spec, ctx.preprocessing, batch_size=batch_size, limit=config.validation_samples):
            batches.append(x)
            labels.append(y)
        has_labels = dataset.labeled and all(y is not None for y in labels)
        return _Validation(
            batches=batches, labels=np.concatenate(labels) if has_labels else None, source=source,
            input_name=spec["name"], reference=_predict(prepared, spec["name"], batches),
        )

    def _fallback(self, ctx, config, prepared: Path, full: Path, quantize, spec, batch_size, val: _Validation):
        name = spec["name"]
        quality = val.quality
        baseline = float((val.reference == val.labels).mean()) if val.labels is not None else 1.0
        metric = "accuracy" if val.labels is not None else "top1_agreement"
        report = {
            "metric": metric, "validated_on": val.source, "samples": int(sum(len(b) for b in val.batches)),
            "tolerance": config.max_accuracy_drop, "fp32": baseline, "attempts": [], "kept_float": [],
        }
        score = quality(full)
        report["attempts"].append({"float_layers": 0, metric: score, "drop": baseline - score})
        ctx.report_progress(0.7)
        if config.max_accuracy_drop is None or baseline - score <= config.max_accuracy_drop:
            report.update(tolerance_met=True, result=score)
            return full, report

        ranked = _layer_snr(prepared, full, name, val.batches[: max(1, 64 // batch_size)])
        best = (baseline - score, full, [])
        most = min(config.max_float_layers, len(ranked))
        for k in sorted({min(2**i, most) for i in range(most.bit_length() + 1)}):
            ctx.check_cancelled()
            keep = [layer["node"] for layer in ranked[:k]]
            candidate = quantize(keep, ctx.work_dir / f"model.int8.fallback{k}.onnx")
            score = quality(candidate)
            drop = baseline - score
            report["attempts"].append({"float_layers": k, metric: score, "drop": drop})
            if drop < best[0]:
                best = (drop, candidate, ranked[:k])
            ctx.report_progress(0.7 + 0.3 * k / most)
            if drop <= config.max_accuracy_drop:
                break
        drop, chosen, kept = best
        report["kept_float"] = [
            dict(layer, reason=(
                f"worst output channel at {layer['worst_channel_snr_db']:.1f} dB SNR against FP32 "
                f"(whole tensor {layer['snr_db']:.1f} dB), among the {len(kept)} most damaged"
            ))
            for layer in kept
        ]
        report["tolerance_met"] = bool(drop <= config.max_accuracy_drop)
        report["result"] = baseline - drop
        if not report["tolerance_met"]:
            report["reason"] = (
                f"keeping up to {min(config.max_float_layers, len(ranked))} layers in float did not bring the "
                f"{metric} drop within {config.max_accuracy_drop}; returning the best found "
                f"(drop {drop:.4f})"
            )
            ctx.log.warning(report["reason"])
        return chosen, report


def _count(path: Path, op_type: str) -> int:
    import onnx

    return sum(1 for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == op_type)


def _session(model_or_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _predict(path: Path, input_name: str, batches: list):
    import numpy as np

    session = _session(path)
    outs = [session.run(None, {input_name: x})[0] for x in batches]
    return np.concatenate([o.reshape(len(o), -1).argmax(1) for o in outs])


def _layer_snr(prepared: Path, quantized: Path, input_name: str, batches: list) -> list[dict]:
    """Every node's output in the INT8 model against FP32, worst first.

    Judged by the worst output channel (dim 1), not the whole tensor: a tensor whose range one
    large channel dominates keeps a high whole-tensor SNR while INT8 zeroes its other channels.
    """
    import numpy as np
    import onnx

    fp32, q = onnx.load(str(prepared)), onnx.load(str(quantized))
    q_outputs = {n.name: n.output[0] for n in q.graph.node if n.name and n.output}
    pairs = [
        (n.name, n.op_type, n.output[0], q_outputs[n.name])
        for n in fp32.graph.node
        if n.name in q_outputs and n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Shape", "Constant")
    ]
    for model, names in ((fp32, [p[2] for p in pairs]), (q, [p[3] for p in pairs])):
        existing = {o.name for o in model.graph.output}
        for tensor in names:
            if tensor not in existing:
                model.graph.output.append(onnx.ValueInfoProto(name=tensor))
                existing.add(tensor)
    s_fp32, s_q = _session(fp32), _session(q)
    signal: list = [None] * len(pairs)
    noise: list = [None] * len(pairs)
    for x in batches:
        ref = s_fp32.run([p[2] for p in pairs], {input_name: x})
        got = s_q.run([p[3] for p in pairs], {input_name: x})
        for i, (a, b) in enumerate(zip(ref, got, strict=True)):
            if a.dtype.kind != "f" or a.shape != b.shape or a.ndim == 0:
                continue
            a64 = a.astype(np.float64).reshape(a.shape[0], a.shape[1] if a.ndim > 1 else 1, -1)
            err = a64 - b.astype(np.float64).reshape(a64.shape)
            sig, noi = (a64**2).sum((0, 2)), (err**2).sum((0, 2))
            signal[i] = sig if signal[i] is None else signal[i] + sig
            noise[i] = noi if noise[i] is None else noise[i] + noi
    layers = []
    for (name, op, _, _), sig, noi in zip(pairs, signal, noise, strict=True):
        if sig is None:
            continue
        live = sig > 1e-12 * max(float(sig.max()), 1e-30)  # dead channels (all-zero after ReLU) say nothing
        per_channel = 10 * np.log10(sig[live] / np.maximum(noi[live], 1e-30))
        whole = 10 * np.log10(sig.sum() / max(noi.sum(), 1e-30))
        layers.append({
            "node": name, "op_type": op,
            "snr_db": float(min(whole, 200.0)),
            "worst_channel_snr_db": float(min(per_channel.min(), 200.0)) if live.any() else 200.0,
        })
    return sorted(layers, key=lambda layer: layer["worst_channel_snr_db"])
