"""export_pt2: a PyTorch model made of weights (a torchvision state_dict, pruned or distilled), an ONNX
graph, a TorchScript module or a .pt2 program (pruned, distilled) into a whole torch.export
ExportedProgram (.pt2) that loads anywhere with torch.export.load, without torchvision or this
service's code, with an open batch axis where the graph allows (an upload's own dynamic axes for
graphs: ONNX and TorchScript through worker.trainable's converted module, checked against the
upload first)."""

from __future__ import annotations

from core.errors import PassError
from core.formats import EXPORTED_PROGRAM, STATE_DICT
from core.steps.export_pt2 import ExportPt2Config, ExportPt2Spec
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult


class ExportPt2(ExportPt2Spec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: ExportPt2Config) -> PassResult:
        if source.format != STATE_DICT:
            return self._from_graph(ctx, source, config)
        return self._from_weights(ctx, source, config)

    def _from_graph(self, ctx: PassContext, source: ArtifactRef, config: ExportPt2Config) -> PassResult:
        import torch

        from worker.data import job_feeds, sample_tensors
        from worker.trainable import check_round_trip, check_saved, export_program, load_trainable

        trainable = load_trainable(source, ctx)
        conversion_error = check_round_trip(trainable, source, ctx, job_feeds(ctx))
        if not config.dynamic_batch:
            trainable.dynamic_axes = {}
        trainable.format = EXPORTED_PROGRAM
        out = ctx.work_dir / "model.pt2"
        torch.export.save(export_program(trainable, sample_tensors(ctx.input_spec)), str(out))
        error = check_saved(trainable, out, ctx)
        dynamic = any(0 in trainable.dynamic_axes.get(n, {}) for n in trainable.input_names)
        return PassResult(
            artifact=out,
            format=EXPORTED_PROGRAM,
            metrics={"dynamic_batch": dynamic, "conversion_error": conversion_error, "max_relative_error": error},
        )

    def _from_weights(self, ctx: PassContext, source: ArtifactRef, config: ExportPt2Config) -> PassResult:
        import torch

        from worker.data import sample_tensors
        from worker.torch_models import export_open_batch, module_from_state_dict

        module = module_from_state_dict(source)
        example = sample_tensors(ctx.input_spec, batch=2)
        program, dynamic = export_open_batch(module, ctx.input_spec, ctx.log) if config.dynamic_batch else (None, False)
        if program is None:
            example = sample_tensors(ctx.input_spec)
            try:
                program = torch.export.export(module, example)
            except Exception as exc:  # torch.export raises several types for unsupported code
                raise PassError(f"torch.export failed: {str(exc).splitlines()[0]}", code="export_failed") from exc
        out = ctx.work_dir / "model.pt2"
        torch.export.save(program, str(out))
        with torch.no_grad():
            want = module(*example)
            got = torch.export.load(str(out)).module()(*example)
        error = float((want - got).abs().max())
        if error > 1e-4 * max(1.0, float(want.abs().max())):
            raise PassError(
                f"the exported program disagrees with the model (max error {error:.3g})", code="export_mismatch"
            )
        return PassResult(
            artifact=out, format=EXPORTED_PROGRAM, metrics={"dynamic_batch": dynamic, "max_abs_error": error}
        )
