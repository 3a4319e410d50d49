"""prune_unstructured: zero individual weights by magnitude, or in the 2:4 pattern."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.formats import SAME_AS_INPUT, TRAINABLE_FORMATS
from core.steps.base import PassConfig, PassSpec


class PruneUnstructuredConfig(PassConfig):
    sparsity: float = Field(default=0.5, gt=0, lt=1, description="Fraction of weights set to zero (ignored for n:m).")
    scope: Literal["global", "layer"] = Field(
        default="global", description="Rank weights across all layers or within each."
    )
    pattern: Literal["none", "2:4"] = Field(
        default="none", description="2:4: two zeros in every group of four input weights."
    )
    protect: list[str] | None = Field(
        default=None, description="Module names left dense (default: the first convolution and the classifier)."
    )


class PruneUnstructuredSpec(PassSpec[PruneUnstructuredConfig]):
    name = "prune_unstructured"
    version = 2
    description = "Zero individual weights by magnitude (global/per-layer) or in the 2:4 pattern."
    Config = PruneUnstructuredConfig
    accepts = TRAINABLE_FORMATS
    trains = True
    produces = SAME_AS_INPUT
