"""export_pt2: a PyTorch model made of weights (a torchvision state_dict, pruned or distilled)
into a whole torch.export ExportedProgram (.pt2) that loads anywhere with torch.export.load,
without torchvision or this service's code, with an open batch axis where the graph allows."""

from __future__ import annotations

from core.errors import PassError
from core.formats import EXPORTED_PROGRAM
from core.steps.export_pt2 import ExportPt2Config, ExportPt2Spec
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult


class ExportPt2(ExportPt2Spec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: ExportPt2Config) -> PassResult:
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
