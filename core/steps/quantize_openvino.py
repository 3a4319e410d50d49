"""quantize_openvino: NNCF post-training INT8 of an ONNX model into an OpenVINO IR for x86 CPUs, judged on the
job's task metric like every other INT8 artifact."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.formats import NEEDS_CALIBRATION, ONNX, OPENVINO_IR
from core.steps.base import PassConfig, PassSpec
from core.steps.convert_openvino import STATIC_SHAPE


class QuantizeOpenvinoConfig(PassConfig):
    preset: Literal["performance", "mixed"] = Field(
        default="performance",
        description="NNCF's quantization preset: performance = symmetric weights and activations (fastest on "
        "CPUs); mixed = asymmetric activations (for activations far from zero-centred, e.g. after non-ReLU "
        "functions).",
    )
    subset_size: int = Field(
        default=300, ge=1, le=100_000, description="Calibration samples (capped by the calibration dataset)."
    )
    fast_bias_correction: bool = Field(
        default=True, description="NNCF's fast bias correction; false = the slower, more exact algorithm."
    )
    keep_heads_float: bool = Field(
        default=True,
        description="Keep in float a Concat whose inputs' calibrated ranges differ 16x or more (a detector head "
        "joining pixel boxes with 0..1 scores) and everything after it up to the outputs: NNCF's ignored "
        "scope; metrics.ignored_scope lists them with the reasons.",
    )
    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Tolerance on the task's metric (evaluate's: accuracy or top-1 agreement; mAP or post-NMS "
        "F1 against FP32 plus the class-channel SNR floor for detectors) against the ONNX source. Default: "
        "the job's max_accuracy_drop.",
    )
    accuracy_control: bool = Field(
        default=True,
        description="When the INT8 IR misses the tolerance, run NNCF's quantize_with_accuracy_control (reverting "
        "the most damaging layers to float until the task's metric is within the tolerance) and judge again; "
        "false = fail at once. The step fails (int8_over_tolerance) rather than ship an IR that misses.",
    )
    inference_precision: Literal["auto", "f32", "bf16"] = Field(
        default="auto",
        description="The CPU's precision for the layers left in float (INFERENCE_PRECISION_HINT) when judging, "
        "benchmarking and evaluating; auto = OpenVINO's own choice on the worker (bf16 where the CPU has AMX "
        "or AVX-512 BF16).",
    )
    static_shape: bool = Field(default=False, description=STATIC_SHAPE)
    validation_samples: int = Field(
        default=512,
        ge=16,
        le=100_000,
        description="Samples that judge the INT8 IR (the evaluation dataset, else the calibration one).",
    )


class QuantizeOpenvinoSpec(PassSpec[QuantizeOpenvinoConfig]):
    name = "quantize_openvino"
    version = 2  # static_shape: the IR can take the job's input shape only (faster kernels at that batch)
    description = "NNCF INT8 post-training quantization of an ONNX model into a verified OpenVINO IR (.openvino.zip)."
    Config = QuantizeOpenvinoConfig
    accepts = frozenset({ONNX})
    produces = OPENVINO_IR
    needs = frozenset({NEEDS_CALIBRATION})
