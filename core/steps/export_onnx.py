"""export_onnx: PyTorch to ONNX (ONNX uploads simplified), checked against the original."""

from __future__ import annotations

from pydantic import Field

from core.formats import ALL_MODEL_FORMATS, ONNX, TF_FORMATS
from core.steps.base import PassConfig, PassSpec


class ExportOnnxConfig(PassConfig):
    opset: int = Field(default=17, ge=13, le=21, description="ONNX opset of the exported graph.")
    dynamic_batch: bool = Field(default=True, description="Leave the batch dimension open.")
    simplify: bool = Field(default=True, description="Run onnxslim (constant folding, fusions).")
    tolerance: float = Field(
        default=1e-3, gt=0, description="Largest accepted |ONNX - original| relative to max |original|."
    )


class ExportOnnxSpec(PassSpec[ExportOnnxConfig]):
    name = "export_onnx"
    description = "Export to ONNX (or simplify an ONNX upload) and check it against the original."
    Config = ExportOnnxConfig
    accepts = ALL_MODEL_FORMATS
    produces = ONNX
    version = 5
    format_hints = {
        fmt: "TensorFlow uploads go to TFLite (presets tflite-fp16, tflite-int8, or convert_tflite); for the ONNX "
        "steps, convert the model with tf2onnx and upload the .onnx"
        for fmt in sorted(TF_FORMATS)
    }
