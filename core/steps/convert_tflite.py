"""convert_tflite: a PyTorch or TensorFlow model to a verified .tflite."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.formats import EXPORTED_PROGRAM, NEEDS_CALIBRATION, ONNX, STATE_DICT, TF_FORMATS, TFLITE, TORCHSCRIPT
from core.steps.base import PassConfig, PassSpec

# The whole output's SNR (dB) a conversion must keep against its source. With a dataset, fp16, dynamic and
# int8 .tflite files are judged on the task's metric; the floor then only catches a broken conversion, and for
# int8 it is TASK_JUDGED_INT8_SNR_DB: INT8 noise on a classifier's near-zero logits leaves single-digit SNRs
# while top-1 holds (EfficientNet-Lite0: 5.7 dB, top-1 agreement 0.94), and 0 dB means noise as strong as the
# output, which no task survives.
DEFAULT_MIN_SNR_DB = {"fp32": 50.0, "fp16": 20.0, "dynamic": 15.0, "int8": 12.0}
TASK_JUDGED_INT8_SNR_DB = 0.0


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
        description="Fidelity floor (SNR of the outputs against the source, dB), a guard against a broken "
        "conversion; default by precision: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_MIN_SNR_DB.items())
        + f"; int8 judged on the task's metric (the job has images): {TASK_JUDGED_INT8_SNR_DB:g}.",
    )
    min_channel_snr_db: float | None = Field(
        default=None,
        description="Also require every output channel to keep this SNR: for heads whose channels differ in "
        "scale (boxes in pixels next to scores in 0..1), where a collapsed score channel hides in the "
        "whole-output SNR. Off by default: a classifier's near-zero logits have a low SNR that does not matter.",
    )
    verify_samples: int = Field(
        default=32, ge=1, le=1024, description="Samples of the output-SNR check (random inputs without a dataset)."
    )
    validation_samples: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Samples that judge an fp16, dynamic or int8 .tflite on the task's metric against the source "
        "(the evaluation dataset, else the calibration one; none: the output-SNR floor alone judges).",
    )
    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Tolerance on the task's metric (top-1 with class labels, else top-1 agreement; mAP or "
        "post-NMS F1 against the source plus the class-channel SNR floor for detectors; pixel agreement for "
        "segmenters) against the source. Default: the job's max_accuracy_drop.",
    )
    mixed_precision: bool = Field(
        default=True,
        description="int8 that misses the tolerance: ai-edge-quantizer static INT8 of the FP32 .tflite (int8 "
        "activations and weights, calibrated on the job's images) with the ops that add the most error kept "
        "float, doubling their number up to max_float_ops until the task's metric is within the tolerance; the "
        "artifact's precision is then 'mixed' (metrics.task_metric: every attempt; its mixed_precision: the "
        "float ops). false, or no set within the cap: the step fails with int8_over_tolerance.",
    )
    max_float_ops: int = Field(default=32, ge=1, le=4096, description="Most ops the mixed search keeps float.")


class ConvertTfliteSpec(PassSpec[ConvertTfliteConfig]):
    name = "convert_tflite"
    # 2: PyTorch int8 calibrates on every sample (a last partial batch too), from a single image up.
    # 3: fp16/dynamic/int8 judged on the task's metric within the tolerance (int8's SNR floor 0 dB then); an
    #    int8 miss becomes mixed precision (sensitive ops float) or int8_over_tolerance.
    version = 3
    description = (
        "PyTorch or TensorFlow model to a .tflite for phones (FP32, FP16 weights, or INT8), judged on the "
        "task's metric against the source; an INT8 that misses the tolerance keeps its most sensitive ops "
        "float (precision 'mixed') rather than failing. Full INT8 from PyTorch takes int8 inputs and outputs "
        "(scale and zero point in metrics.io)."
    )
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
