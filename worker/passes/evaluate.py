"""evaluate: accuracy (top-1/top-5, when the dataset has labels) and fidelity to the original
(top-1 agreement, cosine similarity, SNR in dB, and the worst output channel's SNR) for the
original and every artifact so far, streamed batch by batch."""

from __future__ import annotations

from pydantic import Field

from core.errors import PassError
from worker.passes.base import (
    MEASURABLE_FORMATS,
    NEEDS_DATASET,
    ArtifactRef,
    Pass,
    PassConfig,
    PassContext,
    PassResult,
)


class EvaluateConfig(PassConfig):
    max_samples: int = Field(default=1000, ge=1, le=1_000_000)
    batch_size: int = Field(default=32, ge=1, le=1024)


def snr_db(reference, got) -> float:
    """10·log10(signal / noise) of ``got`` against ``reference`` (inf when they agree exactly)."""
    import numpy as np

    ref = np.asarray(reference, np.float64)
    noise = float(((np.asarray(got, np.float64).reshape(ref.shape) - ref) ** 2).sum())
    return float("inf") if noise == 0 else float(10 * np.log10(max(float((ref**2).sum()), 1e-30) / noise))


class Tally:
    """Running sums, so evaluation memory does not grow with the dataset."""

    def __init__(self) -> None:
        self.n = 0
        self.top1 = self.top5 = self.agree = 0
        self.cos_sum = 0.0
        self.signal = self.noise = 0.0
        self.chan_signal = None
        self.chan_noise = None

    def add(self, logits, reference, labels) -> None:
        import numpy as np

        out = logits.reshape(len(logits), -1).astype(np.float64)
        ref = reference.reshape(len(reference), -1).astype(np.float64)
        self.n += len(out)
        if labels is not None and out.shape[1] > 1:
            order = np.argsort(-out, axis=1)
            self.top1 += int((order[:, 0] == labels).sum())
            self.top5 += int((order[:, :5] == labels[:, None]).any(axis=1).sum())
        self.agree += int((out.argmax(1) == ref.argmax(1)).sum())
        denom = np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
        self.cos_sum += float(np.where(denom > 0, (out * ref).sum(1) / np.maximum(denom, 1e-30), 1.0).sum())
        err = out - ref
        self.signal += float((ref**2).sum())
        self.noise += float((err**2).sum())
        # Per output channel (dim 1 of the first output): a tail of one output can collapse
        # under INT8 while the whole tensor still looks fine.
        c_ref = reference.reshape(len(reference), reference.shape[1] if reference.ndim > 1 else 1, -1)
        c_err = logits.reshape(c_ref.shape) - c_ref
        sig, noi = (c_ref.astype(np.float64) ** 2).sum((0, 2)), (c_err.astype(np.float64) ** 2).sum((0, 2))
        self.chan_signal = sig if self.chan_signal is None else self.chan_signal + sig
        self.chan_noise = noi if self.chan_noise is None else self.chan_noise + noi

    def result(self, labeled: bool) -> dict:
        import numpy as np

        def snr(s, n):
            return float(10 * np.log10(s / n)) if n > 0 and s > 0 else float("inf")

        out = {
            "samples": self.n,
            "fidelity": {
                "top1_agreement": self.agree / self.n,
                "cosine": self.cos_sum / self.n,
                "snr_db": snr(self.signal, self.noise),
                "worst_channel_snr_db": min(snr(s, n) for s, n in zip(self.chan_signal, self.chan_noise, strict=True)),
            },
        }
        if labeled:
            out["accuracy"] = {"top1": self.top1 / self.n, "top5": self.top5 / self.n}
        return out


class Evaluate(Pass):
    name = "evaluate"
    description = "Accuracy (with labels) and fidelity to the original of every artifact so far."
    Config = EvaluateConfig
    accepts = MEASURABLE_FORMATS
    produces = None
    needs = frozenset({NEEDS_DATASET})
    version = 2

    def run(self, ctx: PassContext, source: ArtifactRef, config: EvaluateConfig) -> PassResult:
        from worker.data import iter_batches
        from worker.runtime import load_runner

        dataset, used = ctx.evaluation_dataset, "evaluation"
        if dataset is None:
            dataset, used = ctx.calibration_dataset, "calibration"
        if dataset is None:
            raise PassError("evaluate needs an evaluation or calibration dataset", code="dataset_required")
        if len(ctx.input_spec) != 1:
            raise PassError("evaluate feeds single-input models only", code="unsupported_model")
        spec = ctx.input_spec[0]
        fixed = int(spec["shape"][0])
        batch_size = config.batch_size - config.batch_size % fixed or fixed
        from worker.runtime import split_runnable

        variants, skipped = split_runnable([ctx.original, *ctx.artifacts])
        runners = [_BatchAdapter(load_runner(v, threads=ctx.threads), spec["name"], fixed) for v in variants]
        tallies = [Tally() for _ in variants]
        # Every sample counts: the last batch runs at its own size (or padded, for a fixed-batch model).
        total = min(config.max_samples, dataset.num_samples)
        if total == 0:
            raise PassError(f"the {used} dataset has no samples", code="empty_dataset")
        seen = 0
        for x, labels in iter_batches(dataset, spec, ctx.preprocessing, batch_size=batch_size, limit=total):
            ctx.check_cancelled()
            reference = None
            for runner, tally in zip(runners, tallies, strict=True):
                out = runner(x)
                if labels is not None and out.ndim >= 2 and labels.size and labels.max() >= out.shape[1]:
                    raise PassError(
                        f"the dataset has labels up to {int(labels.max())} but the model scores "
                        f"{out.shape[1]} classes",
                        code="classes_mismatch",
                    )
                reference = out if reference is None else reference
                tally.add(out, reference, labels)
            seen += len(x)
            ctx.report_progress(seen / total)
        return PassResult(
            metrics={
                "dataset": used,
                "num_samples": seen,
                "results": [
                    {"artifact": v.name, "step": v.step, **t.result(dataset.labeled)}
                    for v, t in zip(variants, tallies, strict=True)
                ] + [{"artifact": v.name, "skipped": reason} for v, reason in skipped],
            }
        )


class _BatchAdapter:
    """Feeds a batch to a variant, split into the upload's fixed batch size when it refuses
    another size (exports with batch fixed at 1 are common)."""

    def __init__(self, runner, name: str, fixed_batch: int) -> None:
        self.runner, self.name, self.fixed_batch = runner, name, max(fixed_batch, 1)
        self.split = False

    def __call__(self, x):
        from worker.runtime import run_in_fixed_batches

        if not self.split:
            try:
                return self.runner({self.name: x})[0]
            except Exception:  # runtimes raise their own types for a shape they refuse
                if len(x) == self.fixed_batch:
                    raise
                self.split = True
        return run_in_fixed_batches(self.runner, {self.name: x}, self.fixed_batch)[0]
