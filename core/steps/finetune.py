"""finetune: supervised recovery training on labeled images, no teacher (distill with alpha = 0)."""

from __future__ import annotations

from pydantic import Field

from core.steps.distill import DistillConfig, DistillSpec


class FinetuneConfig(DistillConfig):
    alpha: float = Field(default=0.0, ge=0, le=0, description="No teacher term.")
    beta: float | None = Field(default=1.0, gt=0, description="Weight of the labels' CE.")


class FinetuneSpec(DistillSpec):
    name = "finetune"
    version = 2
    description = "Supervised recovery training on labeled images (no teacher)."
    Config = FinetuneConfig
