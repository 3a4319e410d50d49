"""distill: knowledge distillation from the job's original model (label-free, or with labels)."""

from __future__ import annotations

from pydantic import Field

from core.formats import NEEDS_CALIBRATION, SAME_AS_INPUT, TRAINABLE_FORMATS
from core.steps.base import PassConfig, PassSpec


class DistillConfig(PassConfig):
    alpha: float = Field(default=1.0, ge=0, description="Weight of the teacher's soft targets.")
    beta: float | None = Field(
        default=None, ge=0, description="Weight of the labels' CE; default 0.5 with labels, 0 without."
    )
    temperature: float = Field(default=4.0, gt=0)
    epochs: int = Field(default=5, ge=1, le=500)
    learning_rate: float = Field(default=1e-3, gt=0, le=1)
    batch_size: int = Field(default=32, ge=1, le=1024)
    augmentation: bool = Field(default=True, description="Random horizontal flips and small shifts.")
    validation_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    max_samples: int = Field(default=20_000, ge=16, le=1_000_000, description="Training images read into memory.")
    seed: int = 0


class DistillSpec(PassSpec[DistillConfig]):
    name = "distill"
    version = 2
    description = "Knowledge distillation from the original model (label-free, or with labels)."
    Config = DistillConfig
    accepts = TRAINABLE_FORMATS
    trains = True
    produces = SAME_AS_INPUT
    needs = frozenset({NEEDS_CALIBRATION})
