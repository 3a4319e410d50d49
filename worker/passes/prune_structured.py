"""prune_structured: remove whole filters/channels so the result is a smaller dense model.

Dependency-aware through torch-pruning's DependencyGraph: residual additions, concatenations,
depthwise and grouped convolutions, squeeze-excite blocks and the classifier stay consistent.
The channel ratio that reaches the target (a fraction of parameters or MACs removed) is found
by a few trials on copies of the model (parameters shrink about as (1 - ratio)^2, and each trial
refits that exponent); the first convolution and the classifier are protected by default.
"""

from __future__ import annotations

from core.errors import PassError
from core.formats import STATE_DICT
from core.steps.prune_structured import PruneStructuredConfig, PruneStructuredSpec
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult
from worker.pruning import protected_modules


def _importance(name: str):
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "taylor": lambda: tp.importance.TaylorImportance(),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
    }[name]()


def measure(module, example) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(module, example)
    return int(macs), int(params)


class PruneStructured(PruneStructuredSpec, Pass):
    def _prune(self, module, example, config: PruneStructuredConfig, channel_ratio: float, ctx: PassContext):
        import torch
        import torch_pruning as tp

        importance = _importance(config.importance)
        pruner = tp.pruner.MetaPruner(
            module,
            example,
            importance=importance,
            pruning_ratio=channel_ratio,
            global_pruning=config.global_pruning,
            iterative_steps=config.iterative_steps,
            ignored_layers=protected_modules(module, config.protect),
        )
        for _ in range(config.iterative_steps):
            if config.importance == "taylor":
                self._taylor_gradients(module, ctx)
            pruner.step()
            module.zero_grad(set_to_none=True)
        with torch.no_grad():
            module(*example)
        return module

    def _taylor_gradients(self, module, ctx: PassContext) -> None:
        import torch

        from worker.data import iter_batches

        if ctx.calibration_dataset is None:
            raise PassError(
                "taylor importance needs a calibration dataset (it uses gradients)", code="calibration_dataset_required"
            )
        module.zero_grad(set_to_none=True)
        for x, _ in iter_batches(
            ctx.calibration_dataset, ctx.input_spec[0], ctx.preprocessing, batch_size=16, limit=64
        ):
            out = module(torch.from_numpy(x))
            # Label-free: the model's own confidence as the loss.
            torch.nn.functional.cross_entropy(out, out.argmax(1)).backward()

    def run(self, ctx: PassContext, source: ArtifactRef, config: PruneStructuredConfig) -> PassResult:
        import copy

        from worker.data import sample_tensors
        from worker.torch_models import module_from_state_dict, save_module

        original = module_from_state_dict(source)
        example = sample_tensors(ctx.input_spec)
        macs0, params0 = measure(original, example)
        base = params0 if config.target == "params" else macs0
        wanted = base * (1 - config.target_ratio)

        import math

        goal = 1 - config.target_ratio
        ratio, best, trials = 1 - math.sqrt(goal), None, 6
        for attempt in range(trials):
            ctx.check_cancelled()
            try:
                candidate = self._prune(copy.deepcopy(original), example, config, ratio, ctx)
            except (RuntimeError, ValueError) as exc:  # the graph could not be pruned consistently
                raise PassError(
                    f"structured pruning failed: {str(exc).splitlines()[0]}", code="pruning_failed"
                ) from exc
            macs, params = measure(candidate, example)
            remaining = params if config.target == "params" else macs
            if best is None or abs(remaining - wanted) < abs(best[1] - wanted):
                best = (candidate, remaining, ratio, macs, params)
            ctx.report_progress((attempt + 1) / trials)
            if abs(remaining - wanted) <= config.tolerance * base:
                break
            fraction = remaining / base
            exponent = math.log(fraction) / math.log(1 - ratio) if 0 < fraction < 1 and 0 < ratio < 1 else 2.0
            ratio = min(0.95, max(0.01, 1 - goal ** (1 / max(exponent, 0.5))))
        module, remaining, ratio, macs, params = best
        if abs(remaining - wanted) > config.tolerance * base:
            ctx.log.warning(
                "pruning reached %.3f of the %s, not %.3f", remaining / base, config.target, 1 - config.target_ratio
            )
        out = ctx.work_dir / "model.pruned.pt"
        module.eval()
        save_module(module, out)
        return PassResult(
            artifact=out,
            format=STATE_DICT,
            meta=dict(source.meta, pruned=True),
            metrics={
                "parameters_before": params0,
                "parameters_after": params,
                "parameters_ratio": params / params0,
                "macs_before": macs0,
                "macs_after": macs,
                "macs_ratio": macs / macs0,
                "channel_ratio": ratio,
                "importance": config.importance,
                "global_pruning": config.global_pruning,
                "size_bytes_before": source.path.stat().st_size,
                "size_bytes_after": out.stat().st_size,
            },
        )
