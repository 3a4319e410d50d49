"""convert_tflite: a PyTorch or TensorFlow model to a verified .tflite."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.formats import EXPORTED_PROGRAM, NEEDS_CALIBRATION, ONNX, STATE_DICT, TF_FORMATS, TFLITE, TORCHSCRIPT
from core.steps.base import PassConfig, PassSpec

# The weakest output channel's SNR (dB) a conversion must keep against its source.
DEFAULT_MIN_SNR_DB = {"fp32": 50.0, "fp16": 20.0, "dynamic": 15.0, "int8": 12.0}


class ConvertTfliteConfig(PassConfig):
    precision: Literal["fp32", "fp16", "dynamic", "int8"] = Field(
        default="fp32", description="dynamic (dynamic-range int8 weights) is for TensorFlow uploads."
    )
    io_dtype: Literal["auto", "float32", "int8", "uint8"] = Field(
        default="auto",
        description="int8 from TensorFlow: the .tflite's input/output type (auto = int8). PyTorch int8 "
        "models always take int8.",
    )
    per_channel: bool = Field(default=True, description="int8: one weight scale per output channel.")
    num_calibration_samples: int = Field(default=256, ge=1, le=100_000)
    batch_size: int = Field(default=16, ge=1, le=1024, description="Calibration batch size.")
    io_layout: Literal["nchw", "nhwc"] = Field(
        default="nchw", description="nhwc: image inputs channels-last, as Android camera pipelines hand them over."
    )
    min_snr_db: float | None = Field(
        default=None,
        description="Fidelity floor (SNR of the outputs against the source, dB); default by "
        "precision: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_MIN_SNR_DB.items()),
    )
    min_channel_snr_db: float | None = Field(
        default=None,
        description="Also require every output channel to keep this SNR: for heads whose channels differ in "
        "scale (boxes in pixels next to scores in 0..1), where a collapsed score channel hides in the "
        "whole-output SNR. Off by default: a classifier's near-zero logits have a low SNR that does not matter.",
    )
    verify_samples: int = Field(default=32, ge=1, le=1024)


class ConvertTfliteSpec(PassSpec[ConvertTfliteConfig]):
    name = "convert_tflite"
    # 2: PyTorch int8 calibrates on every sample (a last partial batch too), from a single image up.
    version = 2
    description = "PyTorch model to a verified .tflite (FP32, FP16 weights, or full INT8) for phones."
    Config = ConvertTfliteConfig
    accepts = frozenset({EXPORTED_PROGRAM, STATE_DICT}) | TF_FORMATS
    produces = TFLITE
    format_hints = {
        ONNX: "ONNX to TFLite has no converter here that reliably gives a .tflite that runs: upload "
        "the PyTorch model instead (a torch.export .pt2, or a torchvision state_dict with its architecture)",
        TORCHSCRIPT: "litert-torch converts torch.export programs, not TorchScript: upload the model "
        "saved with torch.export.save (.pt2)",
    }

    def requirements(self, config: ConvertTfliteConfig) -> frozenset[str]:
        return frozenset({NEEDS_CALIBRATION}) if config.precision == "int8" else frozenset()
