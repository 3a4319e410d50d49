"""quantize_int8: ONNX Runtime INT8 quantization (static QDQ calibrated on the job's images, or dynamic)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.formats import NEEDS_CALIBRATION, ONNX
from core.steps.base import PassConfig, PassSpec


class QuantizeInt8Config(PassConfig):
    mode: Literal["static", "dynamic"] = Field(
        default="static",
        description="dynamic: weights INT8 ahead of time, activations quantized at run time (no calibration "
        "dataset; suits Linear/MatMul-heavy models, little gain for convolutions).",
    )
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    num_calibration_samples: int = Field(default=256, ge=1, le=100_000)
    batch_size: int = Field(
        default=16, ge=1, le=1024, description="Calibration batch (models with an open batch axis)."
    )
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
    op_types: list[str] | None = Field(
        default=None, description="Only quantize these op types (default: all supported)."
    )
    exclude_nodes: list[str] = Field(default_factory=list, description="Node names to keep in float.")
    keep_mixed_scale_heads_float: bool = Field(
        default=True,
        description="Keep in float a Concat whose inputs' calibrated ranges differ 16x or more (a detector head "
        "joining pixel boxes with 0..1 scores) and everything after it up to the outputs; metrics.float_nodes "
        "lists them with the ranges.",
    )
    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Per-layer fallback: keep the nodes that add the most error in float until the task's metric "
        "(evaluate's: accuracy or top-1 agreement; mAP with box labels, else post-NMS F1 against FP32, for "
        "detectors, whose raw head must also keep every score channel at 15 dB SNR or more; pixel agreement for "
        "segmenters) is within this of the FP32 model. Default: the job's max_accuracy_drop when search_speed is "
        "on, else no fallback.",
    )
    max_float_layers: int = Field(
        default=16, ge=1, le=1000, description="Fallback keeps at most this many layers in float."
    )
    validation_samples: int = Field(default=512, ge=16, le=100_000, description="Samples that judge the fallback.")
    search_speed: bool = Field(
        default=False,
        description="Also try QOperator and quantizing only Conv/Gemm/MatMul, time every candidate and the "
        "FP32 graph on this worker, and keep the fastest that meets the tolerance.",
    )


class QuantizeInt8Spec(PassSpec[QuantizeInt8Config]):
    name = "quantize_int8"
    description = "INT8 static quantization (ONNX Runtime, QDQ) calibrated on the calibration dataset."
    Config = QuantizeInt8Config
    accepts = frozenset({ONNX})
    produces = ONNX
    needs = frozenset({NEEDS_CALIBRATION})
    # 6: the speed search times its candidates with a settle between blocks (spinning thread pools skewed them).
    version = 6

    def requirements(self, config: QuantizeInt8Config) -> frozenset[str]:
        return frozenset() if config.mode == "dynamic" else self.needs
