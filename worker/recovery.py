"""The distill and finetune steps on any model format: a state_dict is trained as its torchvision
architecture (worker.distillation.train_student); an ONNX graph, a .pt2 program or a TorchScript module
becomes a trainable module (worker.trainable, checked against the upload first), is trained against the
job's original (itself made trainable, as the teacher) and is written back in its own format."""

from __future__ import annotations

from core.formats import STATE_DICT
from core.steps.distill import DistillConfig
from worker.passes.base import ArtifactRef, PassContext, PassResult


def recover(ctx: PassContext, source: ArtifactRef, config: DistillConfig, *, step: str) -> PassResult:
    from worker.data import job_feeds
    from worker.distillation import train_module, train_student
    from worker.trainable import check_round_trip, check_saved, load_trainable, save_trainable

    if source.format == STATE_DICT:
        return train_student(ctx, source, config, step=step)
    feeds = job_feeds(ctx)
    student = load_trainable(source, ctx)
    conversion_error = check_round_trip(student, source, ctx, feeds)
    teacher = load_trainable(ctx.original, ctx)
    check_round_trip(teacher, ctx.original, ctx, feeds)
    student.module, metrics = train_module(ctx, student.module, teacher.module, config, step=step, task=ctx.task)
    out = save_trainable(student, ctx, f"model.{step}")
    export_error = check_saved(student, out, ctx)
    return PassResult(
        artifact=out,
        format=student.format,
        meta=dict(source.meta),
        metrics={**metrics, "conversion_error": conversion_error, "export_error": export_error},
    )
