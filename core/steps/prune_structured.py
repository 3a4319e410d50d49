"""prune_structured: remove whole channels, dependency-aware, to a target fraction of parameters or MACs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.formats import STATE_DICT
from core.steps.base import PassConfig, PassSpec


class PruneStructuredConfig(PassConfig):
    target: Literal["params", "macs"] = "params"
    target_ratio: float = Field(default=0.5, gt=0, lt=0.95, description="Fraction of parameters (or MACs) to remove.")
    importance: Literal["l1", "l2", "taylor", "bn_scale"] = Field(
        default="l2", description="taylor uses gradients on the calibration images."
    )
    global_pruning: bool = Field(default=False, description="Rank channels across layers instead of per layer.")
    protect: list[str] | None = Field(
        default=None, description="Module names never pruned (default: the first convolution and the classifier)."
    )
    iterative_steps: int = Field(
        default=1, ge=1, le=20, description="Prune in this many rounds (importance re-ranked each round)."
    )
    tolerance: float = Field(default=0.02, gt=0, le=0.1, description="How close to the target the bisection must get.")


class PruneStructuredSpec(PassSpec[PruneStructuredConfig]):
    name = "prune_structured"
    version = 1
    description = "Remove whole channels (dependency-aware) to a target fraction of parameters or MACs."
    Config = PruneStructuredConfig
    accepts = frozenset({STATE_DICT})
    produces = STATE_DICT
