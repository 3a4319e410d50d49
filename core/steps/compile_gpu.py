"""compile_gpu: PyTorch to an FP16/BF16 AOTInductor package for NVIDIA GPUs (or a CPU one, for tests)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.formats import AOTI_PACKAGE, EXPORTED_PROGRAM, STATE_DICT
from core.steps.base import PassConfig, PassSpec


class CompileGpuConfig(PassConfig):
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    channels_last: bool = True
    max_batch: int = Field(default=64, ge=1, le=4096, description="Largest batch the package accepts.")
    package: Literal["aoti", "exported_program"] = Field(
        default="aoti", description="aoti: AOTInductor package; exported_program: FP16 program compiled at load."
    )
    device: Literal["cuda", "cpu"] = Field(
        default="cuda", description="cpu builds a CPU AOTInductor package (for tests and CPU-only deployments)."
    )
    min_snr_db: float | None = Field(default=None, description="Fidelity floor; default 30 dB (fp16), 20 (bf16).")


class CompileGpuSpec(PassSpec[CompileGpuConfig]):
    name = "compile_gpu"
    version = 1
    description = "PyTorch to an FP16/BF16 channels-last AOTInductor package for NVIDIA GPUs (gpu queue)."
    Config = CompileGpuConfig
    accepts = frozenset({EXPORTED_PROGRAM, STATE_DICT})
    produces = AOTI_PACKAGE
    queue = "gpu"

    def step_queue(self, config: CompileGpuConfig) -> str:
        return "gpu" if config.device == "cuda" else "cpu"
