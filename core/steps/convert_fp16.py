"""convert_fp16: ONNX FP32 to FP16, nodes that would overflow kept in FP32."""

from __future__ import annotations

from pydantic import Field

from core.formats import ONNX
from core.steps.base import PassConfig, PassSpec


class ConvertFp16Config(PassConfig):
    keep_io_types: bool = Field(default=True, description="Inputs and outputs stay float32.")
    overflow_fraction: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Keep a node in FP32 when its observed |activation| exceeds this fraction of FP16's max.",
    )
    num_samples: int = Field(default=32, ge=1, le=4096, description="Inputs used to look for overflow.")
    op_block_list: list[str] = Field(default_factory=list, description="Extra op types to keep in FP32.")


class ConvertFp16Spec(PassSpec[ConvertFp16Config]):
    name = "convert_fp16"
    version = 1
    description = "FP16 ONNX with FP32 inputs/outputs; nodes that would overflow FP16 stay FP32."
    Config = ConvertFp16Config
    accepts = frozenset({ONNX})
    produces = ONNX
