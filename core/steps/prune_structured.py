"""prune_structured: remove whole channels, dependency-aware, to a target fraction of parameters or MACs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.formats import SAME_AS_INPUT, TRAINABLE_FORMATS
from core.steps.base import PassConfig, PassSpec


class PruneStructuredConfig(PassConfig):
    target: Literal["params", "macs"] = "params"
    target_ratio: float = Field(default=0.5, gt=0, lt=0.95, description="Fraction of parameters (or MACs) to remove.")
    importance: Literal["l1", "l2", "taylor", "bn_scale"] = Field(
        default="l2", description="taylor uses gradients on the calibration images."
    )
    global_pruning: bool = Field(default=False, description="Rank channels across layers instead of per layer.")
    protect: list[str] | None = Field(
        default=None,
        description="Layers never pruned: module names, an ONNX upload's node names, a .pt2 upload's module paths "
        "(default: the input and output layers, and on graph uploads the layers whose channels the graph hard-codes).",
    )
    round_to: int = Field(
        default=8, ge=1, le=256, description="Keep channel counts at multiples of this (hardware-friendly); 1: any."
    )
    iterative_steps: int = Field(
        default=1, ge=1, le=20, description="Prune in this many rounds (importance re-ranked each round)."
    )
    target_latency_ratio: float | None = Field(
        default=None,
        gt=0.05,
        lt=1,
        description="Instead of target_ratio: prune until the model's latency on the worker (batch of the job's "
        "input, in latency_runtime) is this fraction of the original's, measured after each round.",
    )
    latency_runtime: Literal["onnxruntime", "openvino"] = Field(
        default="onnxruntime", description="Where target_latency_ratio is measured (the ONNX export runs in it)."
    )
    tolerance: float = Field(default=0.02, gt=0, le=0.1, description="How close to the target the bisection must get.")


class PruneStructuredSpec(PassSpec[PruneStructuredConfig]):
    name = "prune_structured"
    version = 2
    description = "Remove whole channels (dependency-aware) to a target fraction of parameters or MACs."
    Config = PruneStructuredConfig
    accepts = TRAINABLE_FORMATS
    trains = True
    produces = SAME_AS_INPUT
