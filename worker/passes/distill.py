"""distill: recover a pruned (or otherwise changed) model by training it to mimic the job's
original model (knowledge distillation), label-free on the job's unlabeled images or with
labels when the dataset has them. The training is worker.distillation's, shared with finetune."""

from __future__ import annotations

from core.steps.distill import DistillConfig, DistillSpec
from worker.distillation import train_student
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult


class Distill(DistillSpec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: DistillConfig) -> PassResult:
        return train_student(ctx, source, config, step=self.name)
