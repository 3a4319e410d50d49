"""quantize_qat: quantization-aware recovery. When post-training INT8 misses the tolerance on a model the
service can train, fine-tune it with its convolutions and linears fake-quantized as ONNX Runtime will
run them, distilled from the FP32 original (label-free by default), and write the Q/DQ ONNX graph."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.formats import NEEDS_CALIBRATION, ONNX, TRAINABLE_FORMATS
from core.steps.base import PassSpec
from core.steps.distill import DistillConfig


class QuantizeQatConfig(DistillConfig):
    # Short and gentle by default: the weights only have to settle onto the INT8 grid, not be relearned.
    epochs: int = Field(default=3, ge=1, le=500)
    learning_rate: float = Field(default=1e-4, gt=0, le=1)
    beta: float | None = Field(
        default=None,
        ge=0,
        description="Weight of the labels' CE (a classifier with class labels: KL to the original's softened "
        "outputs plus CE). None or 0: label-free, every output matched to the original's by normalised MSE.",
    )
    per_channel: bool = Field(default=True, description="Weights quantized per output channel (else per tensor).")
    calibration_method: Literal["minmax", "percentile"] = Field(
        default="minmax",
        description="How the activation ranges are first set (then followed by a moving average during training), "
        "and how the Q/DQ graph calibrates the tensors that training did not quantize.",
    )
    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Tolerance on the task's metric against the FP32 original (as quantize_int8 judges). "
        "Default: the job's max_accuracy_drop.",
    )


class QuantizeQatSpec(PassSpec[QuantizeQatConfig]):
    name = "quantize_qat"
    version = 1
    description = (
        "Quantization-aware training: fake-quantized fine-tuning distilled from the original, exported as "
        "ONNX Runtime INT8 (QDQ)."
    )
    Config = QuantizeQatConfig
    accepts = TRAINABLE_FORMATS
    produces = ONNX
    needs = frozenset({NEEDS_CALIBRATION})
    trains = True
    # A candidate beside the post-training INT8, not before it in one chain: the next producing step starts
    # from the FP32 model this one started from.
    ends_branch = True
