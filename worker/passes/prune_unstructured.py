"""prune_unstructured: zero individual weights by magnitude (global or per layer), or in the
N:M pattern (2:4) that sparse tensor cores accelerate.

The report is honest: the dense file keeps its size and dense runtimes get no speed-up; what
shrinks is the compressed size (the zeros compress), and 2:4 models can run faster on GPUs
with sparse tensor cores (Ampere and later) through TensorRT.
"""

from __future__ import annotations

from core.formats import STATE_DICT
from core.steps.prune_unstructured import PruneUnstructuredConfig, PruneUnstructuredSpec
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult


def _prunable(trainable, protect: list[str] | None, example) -> list:
    """(name, layer) for every convolution and linear left dense by nothing: a state_dict keeps its first
    convolution and classifier, a graph its input and output layers (worker.graph_pruning), and any
    layer named in protect."""
    import torch

    from worker.graph_pruning import INPUT_LAYER, NAMED, OUTPUT_LAYER, protected_layers
    from worker.pruning import protected_modules

    module = trainable.module
    if trainable.format == STATE_DICT:
        kept = {id(m) for m in protected_modules(module, protect)}
    else:
        why = protected_layers(module, example, protect, trainable.aliases)
        modules = dict(module.named_modules())
        # The reasons structured pruning has (hard-coded channel counts) do not concern zeroed weights.
        kept = {id(modules[n]) for n, reason in why.items() if reason in (INPUT_LAYER, OUTPUT_LAYER, NAMED)}
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) and id(m) not in kept
    ]


def _threshold(magnitudes, sparsity: float):
    """The magnitude at or below which ``sparsity`` of the weights fall."""
    k = int(sparsity * magnitudes.numel())
    return magnitudes.kthvalue(k).values if k > 0 else magnitudes.min() - 1


def _two_of_four(weight):
    """Keep the 2 largest of every 4 consecutive input weights."""
    import torch

    w = weight.detach()
    flat = w.reshape(w.shape[0], -1)
    cols = flat.shape[1] - flat.shape[1] % 4
    groups = flat[:, :cols].reshape(flat.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    full = torch.ones_like(flat, dtype=torch.bool)
    full[:, :cols] = mask.reshape(flat.shape[0], cols)
    return full.reshape(w.shape)


class PruneUnstructured(PruneUnstructuredSpec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: PruneUnstructuredConfig) -> PassResult:
        import gzip
        import shutil

        import torch

        from worker.data import job_feeds, sample_tensors
        from worker.trainable import check_round_trip, check_saved, load_trainable, save_trainable

        trainable = load_trainable(source, ctx)
        conversion_error = check_round_trip(trainable, source, ctx, job_feeds(ctx))
        module = trainable.module
        layers = _prunable(trainable, config.protect, sample_tensors(ctx.input_spec))
        with torch.no_grad():
            if config.pattern == "2:4":
                masks = {name: _two_of_four(m.weight) for name, m in layers}
            elif config.scope == "global":
                threshold = _threshold(
                    torch.cat([m.weight.detach().abs().flatten() for _, m in layers]), config.sparsity
                )
                masks = {name: m.weight.detach().abs() > threshold for name, m in layers}
            else:
                masks = {
                    name: m.weight.detach().abs() > _threshold(m.weight.detach().abs().flatten(), config.sparsity)
                    for name, m in layers
                }
            for name, m in layers:
                m.weight.mul_(masks[name])
        per_layer = {name: round(1 - float(masks[name].float().mean()), 4) for name, _ in layers}
        total = sum(p.numel() for p in module.parameters())
        zeros = sum(int((p == 0).sum()) for p in module.parameters())
        out = save_trainable(trainable, ctx, "model.sparse")
        export_error = check_saved(trainable, out, ctx)
        compressed = ctx.work_dir / f"{out.name}.gz"
        with open(out, "rb") as src, gzip.open(compressed, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        dense_gz = ctx.work_dir / "original.gz"
        with open(source.path, "rb") as src, gzip.open(dense_gz, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        return PassResult(
            artifact=out,
            format=trainable.format,
            meta=dict(source.meta, sparsity=zeros / total, pattern=config.pattern),
            metrics={
                "sparsity": zeros / total,
                "sparsity_per_layer": per_layer,
                "pattern": config.pattern,
                "scope": config.scope,
                "conversion_error": conversion_error,
                "export_error": export_error,
                "size_bytes": out.stat().st_size,
                "gzip_bytes": compressed.stat().st_size,
                "original_gzip_bytes": dense_gz.stat().st_size,
                "note": "dense runtimes (ONNX Runtime, torch on CPU) run zeros at full cost: no speed-up; "
                "the file only shrinks compressed. 2:4 sparsity can be accelerated by TensorRT on GPUs "
                "with sparse tensor cores.",
            },
        )
