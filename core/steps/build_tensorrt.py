"""build_tensorrt: ONNX to a TensorRT engine for one GPU kind; a job names the kind with ``gpu_kind`` and the
step runs on that kind's queue."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from core.formats import ONNX, TENSORRT_ENGINE
from core.settings import GPU_KIND_PATTERN
from core.steps.base import PassConfig, PassSpec
from core.workers import gpu_queue

Precision = Literal["fp32", "fp16", "int8", "best"]


class ShapeRange(PassConfig):
    """One optimization profile: the range of batch sizes (and, optionally, image sizes) the
    engine accepts, and the point TensorRT tunes its kernels for."""

    min_batch: int = Field(default=1, ge=1)
    opt_batch: int = Field(default=1, ge=1)
    max_batch: int = Field(default=32, ge=1)
    # [height, width] for models with open spatial axes; default: the job's input shape.
    min_hw: list[int] | None = Field(default=None, min_length=2, max_length=2)
    opt_hw: list[int] | None = Field(default=None, min_length=2, max_length=2)
    max_hw: list[int] | None = Field(default=None, min_length=2, max_length=2)

    @model_validator(mode="after")
    def _ordered(self) -> ShapeRange:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("need min_batch <= opt_batch <= max_batch")
        hws = [self.min_hw, self.opt_hw, self.max_hw]
        if any(h is not None for h in hws):
            if any(h is None for h in hws):
                raise ValueError("give min_hw, opt_hw and max_hw together")
            given = [h for h in hws if h is not None]  # all three, typed as such
            for a, b in zip(given, given[1:], strict=False):
                if a[0] > b[0] or a[1] > b[1]:
                    raise ValueError("need min_hw <= opt_hw <= max_hw")
        return self


class BuildTensorrtConfig(PassConfig):
    precision: Precision = Field(
        default="fp16",
        description="fp32; fp16 (FP16 kernels allowed); int8 (needs a Q/DQ model from quantize_int8: explicit "
        "quantization, TensorRT 10's way); best (every precision TensorRT finds faster).",
    )
    gpu_kind: str | None = Field(
        default=None,
        pattern=GPU_KIND_PATTERN,
        description="The GPU kind the engine is for (a worker's CVOPT_GPU_KIND, e.g. h100, l4); the step "
        "runs on that kind's queue. Several kinds: one build_tensorrt step per kind.",
    )
    fp32_layers: list[str] = Field(
        default_factory=list,
        description="Layers kept in FP32 (regular expressions over ONNX node names or op types, e.g. "
        "'Softmax', '.*head.*'): a per-layer precision constraint, for layers that overflow in FP16.",
    )
    profiles: list[ShapeRange] = Field(
        default_factory=lambda: [ShapeRange()],
        min_length=1,
        max_length=8,
        description="Optimization profiles for an open batch (and resolution); ignored for fixed shapes.",
    )
    workspace_mib: int = Field(default=4096, ge=64, le=1 << 20, description="Builder workspace limit.")
    optimization_level: int = Field(default=3, ge=0, le=5, description="TensorRT builder optimization level.")
    reuse_timing_cache: bool = Field(
        default=True,
        description="Reuse the timing cache saved by earlier builds for the same GPU and TensorRT version "
        "(faster, more reproducible builds), and save the updated one.",
    )

    @model_validator(mode="after")
    def _patterns_compile(self) -> BuildTensorrtConfig:
        for pattern in self.fp32_layers:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"fp32_layers: {pattern!r} is not a regular expression: {exc}") from None
        return self


class BuildTensorrtSpec(PassSpec[BuildTensorrtConfig]):
    name = "build_tensorrt"
    version = 1
    description = "ONNX to a TensorRT engine for one GPU kind (gpu queue)."
    Config = BuildTensorrtConfig
    accepts = frozenset({ONNX})
    produces = TENSORRT_ENGINE
    queue = "gpu"

    def step_queue(self, config: BuildTensorrtConfig) -> str:
        return gpu_queue(config.gpu_kind)
