"""benchmark: size and latency of the original and every artifact so far."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.formats import MEASURABLE_FORMATS
from core.steps.base import PassConfig, PassSpec


class BenchmarkConfig(PassConfig):
    batch_sizes: list[int] = Field(
        default=[1, 8], min_length=1, max_length=4, description="Batch 1 is latency; a larger one is throughput."
    )
    warmup: int = Field(default=5, ge=0, le=1000)
    runs: int = Field(default=50, ge=5, le=10_000)
    max_seconds: float = Field(default=60.0, gt=0, description="Time budget for all timed runs of one batch size.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Where PyTorch models run: auto = the GPU on GPU workers (GPU artifacts are compared with the "
        "original in FP32 on the same GPU), else the CPU. ONNX and TFLite run on the CPU.",
    )


class BenchmarkSpec(PassSpec[BenchmarkConfig]):
    name = "benchmark"
    description = "Size and latency of the original and every artifact so far (on the GPU on GPU workers)."
    Config = BenchmarkConfig
    accepts = MEASURABLE_FORMATS
    produces = None
    # 3: CPU variants are timed in blocks with a settle between them (spinning thread pools skewed the next block).
    version = 3
