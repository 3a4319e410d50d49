"""prune_structured: remove whole filters/channels so the result is a smaller dense model.

Dependency-aware through torch-pruning's DependencyGraph: residual additions, concatenations,
depthwise and grouped convolutions, squeeze-excite blocks and the classifier stay consistent.
The step takes every model format (worker.trainable): an ONNX or .pt2 upload is pruned as a graph
(worker.graph_pruning protects the layers whose channels the graph hard-codes, and the input and
output layers) and written back in its own format with its own input/output names and axes; a
torchvision state_dict keeps its first convolution and classifier. Channel counts stay multiples of
round_to (8 by default: what vector units and GPU kernels tile by). The channel ratio that reaches the
target (a fraction of parameters or MACs removed) is found by a few trials on copies of the model.
"""

from __future__ import annotations

from core.errors import PassError
from core.formats import STATE_DICT
from core.steps.prune_structured import PruneStructuredConfig, PruneStructuredSpec
from worker.graph_pruning import check_pruned
from worker.latency_probe import LatencyProbe
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult
from worker.pruning import measure, protected_modules


def _importance(name: str):
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "taylor": lambda: tp.importance.TaylorImportance(),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
    }[name]()


# Trials of the channel ratio; the latency target is met within LATENCY_TOLERANCE of the goal (relative):
# the promise is +-10% of the ratio as measured on the worker, and the step aims at half of that.
MAX_TRIALS = 6
LATENCY_TOLERANCE = 0.05


class PruneStructured(PruneStructuredSpec, Pass):
    def _prune(self, module, example, config: PruneStructuredConfig, channel_ratio: float, ctx: PassContext, ignored):
        import torch_pruning as tp

        importance = _importance(config.importance)
        pruner = tp.pruner.MetaPruner(
            module,
            example,
            importance=importance,
            pruning_ratio=channel_ratio,
            global_pruning=config.global_pruning,
            iterative_steps=config.iterative_steps,
            ignored_layers=ignored,
            round_to=config.round_to if config.round_to > 1 else None,
        )
        for _ in range(config.iterative_steps):
            if config.importance == "taylor":
                self._taylor_gradients(module, ctx)
            pruner.step()
            module.zero_grad(set_to_none=True)
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
            with torch.enable_grad():
                out = module(torch.from_numpy(x))
                outs = list(out) if isinstance(out, (tuple, list)) else [out]
                if len(outs) == 1 and outs[0].dim() == 2:
                    # Label-free: the classifier's own confidence as the loss.
                    loss = torch.nn.functional.cross_entropy(outs[0], outs[0].argmax(1))
                else:
                    # Dense outputs (detectors, maps): how much each channel moves the outputs' energy.
                    loss = sum(o.float().pow(2).mean() for o in outs)
                loss.backward()

    def _protected(self, trainable, example, config: PruneStructuredConfig) -> dict:
        """{module name: why it keeps its output channels}."""
        from worker.graph_pruning import protected_layers

        if trainable.format == STATE_DICT:
            modules = {id(m): name for name, m in trainable.module.named_modules()}
            chosen = protected_modules(trainable.module, config.protect)
            return {modules[id(m)]: "named by the user" if config.protect else "input or output layer" for m in chosen}
        return protected_layers(trainable.module, example, config.protect, trainable.aliases)

    def _search(self, ctx, original, example, config: PruneStructuredConfig, ignored: list[str], fraction_of, want):
        """The channel ratio whose pruned model keeps ``goal`` of what ``fraction_of(module)`` measures
        (parameters, MACs or latency, as a fraction of the original's), by a few trials on copies: the
        measure shrinks about as (1 - ratio)^2, and each trial refits that exponent. (module, ratio,
        rounds): every trial's measures, in order."""
        import copy
        import math

        goal = self._goal(config)
        ratio, best, rounds = 1 - math.sqrt(goal), None, []
        for attempt in range(MAX_TRIALS):
            ctx.check_cancelled()
            candidate = copy.deepcopy(original)
            modules = dict(candidate.named_modules())
            try:
                candidate = self._prune(candidate, example, config, ratio, ctx, [modules[n] for n in ignored])
            except (RuntimeError, ValueError, IndexError) as exc:  # the graph could not be pruned consistently
                raise PassError(
                    f"structured pruning failed: {str(exc).splitlines()[0]}", code="pruning_failed"
                ) from exc
            check_pruned(candidate, example, want)  # before anything measures it: a clear pruning_failed
            fraction, record = fraction_of(candidate)
            rounds.append({"round": attempt + 1, "channel_ratio": round(ratio, 4), **record})
            if best is None or abs(fraction - goal) < abs(best[2] - goal):
                best = (candidate, ratio, fraction)
            ctx.report_progress((attempt + 1) / MAX_TRIALS)
            if abs(fraction - goal) <= self._tolerance(config) * goal:
                break
            if fraction >= 1:  # not faster (noise, or a model too small to gain): prune harder, never the same
                ratio = min(0.95, ratio * 1.5 + 0.05)
                continue
            exponent = math.log(fraction) / math.log(1 - ratio) if 0 < fraction and 0 < ratio < 1 else 2.0
            ratio = min(0.95, max(0.01, 1 - goal ** (1 / max(exponent, 0.5))))
        assert best is not None
        if abs(best[2] - goal) > self._tolerance(config) * goal:
            ctx.log.warning(
                "pruning reached %.3f of the %s, not %.3f (channel counts move in steps of round_to=%d)",
                best[2],
                self._measure_name(config),
                goal,
                config.round_to,
            )
        return best[0], best[1], rounds

    @staticmethod
    def _goal(config: PruneStructuredConfig) -> float:
        return config.target_latency_ratio if config.target_latency_ratio is not None else 1 - config.target_ratio

    @staticmethod
    def _tolerance(config: PruneStructuredConfig) -> float:
        """Relative to the goal: the latency a worker measures is noisier than a count of parameters."""
        if config.target_latency_ratio is not None:
            return LATENCY_TOLERANCE
        return config.tolerance / (1 - config.target_ratio)

    @staticmethod
    def _measure_name(config: PruneStructuredConfig) -> str:
        return "latency" if config.target_latency_ratio is not None else config.target

    def _count_fraction(self, config: PruneStructuredConfig, example, macs0: int, params0: int):
        def fraction_of(candidate):
            macs, params = measure(candidate, example)
            fraction = params / params0 if config.target == "params" else macs / macs0
            return fraction, {"parameters": params, "macs": macs}

        return fraction_of

    def run(self, ctx: PassContext, source: ArtifactRef, config: PruneStructuredConfig) -> PassResult:
        from worker.data import job_feeds, sample_tensors
        from worker.trainable import check_round_trip, check_saved, load_trainable, outputs_of, save_trainable

        trainable = load_trainable(source, ctx)
        round_trip = check_round_trip(trainable, source, ctx, job_feeds(ctx))
        original = trainable.module
        example = sample_tensors(ctx.input_spec)
        want_shapes = [tuple(o.shape) for o in outputs_of(original, example)]
        protected = self._protected(trainable, example, config)
        macs0, params0 = measure(original, example)
        latency = None
        if config.target_latency_ratio is not None:
            latency = LatencyProbe(trainable, ctx, config.latency_runtime, source)
            fraction_of = latency.fraction_of(example)
        else:
            fraction_of = self._count_fraction(config, example, macs0, params0)
        try:
            module, ratio, rounds = self._search(
                ctx, original, example, config, sorted(protected), fraction_of, want_shapes
            )
        finally:
            if latency is not None:
                latency.close()
        module.eval()
        check_pruned(module, example, want_shapes)
        macs, params = measure(module, example)
        trainable.module = module
        out = save_trainable(trainable, ctx, "model.pruned")
        export_error = check_saved(trainable, out, ctx)
        metrics = {
            "parameters_before": params0,
            "parameters_after": params,
            "parameters_ratio": params / params0,
            "macs_before": macs0,
            "macs_after": macs,
            "macs_ratio": macs / macs0,
            "channel_ratio": ratio,
            "round_to": config.round_to,
            "importance": config.importance,
            "global_pruning": config.global_pruning,
            "target": self._measure_name(config),
            "goal": self._goal(config),
            "rounds": rounds,
            "protected": protected,
            "conversion_error": round_trip,
            "export_error": export_error,
            "size_bytes_before": source.path.stat().st_size,
            "size_bytes_after": out.stat().st_size,
        }
        if latency is not None:
            metrics.update(latency.summary(rounds, ratio))
        return PassResult(artifact=out, format=trainable.format, meta=dict(source.meta, pruned=True), metrics=metrics)
