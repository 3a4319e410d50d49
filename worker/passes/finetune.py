"""finetune: plain supervised recovery training on labeled images, no teacher; for comparison
with distill, and for users who have labels but no use for the original's outputs."""

from __future__ import annotations

from pydantic import Field

from worker.passes.distill import Distill, DistillConfig


class FinetuneConfig(DistillConfig):
    alpha: float = Field(default=0.0, ge=0, le=0, description="No teacher term.")
    beta: float | None = Field(default=1.0, gt=0, description="Weight of the labels' CE.")


class Finetune(Distill):
    name = "finetune"
    version = 1
    description = "Supervised recovery training on labeled images (no teacher)."
    Config = FinetuneConfig
