"""export_pt2: a weights-only PyTorch model saved as a whole ExportedProgram (.pt2)."""

from __future__ import annotations

from pydantic import Field

from core.formats import EXPORTED_PROGRAM, STATE_DICT
from core.steps.base import PassConfig, PassSpec


class ExportPt2Config(PassConfig):
    dynamic_batch: bool = Field(default=True, description="Leave the batch dimension open.")


class ExportPt2Spec(PassSpec[ExportPt2Config]):
    name = "export_pt2"
    version = 1
    description = "Save a weights-only PyTorch model as a whole ExportedProgram (.pt2)."
    Config = ExportPt2Config
    accepts = frozenset({STATE_DICT})
    produces = EXPORTED_PROGRAM
