"""export_pt2: a PyTorch model (weights-only, a pruned graph, TorchScript) or an ONNX graph saved as a whole
ExportedProgram (.pt2)."""

from __future__ import annotations

from pydantic import Field

from core.formats import EXPORTED_PROGRAM, TRAINABLE_FORMATS
from core.steps.base import PassConfig, PassSpec


class ExportPt2Config(PassConfig):
    dynamic_batch: bool = Field(default=True, description="Leave the batch dimension open.")


class ExportPt2Spec(PassSpec[ExportPt2Config]):
    name = "export_pt2"
    version = 2
    description = "Save the model (weights-only, a graph, ONNX) as a whole ExportedProgram (.pt2)."
    Config = ExportPt2Config
    accepts = TRAINABLE_FORMATS
    trains = True
    produces = EXPORTED_PROGRAM
