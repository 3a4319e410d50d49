"""distill: recover a pruned (or otherwise changed) model by training it to mimic the job's
original model (knowledge distillation), label-free on the job's unlabeled images or with
labels when the dataset has them. The training is worker.distillation's, shared with finetune; any model
format through worker.recovery."""

from __future__ import annotations

from core.steps.distill import DistillConfig, DistillSpec
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult
from worker.recovery import recover


class Distill(DistillSpec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: DistillConfig) -> PassResult:
        return recover(ctx, source, config, step=self.name)
