"""finetune: plain supervised recovery training on labeled images, no teacher; for comparison
with distill, and for users who have labels but no use for the original's outputs. The training
is worker.distillation's with alpha = 0."""

from __future__ import annotations

from core.steps.finetune import FinetuneConfig, FinetuneSpec
from worker.distillation import train_student
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult


class Finetune(FinetuneSpec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: FinetuneConfig) -> PassResult:
        return train_student(ctx, source, config, step=self.name)
