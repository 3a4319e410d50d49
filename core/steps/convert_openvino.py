"""convert_openvino: an ONNX model or a torch.export program to a verified OpenVINO IR for x86 CPUs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.formats import EXPORTED_PROGRAM, ONNX, OPENVINO_IR, STATE_DICT, TORCHSCRIPT
from core.steps.base import PassConfig, PassSpec

# The floor on the weakest output's SNR (dB) against the source, by the precision the CPU really
# computed in: floors that catch a broken conversion, not grades. FP32 compute keeps 60+ dB even
# with FP16-compressed weights; bf16 keeps 8 mantissa bits (YOLOv8n's class channels: about 21 dB).
DEFAULT_MIN_SNR_DB = {"f32": 40.0, "bf16": 20.0, "f16": 20.0}

# Both OpenVINO steps' static_shape (quantize_openvino's too).
STATIC_SHAPE = (
    "Fix the IR's inputs at the job's input shape (batch 1 unless the job's input_shape says otherwise): "
    "OpenVINO compiles its kernels for that one shape, faster at that batch than with an open batch axis; the "
    "IR then takes that shape only (benchmark reports a larger batch as not runnable). metrics.static_shape "
    "and the artifact's meta list the fixed shapes."
)

_EXPORT_FIRST = (
    "OpenVINO converts ONNX models and torch.export programs (.pt2): add export_onnx before convert_openvino"
)


class ConvertOpenvinoConfig(PassConfig):
    weights: Literal["fp32", "fp16"] = Field(
        default="fp32",
        description="fp16: weights stored in FP16 (half the file), decompressed to the compute precision at load.",
    )
    inference_precision: Literal["auto", "f32", "bf16", "f16"] = Field(
        default="auto",
        description="The CPU's compute precision (INFERENCE_PRECISION_HINT) when verifying, benchmarking and "
        "evaluating; auto = OpenVINO's own choice on the worker (bf16 where the CPU has AMX or AVX-512 BF16, "
        "f32 elsewhere). A precision the CPU lacks falls back to one it has; the metrics say which ran.",
    )
    min_snr_db: float | None = Field(
        default=None,
        description="Fidelity floor (the weakest output's SNR against the source, dB); default by the precision "
        "computed in: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_MIN_SNR_DB.items()),
    )
    static_shape: bool = Field(default=False, description=STATIC_SHAPE)
    verify_samples: int = Field(default=32, ge=1, le=1024, description="Inputs compared with the source.")


class ConvertOpenvinoSpec(PassSpec[ConvertOpenvinoConfig]):
    name = "convert_openvino"
    version = 2  # static_shape: the IR can take the job's input shape only (faster kernels at that batch)
    description = "ONNX or .pt2 to a verified OpenVINO IR (one .zip of model.xml + model.bin) for x86 CPUs."
    Config = ConvertOpenvinoConfig
    accepts = frozenset({ONNX, EXPORTED_PROGRAM})
    produces = OPENVINO_IR
    format_hints = {TORCHSCRIPT: _EXPORT_FIRST, STATE_DICT: _EXPORT_FIRST}
