"""evaluate: the task's metric of the original and every artifact so far."""

from __future__ import annotations

from pydantic import Field

from core.formats import MEASURABLE_FORMATS, NEEDS_DATASET
from core.steps.base import PassConfig, PassSpec


class EvaluateConfig(PassConfig):
    max_samples: int = Field(default=1000, ge=1, le=1_000_000)
    batch_size: int = Field(default=32, ge=1, le=1024)


class EvaluateSpec(PassSpec[EvaluateConfig]):
    name = "evaluate"
    description = "The task's metric (accuracy, mAP, or agreement with the original) of every artifact so far."
    Config = EvaluateConfig
    accepts = MEASURABLE_FORMATS
    produces = None
    needs = frozenset({NEEDS_DATASET})
    version = 4
