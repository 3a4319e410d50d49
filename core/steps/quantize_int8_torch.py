"""quantize_int8_torch: PyTorch FX graph mode INT8, saved as TorchScript."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.formats import NEEDS_CALIBRATION, STATE_DICT, TORCHSCRIPT
from core.steps.base import PassConfig, PassSpec


class QuantizeInt8TorchConfig(PassConfig):
    backend: Literal["x86", "fbgemm", "qnnpack"] = Field(
        default="x86", description="x86/fbgemm for x86 servers, qnnpack for ARM phones and boards."
    )
    num_calibration_samples: int = Field(default=256, ge=1, le=100_000)
    batch_size: int = Field(default=16, ge=1, le=1024)


class QuantizeInt8TorchSpec(PassSpec[QuantizeInt8TorchConfig]):
    name = "quantize_int8_torch"
    version = 1
    description = "PyTorch INT8 (FX graph mode: fuse, observe, convert), saved as TorchScript."
    Config = QuantizeInt8TorchConfig
    accepts = frozenset({STATE_DICT})
    produces = TORCHSCRIPT
    needs = frozenset({NEEDS_CALIBRATION})
