"""export_onnx: PyTorch (.pt2 ExportedProgram, TorchScript, or a torchvision state_dict) to ONNX; ONNX uploads are
simplified. A batch axis left fixed (an upload exported at batch 1) is opened where the graph allows. The result is
checked against the original on sample inputs before it is kept."""

from __future__ import annotations

import shutil

from core.errors import PassError
from core.formats import EXPORTED_PROGRAM, ONNX, STATE_DICT, TORCHSCRIPT
from core.steps.export_onnx import ExportOnnxConfig, ExportOnnxSpec
from worker.data import job_feeds
from worker.onnx_graph import constants_to_initializers, graph_io_names, input_batch_dims, rename_io, with_open_batch
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult


def _relative_error(reference, candidate) -> float:
    import numpy as np

    worst = 0.0
    for ref, out in zip(reference, candidate, strict=True):
        if ref.shape != out.shape:
            return float("inf")
        scale = max(float(np.abs(ref).max()), 1e-6)
        worst = max(worst, float(np.abs(ref.astype(np.float64) - out).max()) / scale)
    return worst


class ExportOnnx(ExportOnnxSpec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: ExportOnnxConfig) -> PassResult:
        import onnx

        from worker.runtime import load_runner

        out = ctx.work_dir / "model.onnx"
        metrics: dict = {"opset": config.opset}
        if source.format == ONNX:
            shutil.copyfile(source.path, out)
        elif source.format == TORCHSCRIPT:
            self._from_torchscript(ctx, source, config, out)
        elif source.format in (EXPORTED_PROGRAM, STATE_DICT):
            self._from_exported_program(ctx, source, config, out)
        ctx.report_progress(0.5)

        model = onnx.load(str(out))
        if source.format != ONNX:
            # A model exported from a graph the service made (a pruned ONNX upload's .pt2) answers to the
            # upload's own input and output names, as the job's feeds and the user's code call them.
            outputs = graph_io_names(ctx.original.path)[1] if ctx.original.format == ONNX else []
            metrics["renamed_io"] = rename_io(model, [s["name"] for s in ctx.input_spec], outputs)
        metrics["opset"] = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        metrics["constants_to_initializers"] = constants_to_initializers(model)
        metrics["nodes_before_simplify"] = len(model.graph.node)
        feeds = job_feeds(ctx)
        reference = load_runner(source, threads=ctx.threads)(feeds)
        error = self._finish(ctx, source, config, model, out, metrics, feeds, reference, simplify=config.simplify)
        if not error <= config.tolerance and config.simplify:
            # onnxslim's fusions can move a deep net's outputs past the tolerance (a real text detector did,
            # 2.5e-3): the graph as exported is the answer then, and the step says so.
            plain = self._finish(
                ctx,
                source,
                config,
                onnx.load(str(ctx.work_dir / "unsimplified.onnx")),
                out,
                metrics,
                feeds,
                reference,
                simplify=False,
            )
            if plain <= config.tolerance:
                metrics["warning"] = (
                    f"the simplified graph differed from the original by {error:.3g} (relative, > "
                    f"{config.tolerance}); kept the graph without onnxslim ({plain:.3g})"
                )
                ctx.log.warning(metrics["warning"])
                metrics["simplified"] = False
            error = plain
        metrics["max_relative_error"] = error
        if not error <= config.tolerance:
            raise PassError(
                f"the ONNX model disagrees with the original (relative error {error:.3g} > "
                f"{config.tolerance}); an operator may be exported wrongly",
                code="export_mismatch",
                details={"max_relative_error": error},
            )
        return PassResult(artifact=out, format=ONNX, metrics=metrics)

    def _finish(self, ctx, source, config, model, out, metrics: dict, feeds, reference, *, simplify: bool) -> float:
        """Simplify (or not), open the batch axis, save, check the graph; its relative error against the
        original on ``feeds``."""
        import onnx

        from worker.runtime import load_runner

        if simplify:
            import onnxslim

            onnx.save(model, str(ctx.work_dir / "unsimplified.onnx"))
            try:
                model = onnxslim.slim(model)
            except Exception as exc:  # onnxslim raises bare Exceptions on graphs it cannot handle
                ctx.log.warning("onnxslim could not simplify the graph, keeping it as is: %s", exc)
        # After simplifying: onnxslim folds a fixed-batch Shape->Reshape chain into the constant opened here.
        model, batch_axis = self._batch_axis(ctx, source, config, model)
        metrics.update(batch_axis)
        onnx.save(model, str(out))
        metrics["nodes"] = len(model.graph.node)
        try:
            onnx.checker.check_model(str(out))
        except onnx.checker.ValidationError as exc:
            raise PassError(f"the exported ONNX model is invalid: {exc}", code="invalid_onnx") from exc
        exported = load_runner(ArtifactRef("model.onnx", ONNX, out), threads=ctx.threads)(feeds)
        return _relative_error(reference, exported)

    def _batch_axis(self, ctx, source, config, model) -> tuple:
        """(model, {"batch_axis": "dynamic" | "fixed", "batch_axis_reason": why it stays fixed})."""
        import onnx

        dims = input_batch_dims(model)
        if dims and all(d is None for d in dims):
            return model, {"batch_axis": "dynamic"}

        def fixed(reason: str) -> tuple:
            ctx.log.warning("keeping a fixed batch size: %s", reason)
            return model, {"batch_axis": "fixed", "batch_axis_reason": reason}

        if not dims or None in dims or len(set(dims)) > 1:
            return fixed(f"the inputs' first dimensions ({dims}) are not one batch axis")
        if not config.dynamic_batch:
            return fixed("dynamic_batch is off")
        batch = dims[0]
        candidate = with_open_batch(model, batch)
        path = ctx.work_dir / "open_batch.onnx"
        onnx.save(candidate, str(path))
        problem = self._runs_at_any_batch(ctx, source, config, path, batch)
        path.unlink()
        if problem:
            return fixed(f"the model's batch axis is fixed at {batch}: {problem}")
        return candidate, {"batch_axis": "dynamic"}

    def _runs_at_any_batch(self, ctx, source, config, path, batch: int) -> str | None:
        """Why the opened graph is wrong (None when it is not): at a larger batch, at 1 and at one
        more than the fixed batch (what evaluate's last partial batch and benchmark use), it must run
        and give every sample the original's output for that sample."""
        from worker.data import sample_feeds
        from worker.runtime import load_runner, run_in_fixed_batches

        reference = load_runner(source, threads=ctx.threads)
        opened = load_runner(ArtifactRef("open_batch.onnx", ONNX, path), threads=ctx.threads)
        for n in dict.fromkeys((3 * batch, 1, batch + 1)):
            feeds = sample_feeds(ctx.input_spec, batch=n, seed=1)
            want = run_in_fixed_batches(reference, feeds, batch)
            try:
                got = opened(feeds)
            except Exception as exc:  # onnxruntime refuses the graph or the shapes with its own error types
                return f"with the batch opened the graph does not run at batch {n} ({str(exc).splitlines()[0][:200]})"
            error = _relative_error(want, got)
            if not error <= config.tolerance:
                return (
                    f"with the batch opened, batch {n} does not give each sample its batch-{batch} output "
                    f"(relative error {error:.3g}); the graph mixes samples or hard-codes the batch"
                )
        return None

    def _from_torchscript(self, ctx, source, config, out) -> None:
        import torch

        from worker.data import sample_feeds

        module = torch.jit.load(str(source.path), map_location="cpu").eval()
        feeds = sample_feeds(ctx.input_spec)
        names = list(feeds)
        args = tuple(torch.from_numpy(v) for v in feeds.values())
        dynamic_axes = {n: {0: "batch"} for n in names} if config.dynamic_batch else None
        try:
            # TorchScript can only go through the TorchScript-based exporter.
            torch.onnx.export(
                module,
                args,
                str(out),
                dynamo=False,
                opset_version=config.opset,
                input_names=names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        except Exception as exc:  # the exporter raises many types for unsupported operators
            raise PassError(f"ONNX export of the TorchScript model failed: {exc}", code="export_failed") from exc

    def _from_exported_program(self, ctx, source, config, out) -> None:
        import torch

        from worker.data import sample_tensors
        from worker.torch_models import export_open_batch, module_from_state_dict

        if source.format == STATE_DICT:
            module = module_from_state_dict(source)
            program = None
        else:
            # The upload fixes the batch (users often export with batch 1); its unflattened
            # module guards the traced shapes, so it is re-exported without them.
            program = torch.export.load(str(source.path))
            module = program.module(check_guards=False)
        if config.dynamic_batch:
            opened, _ = export_open_batch(module, ctx.input_spec, ctx.log)
            program = opened or program
        if program is None:
            program = torch.export.export(module, sample_tensors(ctx.input_spec))
        try:
            torch.onnx.export(
                program, (), str(out), dynamo=True, opset_version=max(config.opset, 18), optimize=True, verbose=False
            )
        except Exception as exc:
            raise PassError(f"ONNX export of the ExportedProgram failed: {exc}", code="export_failed") from exc
        if config.opset < 18:
            # The torch.export-based exporter writes opset 18+; ONNX's version converter brings
            # most graphs down, but not all (ReduceMean's axes, say): then opset 18 is kept.
            import onnx
            from onnx import version_converter

            try:
                model = version_converter.convert_version(onnx.load(str(out)), config.opset)
                onnx.checker.check_model(model)
            except Exception as exc:  # the converter raises RuntimeError, the checker ValidationError
                ctx.log.warning(
                    "kept opset 18: conversion to opset %d failed: %s", config.opset, str(exc).splitlines()[0][:200]
                )
            else:
                onnx.save(model, str(out))
