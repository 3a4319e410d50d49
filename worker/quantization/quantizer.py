"""One prepared graph, calibrated once, quantized into any number of candidates (nodes kept in
float, another format, other op types): the ranges are collected by the first candidate and read
from ORT's calibration cache by every later one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.errors import PassError
from core.steps.quantize_int8 import QuantizeInt8Config
from worker.quantization.calibration import CalibrationReader, stride
from worker.quantization.graph import count_nodes, cpu_has_vnni

QuantFormatName = Literal["qdq", "qoperator"]


def reduce_range_for(config: QuantizeInt8Config) -> bool:
    """The config's reduce_range, or by default: on for u8 activations with s8 weights on x86 CPUs
    without VNNI, whose u8s8 kernels saturate with full 8-bit weights."""
    if config.reduce_range is not None:
        return config.reduce_range
    return (config.activation_type, config.weight_type) == ("uint8", "int8") and not cpu_has_vnni()


@dataclass
class Quantizer:
    prepared: Path
    config: QuantizeInt8Config
    per_channel: bool
    reader: CalibrationReader
    ranges: Path  # ORT's calibration cache: written by the first candidate
    reduce_range: bool
    # Mixed-scale heads (worker.quantization.heads): float in every candidate.
    head_nodes: list[str] = field(default_factory=list)

    def quantize(
        self,
        exclude: list[str],
        out: Path,
        *,
        fmt: QuantFormatName = "qdq",
        op_types: list[str] | None | Literal["config"] = "config",
    ) -> Path:
        """A candidate with ``exclude`` (and the config's and the heads' nodes) kept in float."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        config = self.config
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        quantize_static(
            str(self.prepared),
            str(out),
            # After the first call the ranges come from the cache file: calibrated once.
            self.reader if not self.ranges.exists() else None,
            quant_format={"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[fmt],
            per_channel=self.per_channel,
            reduce_range=self.reduce_range,
            activation_type=qtype[config.activation_type],
            weight_type=qtype[config.weight_type],
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[config.calibration_method],
            op_types_to_quantize=config.op_types if op_types == "config" else op_types,
            nodes_to_exclude=sorted(set(config.exclude_nodes) | set(self.head_nodes) | set(exclude)),
            calibration_cache_path=str(self.ranges),
            extra_options={
                "ActivationSymmetric": config.symmetric_activations,
                "CalibPercentile": config.percentile,
                # Not CalibMaxIntermediateOutputs: ORT 1.32 drops (not merges) what it
                # collected when that cap is reached. The strided reader bounds memory.
                "CalibStridedMinMax": stride(len(self.reader)),
            },
        )
        return out

    def first_candidate(self, work_dir: Path, log) -> tuple[Path, list[dict[str, Any]]]:
        """(the quantized graph, the mixed-scale head nodes kept float): calibrates, then, when the
        config keeps heads float and the ranges show one, quantizes again without it."""
        import onnx

        from worker.quantization.heads import calibrated_ranges, mixed_scale_heads

        out = self.quantize([], work_dir / "model.int8.onnx")
        if self.reader.seen == 0:
            raise PassError("the calibration dataset yielded no samples", code="empty_dataset")
        float_nodes: list[dict[str, Any]] = []
        if self.config.keep_mixed_scale_heads_float:
            # The ranges exist only once calibrated: the first graph is quantized whole, then again
            # (from the cached ranges) without the heads.
            model = onnx.load(str(self.prepared), load_external_data=False)
            float_nodes = mixed_scale_heads(model, calibrated_ranges(self.ranges), op_types=self.config.op_types)
            if float_nodes:
                self.head_nodes.extend(n["node"] for n in float_nodes)
                log.info("keeping %d node(s) of mixed-scale heads in float: %s", len(self.head_nodes), self.head_nodes)
                out = self.quantize([], work_dir / "model.int8.heads_float.onnx")
        if count_nodes(out, "QuantizeLinear") == 0:
            raise PassError("nothing in the model could be quantized (no supported ops)", code="nothing_quantized")
        return out, float_nodes
