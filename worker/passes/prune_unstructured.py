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


def _prunable(module, protect: list[str] | None):
    import torch

    from worker.pruning import protected_modules

    kept = {id(m) for m in protected_modules(module, protect)}
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and id(m) not in kept
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

        from worker.torch_models import module_from_state_dict, save_module

        module = module_from_state_dict(source)
        layers = _prunable(module, config.protect)
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
        out = ctx.work_dir / "model.sparse.pt"
        save_module(module.eval(), out)
        compressed = ctx.work_dir / "model.sparse.pt.gz"
        with open(out, "rb") as src, gzip.open(compressed, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        dense_gz = ctx.work_dir / "original.pt.gz"
        with open(source.path, "rb") as src, gzip.open(dense_gz, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        return PassResult(
            artifact=out,
            format=STATE_DICT,
            meta=dict(source.meta, sparsity=zeros / total, pattern=config.pattern),
            metrics={
                "sparsity": zeros / total,
                "sparsity_per_layer": per_layer,
                "pattern": config.pattern,
                "scope": config.scope,
                "size_bytes": out.stat().st_size,
                "gzip_bytes": compressed.stat().st_size,
                "original_gzip_bytes": dense_gz.stat().st_size,
                "note": "dense runtimes (ONNX Runtime, torch on CPU) run zeros at full cost: no speed-up; "
                "the file only shrinks compressed. 2:4 sparsity can be accelerated by TensorRT on GPUs "
                "with sparse tensor cores.",
            },
        )
