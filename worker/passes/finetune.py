"""finetune: plain supervised recovery training on labeled images, no teacher; for comparison
with distill, and for users who have labels but no use for the original's outputs. The training
is worker.distillation's with alpha = 0."""

from __future__ import annotations

from core.steps.finetune import FinetuneConfig, FinetuneSpec
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult
from worker.recovery import recover


class Finetune(FinetuneSpec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: FinetuneConfig) -> PassResult:
        return recover(ctx, source, config, step=self.name)
