"""Which artifact to ship: every artifact's verdict and the job's recommendation, from the
benchmark and evaluate steps' metrics. Pure functions over plain facts (no database, no HTTP):
core.views loads the rows and hands them over.

The rules:

- The recommendation is the fastest artifact measured on the worker (p50 at batch 1) that meets
  the job's tolerance on the task's metric (evaluate's ``metric.drop`` <= ``max_accuracy_drop``).
  The original competes too: when it wins, nothing is recommended and the reason says why in one
  line. Ties within 2% of p50 go to the smaller file, so an INT8 model as fast as the FP32 export
  wins by its size.
- An artifact that misses the tolerance is never recommended, however fast; nor is one that misses
  its metric's floor (``metric["floor"]["met"] is False``: a raw-head detector whose worst class
  channel falls below the SNR floor, whatever its F1).
- Without an evaluate step, accuracy is unverified: only lossless float conversions (see
  ``step_keeps_float``) can be recommended; everything else is not_measured.
- A float artifact is a reference for speed: an artifact slower at batch 1 than the fastest float
  model of the job (the original, or a lossless conversion) by more than the 2% tie is
  slower_than_float, whatever its accuracy; a float model that misses a constraint is no reference.
- The job's constraints (max_latency_ms at batch 1, max_size_mb) bind like the tolerance: an
  artifact within the tolerance that misses one is misses_constraint, and the original competes
  only if it meets them. When nothing meets them the recommendation is null and names the closest
  candidate within the tolerance (the least over its worst constraint) with what it misses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from core.formats import DEPLOY_FORMATS
from core.metric_names import metric_label
from core.models import JobStatus
from core.schemas import (
    FailedCandidate,
    LeftOut,
    Recommendation,
    RecommendationMetrics,
    RecommendedMetric,
    ReportEntry,
    ReportRead,
    Verdict,
)
from core.steps.registry import SPECS
from core.targets import LOSSLESS_AT_FP32, LOSSLESS_STEPS, STAND_IN_NOTES, candidate_label
from core.tasks import DEFAULT_TOLERANCE

# Two p50s this close are one speed: the smaller file wins. Timings on a shared worker move by
# about this much between interleaved runs.
TIE_FRACTION = 0.02
# A drop computed as 0.99 - 0.98 is 0.010000000000000009: it meets a tolerance of 0.01.
DROP_EPSILON = 1e-9


def step_keeps_float(step: str | None, meta: dict[str, Any] | None) -> bool:
    """Whether a step keeps its source's float32 weights and arithmetic.

    The original (step None), export_onnx and export_pt2 do; compile_gpu, convert_openvino and
    convert_tflite do at precision fp32 only (convert_openvino: FP32 weights and f32 compute asked
    for). Everything else changes what the model computes and must prove it meets the tolerance:
    convert_fp16 (FP16 is not float32), quantize_int8 / quantize_int8_torch, prune_structured /
    prune_unstructured, distill / finetune, and build_tensorrt at any precision (an "fp32" engine
    runs convolutions in TF32 on Ampere and later unless told not to). A step this module does not
    know is a candidate too."""
    if step is None:
        return True
    if step in LOSSLESS_STEPS:
        return True
    if step in LOSSLESS_AT_FP32:
        return (meta or {}).get("precision") == "fp32"
    return False


@dataclass(frozen=True)
class ArtifactFacts:
    """What the report needs of an artifact row (or of the original upload, with step None)."""

    name: str
    step: str | None
    format: str
    size_bytes: int
    meta: dict[str, Any] = field(default_factory=dict)


def lossless_artifacts(artifacts: Sequence[ArtifactFacts]) -> set[str]:
    """The names of the artifacts that compute what the original computes, in float32.

    Steps chain: each takes the last artifact that does not end its branch (a TFLite file, an
    engine or an AOTInductor package), or the original. An export made after pruning or
    distillation is a float file of a changed model: lossless only if every step before it in its
    chain is. ``artifacts`` in step order."""
    chain_lossless = True
    out = set()
    for artifact in artifacts:
        lossless = chain_lossless and step_keeps_float(artifact.step, artifact.meta)
        if lossless:
            out.add(artifact.name)
        spec = SPECS.get(artifact.step or "")
        if artifact.format not in DEPLOY_FORMATS and not (spec is not None and spec.ends_branch):
            chain_lossless = lossless
    return out


@dataclass(frozen=True)
class Candidate:
    """One row of the report as the rules see it."""

    name: str
    step: str | None  # None: the original upload
    size_bytes: int
    p50_ms: float | None  # batch 1 on the worker
    lossless: bool  # keeps the original's float32 arithmetic (lossless_artifacts)
    metric: dict[str, Any] | None = None  # evaluate's {"name", "value", "reference", "drop", ...}
    unbenchmarked: str | None = None  # why p50_ms is None
    throughput: tuple[int, float] | None = None  # (batch, images/s) at the benchmark's largest batch
    unevaluated: str | None = None  # why metric is None


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str


@dataclass(frozen=True)
class Limits:
    """The job's constraints beyond the tolerance (core.schemas.Constraints)."""

    max_latency_ms: float | None = None
    max_size_mb: float | None = None

    @classmethod
    def of(cls, constraints: dict[str, Any] | None) -> Limits:
        c = constraints or {}
        return cls(max_latency_ms=c.get("max_latency_ms"), max_size_mb=c.get("max_size_mb"))

    def __bool__(self) -> bool:
        return self.max_latency_ms is not None or self.max_size_mb is not None

    def misses(self, c: Candidate) -> list[str]:
        """Each constraint ``c`` misses, with its numbers."""
        out = []
        if self.max_latency_ms is not None and c.p50_ms is not None and c.p50_ms > self.max_latency_ms:
            out.append(f"p50 {_ms(c.p50_ms)} > max_latency_ms {self.max_latency_ms:g}")
        if self.max_size_mb is not None and c.size_bytes / 1e6 > self.max_size_mb:
            out.append(f"size {c.size_bytes / 1e6:.3g} MB > max_size_mb {self.max_size_mb:g}")
        return out

    def overshoot(self, c: Candidate) -> float:
        """How far over its worst constraint ``c`` is (1.0: on the limit)."""
        ratios = [1.0]
        if self.max_latency_ms is not None and c.p50_ms is not None:
            ratios.append(c.p50_ms / self.max_latency_ms)
        if self.max_size_mb is not None:
            ratios.append(c.size_bytes / 1e6 / self.max_size_mb)
        return max(ratios)


def _ms(value: float) -> str:
    return f"{value:.3g} ms"


def _timed(c: Candidate) -> float:
    """The batch-1 p50 of a candidate its caller knows was timed (it filtered on ``p50_ms``)."""
    assert c.p50_ms is not None, c.name
    return c.p50_ms


def _rate(c: Candidate) -> float:
    """The images/s of a candidate its caller knows was timed under load (it filtered on ``throughput``)."""
    assert c.throughput is not None, c.name
    return c.throughput[1]


def _drop_text(metric: dict[str, Any]) -> str:
    reference = metric.get("reference")
    versus = f" vs {float(reference):.4f}" if reference is not None else ""
    return f"{metric_label(metric['name'])} {float(metric['value']):.4f}{versus}, drop {float(metric['drop']):.4f}"


def _missed_floor(metric: dict[str, Any] | None) -> dict[str, Any] | None:
    """The metric's floor when the artifact misses it (evaluate writes {"name", "min", "value",
    "met"}), else None."""
    floor = (metric or {}).get("floor")
    return floor if isinstance(floor, dict) and floor.get("met") is False else None


def _floor_text(floor: dict[str, Any], relation: str) -> str:
    unit = " dB" if str(floor.get("name", "")).endswith("_db") else ""
    value = floor.get("value")
    shown = f"{float(value):.1f}{unit}" if isinstance(value, (int, float)) else "not measured"
    return f"{metric_label(str(floor.get('name')))} {shown} {relation} floor {float(floor['min']):g}{unit}"


def _drop_over(metric: dict[str, Any] | None, tolerance: float) -> TypeGuard[dict[str, Any]]:
    return metric is not None and float(metric["drop"]) > tolerance + DROP_EPSILON


def over_tolerance(metric: dict[str, Any] | None, tolerance: float) -> TypeGuard[dict[str, Any]]:
    """Loses more of the task's metric than the tolerance, or misses the metric's floor (the one rule for
    verdicts here and for the INT8 search's gate in the worker)."""
    return _drop_over(metric, tolerance) or _missed_floor(metric) is not None


def _over_reason(metric: dict[str, Any], tolerance: float) -> str:
    parts = []
    if _drop_over(metric, tolerance):
        parts.append(f"{_drop_text(metric)} > tolerance {tolerance:g}")
    floor = _missed_floor(metric)
    if floor is not None:
        parts.append(_floor_text(floor, "<"))
    return "; ".join(parts)


def _meets_reason(metric: dict[str, Any], tolerance: float) -> str:
    text = f"{_drop_text(metric)} <= tolerance {tolerance:g}"
    floor = metric.get("floor")
    if isinstance(floor, dict) and floor.get("met") is True:
        text += f", {_floor_text(floor, '>=')}"
    return text


def recommend(
    candidates: Sequence[Candidate], *, tolerance: float, evaluated: bool, limits: Limits | None = None
) -> tuple[dict[str, Judgement], Recommendation]:
    """Each candidate's verdict (by name) and the recommendation. ``candidates``: the original
    (step None) and every artifact; ``evaluated``: whether the job measured accuracy (it has an
    evaluate step), else accuracy is unverified and only lossless artifacts can be chosen;
    ``limits``: the job's latency and size constraints."""
    limits = limits or Limits()
    original = next((c for c in candidates if c.step is None), None)
    base_p50 = original.p50_ms if original else None

    def usable_accuracy(c: Candidate) -> bool:
        # A lossless conversion needs no measurement to keep the original's accuracy.
        return c.lossless or (evaluated and c.metric is not None)

    # The float references for speed: timed, not broken in a way the evaluation saw, and within the
    # constraints (a float model that misses max_size_mb is no alternative to an INT8 one that meets it).
    floats = [
        c
        for c in candidates
        if c.lossless and c.p50_ms is not None and not over_tolerance(c.metric, tolerance) and not limits.misses(c)
    ]

    judgements: dict[str, Judgement] = {}
    for c in candidates:
        if c.step is None:
            judgements[c.name] = Judgement("original", "the uploaded model: the reference for speed-ups and drops")
            continue
        if over_tolerance(c.metric, tolerance):
            judgements[c.name] = Judgement("over_tolerance", _over_reason(c.metric, tolerance))
            continue
        missing = []
        if c.p50_ms is None:
            missing.append(c.unbenchmarked or "not benchmarked")
        if not usable_accuracy(c):
            missing.append(
                (c.unevaluated or "not evaluated")
                if evaluated
                else "accuracy not measured: the job has no evaluate step"
            )
        if missing:
            judgements[c.name] = Judgement("not_measured", "; ".join(missing))
            continue
        assert c.p50_ms is not None  # else not_measured (above)
        others = [f for f in floats if f.name != c.name]
        fastest = min(others, key=_timed, default=None)
        if fastest is not None and c.p50_ms > _timed(fastest) * (1 + TIE_FRACTION):
            which = "the original" if fastest.step is None else f"the float artifact {fastest.name}"
            judgements[c.name] = Judgement(
                "slower_than_float",
                f"{c.p50_ms / _timed(fastest):.2f}x slower at batch 1 than {which} "
                f"({_ms(c.p50_ms)} vs {_ms(_timed(fastest))} p50)",
            )
            continue
        if c.metric is not None:
            parts = [_meets_reason(c.metric, tolerance)]
        else:
            parts = ["lossless float conversion (accuracy not measured)"]
        if base_p50:
            parts.append(f"{base_p50 / c.p50_ms:.2f}x the original's speed at batch 1")
        missed = limits.misses(c)
        verdict: Verdict = "misses_constraint" if missed else "meets_tolerance"
        judgements[c.name] = Judgement(verdict, "; ".join([*missed, *parts]))

    # The original competes when it meets the constraints: when it wins, nothing is recommended.
    pool = [
        c
        for c in candidates
        if c.p50_ms is not None
        and ((c.step is None and not limits.misses(c)) or judgements[c.name].verdict == "meets_tolerance")
    ]
    if not pool and limits and any(c.p50_ms is not None for c in candidates):
        return judgements, _closest(candidates, judgements, limits, tolerance=tolerance, evaluated=evaluated)
    rec = _choose(pool, candidates, judgements, original, tolerance=tolerance, evaluated=evaluated, limits=limits)
    return judgements, rec


def _closest(
    candidates: Sequence[Candidate],
    judgements: dict[str, Judgement],
    limits: Limits,
    *,
    tolerance: float,
    evaluated: bool,
) -> Recommendation:
    """Nothing within the tolerance meets the constraints: no recommendation, and the candidate
    within the tolerance that comes closest (the original included), marked with what it misses."""
    near = [
        c
        for c in candidates
        if c.p50_ms is not None and (c.step is None or judgements[c.name].verdict == "misses_constraint")
    ]
    if not near:
        return Recommendation(
            artifact=None,
            tolerance=tolerance,
            accuracy_verified=evaluated,
            reason="nothing meets the constraints: no artifact is both timed and within the tolerance",
        )
    best = min(near, key=lambda c: (limits.overshoot(c), _timed(c), c.size_bytes))
    missed = limits.misses(best)
    which = "the original" if best.step is None else best.name
    return Recommendation(
        artifact=None,
        tolerance=tolerance,
        accuracy_verified=evaluated,
        closest=best.name,
        missed=missed,
        reason=f"nothing within the tolerance meets the constraints; the closest is {which} ({'; '.join(missed)})",
    )


@dataclass(frozen=True)
class _Behind:
    """A candidate tied at batch 1 that the throughput rule set aside: its images/s at ``batch``
    against the best there (``leader``'s)."""

    batch: int
    images_per_s: float
    best: float
    leader: str


def _tie_break(pool: list[Candidate]) -> tuple[Candidate, Candidate, dict[str, _Behind]]:
    """(winner, fastest at batch 1, who fell behind under load) among the pool."""
    fastest = min(pool, key=_timed)
    tied = [c for c in pool if _timed(c) <= _timed(fastest) * (1 + TIE_FRACTION)]
    # Equal at batch 1 is not equal under load (FP16 on a CPU without FP16 arithmetic ties at batch 1
    # and runs several times slower at batch 8): within the tie, what falls behind at the largest
    # batch both were timed at gives way, before size decides.
    behind: dict[str, _Behind] = {}
    batches = [c.throughput for c in tied if c.throughput]
    if batches:
        batch = max(b for b, _ in batches)
        leader = max((c for c in tied if c.throughput and c.throughput[0] == batch), key=_rate)
        best = _rate(leader)
        for c in tied:
            if c.throughput and c.throughput[0] == batch and c.throughput[1] < best * (1 - TIE_FRACTION):
                behind[c.name] = _Behind(batch, c.throughput[1], best, leader.name)
        tied = [c for c in tied if c.name not in behind]
    # Size first within the tie; then speed, and the original last so an equal copy is shipped.
    winner = min(tied, key=lambda c: (c.size_bytes, c.p50_ms, c.step is None))
    return winner, fastest, behind


def _choose(
    pool: list[Candidate],
    candidates: Sequence[Candidate],
    judgements: dict[str, Judgement],
    original: Candidate | None,
    *,
    tolerance: float,
    evaluated: bool,
    limits: Limits,
) -> Recommendation:
    unverified = (
        ""
        if evaluated
        else ("; accuracy not verified (the job has no evaluate step): only lossless float conversions were considered")
    )
    if not pool:
        if not any(c.p50_ms is not None for c in candidates):
            return Recommendation(
                artifact=None,
                tolerance=tolerance,
                accuracy_verified=evaluated,
                reason="nothing was timed at batch 1: add a benchmark step to the recipe",
            )
        return Recommendation(
            artifact=None,
            tolerance=tolerance,
            accuracy_verified=evaluated,
            reason=_nothing_beats(candidates, judgements, original, tolerance, {}) + unverified,
        )
    winner, fastest, behind = _tie_break(pool)
    if winner.step is None:
        return Recommendation(
            artifact=None,
            tolerance=tolerance,
            accuracy_verified=evaluated,
            reason=_nothing_beats(candidates, judgements, original, tolerance, behind) + unverified,
        )
    base_p50 = original.p50_ms if original else None
    base_size = original.size_bytes if original else 0
    speedup = base_p50 / _timed(winner) if base_p50 else None
    why = _meets_reason(winner.metric, tolerance) if winner.metric is not None else "lossless float conversion"
    speed = (
        f"{speedup:.2f}x the original's speed at batch 1 ({_ms(_timed(winner))} vs {_ms(base_p50)} p50)"
        if speedup and base_p50  # the one implies the other
        else f"{_ms(_timed(winner))} p50 at batch 1 (the original was not timed)"
    )
    within = "the tolerance and the constraints" if limits else "the tolerance"
    if winner is fastest:
        lead = f"fastest within {within}"
    elif fastest.name in behind:
        lead = f"fastest within {within} that keeps up at batch {behind[fastest.name].batch}"
    else:
        lead = (
            f"smallest of the fastest within {within} ({winner.size_bytes / max(fastest.size_bytes, 1):.2f}x "
            f"the size of {fastest.name if fastest.step else 'the original'}, whose p50 of "
            f"{_ms(_timed(fastest))} it matches within {TIE_FRACTION:.0%})"
        )
    metric = winner.metric
    runner_up = _runner_up(winner, pool, behind)
    return Recommendation(
        artifact=winner.name,
        tolerance=tolerance,
        accuracy_verified=evaluated,
        reason=f"{lead}: {speed}; {why}{runner_up}{unverified}",
        metrics=RecommendationMetrics(
            p50_ms=winner.p50_ms,
            speedup=speedup,
            size_bytes=winner.size_bytes,
            size_ratio=winner.size_bytes / base_size if base_size else 1.0,
            metric=RecommendedMetric(name=metric["name"], value=float(metric["value"]), drop=float(metric["drop"]))
            if metric is not None
            else None,
        ),
    )


def _runner_up(winner: Candidate, pool: list[Candidate], behind: dict[str, _Behind]) -> str:
    """ "; next: ..." naming the fastest other candidate in the running and why it lost."""
    rivals = sorted((c for c in pool if c is not winner), key=_timed)
    if not rivals:
        return ""
    rival = rivals[0]
    name = "the original" if rival.step is None else rival.name
    if rival.name in behind:
        b = behind[rival.name]
        rates = f"{b.images_per_s:.0f} vs {b.best:.0f} images/s"
        return f"; next: {name}, tied at batch 1 but behind at batch {b.batch} ({rates})"
    ratio = _timed(rival) / _timed(winner)
    if ratio >= 1:
        return f"; next: {name} at {ratio:.2f}x its p50"
    return f"; next: {name} ({_ms(_timed(rival))} p50, tied and larger)"


def _nothing_beats(
    candidates: Sequence[Candidate],
    judgements: dict[str, Judgement],
    original: Candidate | None,
    tolerance: float,
    behind: dict[str, _Behind],
) -> str:
    """One line: nothing beats the original, and each artifact's reason."""
    parts = []
    for c in candidates:
        if c.step is None:
            continue
        j = judgements[c.name]
        if j.verdict == "over_tolerance":
            losses = []
            if _drop_over(c.metric, tolerance):
                losses.append(
                    f"loses {float(c.metric['drop']) * 100:.1f} points of "
                    f"{metric_label(c.metric['name'])} (tolerance {tolerance * 100:.1f})"
                )
            floor = _missed_floor(c.metric)
            if floor is not None:
                losses.append(f"misses its floor ({_floor_text(floor, '<')})")
            parts.append(f"{c.name} " + " and ".join(losses))
        elif j.verdict == "slower_than_float":
            parts.append(f"{c.name} is {j.reason}")
        elif j.verdict == "misses_constraint":
            parts.append(f"{c.name} misses a constraint ({j.reason.split('; ')[0]})")
        elif j.verdict == "not_measured":
            parts.append(f"{c.name} was not measured ({j.reason})")
        elif c.name in behind:
            # Tied at batch 1, yet it fell behind under load: the throughput rule set it aside.
            b = behind[c.name]
            leader = "the original" if original is not None and b.leader == original.name else b.leader
            parts.append(
                f"{c.name} ties at batch 1 ({_ms(_timed(c))} p50, within {TIE_FRACTION:.0%} of the fastest) "
                f"but falls behind at batch {b.batch} ({b.images_per_s:.0f} vs {b.best:.0f} images/s for "
                f"{leader})"
            )
        elif original is not None and original.p50_ms and c.p50_ms:
            # It met the tolerance, yet the original won: a tie on p50 that the original's size decided.
            parts.append(
                f"{c.name} matches the original's p50 within {TIE_FRACTION:.0%} ({_ms(c.p50_ms)} vs "
                f"{_ms(original.p50_ms)}) and is not smaller ({c.size_bytes / max(original.size_bytes, 1):.2f}x "
                "its size)"
            )
    if not parts:
        return "nothing beats the original: the job made no artifact"
    return "nothing beats the original: " + "; ".join(parts)


# -- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepFacts:
    name: str
    succeeded: bool
    metrics: dict[str, Any]
    index: int = 0
    optional: bool = False
    failed: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    message: str | None = None


def pareto_front(points: dict[str, tuple[float, float, float]]) -> set[str]:
    """The names no other point dominates: at least as good on every objective (all minimised) and
    better on one."""

    def dominates(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    return {n for n, p in points.items() if not any(dominates(q, p) for m, q in points.items() if m != n)}


def _front(entries: Sequence[ReportEntry], lossless: set[str]) -> list[str]:
    """Marks each entry on or off the front of (batch-1 p50, size, drop on the task's metric) and
    returns the front, fastest first. A lossless float conversion counts as dropping nothing; an
    entry under its metric's floor is off the front (pareto null)."""
    points: dict[str, tuple[float, float, float]] = {}
    for e in entries:
        drop = float(e.metric["drop"]) if e.metric else (0.0 if e.step is None or e.name in lossless else None)
        # A detector under its class-channel floor is broken whatever its drop: not a trade-off to show.
        if e.latency_ms is not None and drop is not None and _missed_floor(e.metric) is None:
            points[e.name] = (e.latency_ms["p50_ms"], float(e.size_bytes), drop)
    front = pareto_front(points)
    for e in entries:
        e.pareto = (e.name in front) if e.name in points else None
    # Ties on p50 ordered by size, drop, then name: the same report on every read (a set has no order).
    return sorted(front, key=lambda n: (*points[n], n))


def _failed_candidates(steps: Sequence[StepFacts], model_format: str) -> list[FailedCandidate]:
    out = []
    for s in steps:
        if s.optional and s.failed:
            error = s.metrics.get("error") or {}
            out.append(
                FailedCandidate(
                    index=s.index,
                    step=s.name,
                    label=candidate_label(s.name, model_format, s.config),
                    code=error.get("code"),
                    message=error.get("message") or s.message or "failed",
                )
            )
    return out


def _legacy_metric(result: dict[str, Any], original: dict[str, Any]) -> dict[str, Any] | None:
    """The task metric of an evaluation recorded before evaluate wrote one (classification only):
    top-1 with labels, else top-1 agreement with the original."""
    for group, name in (("accuracy", "top1"), ("fidelity", "top1_agreement")):
        value = (result.get(group) or {}).get(name)
        reference = (original.get(group) or {}).get(name)
        if isinstance(value, (int, float)) and isinstance(reference, (int, float)):
            return {
                "name": name,
                "value": float(value),
                "reference": float(reference),
                "drop": float(reference) - float(value),
                "higher_is_better": True,
            }
    return None


def _fidelity(values: dict[str, Any]) -> dict[str, float]:
    """Fidelity numbers as floats (JSON keeps a perfect SNR as the string "inf"); a measure the
    evaluation could not take (null) is left out rather than shown as a number."""
    return {k: float(v) for k, v in values.items() if v is not None and not isinstance(v, bool)}


@dataclass(frozen=True)
class _Measured:
    """The benchmark's and evaluate's findings on one artifact, as the report shows them."""

    latency: dict[str, float] | None
    throughput: dict[str, Any] | None
    throughput_error: str | None
    unbenchmarked: str | None
    metric: dict[str, Any] | None
    unevaluated: str | None


@dataclass(frozen=True)
class _StepResults:
    """The last succeeded benchmark and evaluate steps' per-artifact results."""

    bench: dict[str, Any] | None
    evaluation: dict[str, Any] | None
    has_benchmark: bool
    bench_by_name: dict[str, dict[str, Any]]
    eval_by_name: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, steps: Sequence[StepFacts]) -> _StepResults:
        def last_metrics(step_name: str) -> dict[str, Any] | None:
            done = [s for s in steps if s.name == step_name and s.succeeded]
            return done[-1].metrics if done else None

        bench, evaluation = last_metrics("benchmark"), last_metrics("evaluate")
        return cls(
            bench=bench,
            evaluation=evaluation,
            has_benchmark=any(s.name == "benchmark" for s in steps),
            bench_by_name={r["artifact"]: r for r in (bench or {}).get("results", [])},
            eval_by_name={r["artifact"]: r for r in (evaluation or {}).get("results", [])},
        )


def _timings(measured: dict[str, Any]) -> tuple[dict[str, float] | None, dict[str, Any] | None, str | None]:
    """(batch-1 latency, throughput at the largest batch timed above 1, why that larger batch failed)."""
    at = measured.get("latency", {})
    lat = at.get("1") or {}
    batches = sorted((int(b), v) for b, v in at.items() if "images_per_s" in v)
    throughput = None
    if batches and batches[-1][0] > 1:
        batch, stats = batches[-1]
        throughput = {"batch": batch, "images_per_s": stats["images_per_s"], "p50_ms": stats["p50_ms"]}
    failed = sorted((int(b), v["error"]) for b, v in at.items() if "error" in v)
    throughput_error = None
    if failed and failed[-1][0] > 1 and (not batches or failed[-1][0] > batches[-1][0]):
        throughput_error = failed[-1][1]
    latency = {k: lat[k] for k in ("p50_ms", "p90_ms", "p99_ms")} if "p50_ms" in lat else None
    return latency, throughput, throughput_error


def _why_unbenchmarked(results: _StepResults, measured: dict[str, Any]) -> str:
    lat = measured.get("latency", {}).get("1") or {}
    if not results.has_benchmark:
        return "not benchmarked: the job has no benchmark step"
    if results.bench is None:
        return "not benchmarked: the benchmark step did not finish"
    if "skipped" in measured:
        return f"not benchmarked: {measured['skipped']}"
    if "error" in lat:
        return f"batch 1 failed: {lat['error']}"
    return "not benchmarked (made after the benchmark step)"


def _why_unevaluated(results: _StepResults, evaluated: dict[str, Any]) -> str:
    if "skipped" in evaluated:
        return f"not evaluated: {evaluated['skipped']}"
    if results.evaluation is not None:
        return "not evaluated (made after the evaluate step)"
    return "not evaluated: the evaluate step did not finish"


def _measured(results: _StepResults, name: str, original_eval: dict[str, Any]) -> _Measured:
    bench = results.bench_by_name.get(name, {})
    latency, throughput, throughput_error = _timings(bench)
    e = results.eval_by_name.get(name, {})
    metric = e.get("metric") or (_legacy_metric(e, original_eval) if e and "skipped" not in e else None)
    return _Measured(
        latency=latency,
        throughput=throughput,
        throughput_error=throughput_error,
        unbenchmarked=None if latency is not None else _why_unbenchmarked(results, bench),
        metric=metric,
        unevaluated=None if metric is not None else _why_unevaluated(results, e),
    )


def _entries(
    results: _StepResults, original: ArtifactFacts, artifacts: Sequence[ArtifactFacts], lossless: set[str]
) -> tuple[list[ReportEntry], list[Candidate]]:
    """The report's row for the original and each artifact, and the same as the rules see it."""
    original_eval = results.eval_by_name.get(original.name, {})
    entries: list[ReportEntry] = []
    candidates: list[Candidate] = []
    base_p50 = None
    for facts in [original, *artifacts]:
        m = _measured(results, facts.name, original_eval)
        if facts.step is None and m.latency:
            base_p50 = m.latency["p50_ms"]
        bench = results.bench_by_name.get(facts.name, {})
        e = results.eval_by_name.get(facts.name, {})
        entries.append(
            ReportEntry(
                name=facts.name,
                step=facts.step,
                format=facts.format,
                label=candidate_label(
                    facts.step, facts.format, facts.meta, (bench.get("runtime") or {}).get("inference_precision")
                ),
                size_bytes=facts.size_bytes,
                size_ratio=facts.size_bytes / original.size_bytes if original.size_bytes else 1.0,
                latency_ms=m.latency,
                speedup=(base_p50 / m.latency["p50_ms"]) if base_p50 and m.latency else None,
                throughput=m.throughput,
                throughput_error=m.throughput_error,
                memory_mib=bench.get("memory_mib"),
                runtime=bench.get("runtime"),
                accuracy=e.get("accuracy"),
                fidelity=_fidelity(e["fidelity"]) if e.get("fidelity") else None,
                metric=m.metric,
            )
        )
        candidates.append(
            Candidate(
                name=facts.name,
                step=facts.step,
                size_bytes=facts.size_bytes,
                p50_ms=m.latency["p50_ms"] if m.latency else None,
                lossless=facts.step is None or facts.name in lossless,
                metric=m.metric,
                unbenchmarked=m.unbenchmarked,
                unevaluated=m.unevaluated,
                throughput=(m.throughput["batch"], m.throughput["images_per_s"]) if m.throughput else None,
            )
        )

    return entries, candidates


def report_for(
    *,
    job_id: str,
    status: JobStatus,
    task: str,
    task_options: dict[str, Any] | None,
    steps: Sequence[StepFacts],
    original: ArtifactFacts,
    artifacts: Sequence[ArtifactFacts],
) -> ReportRead:
    """Each artifact against the original, from the last succeeded benchmark and evaluate steps'
    metrics, with its verdict; the recommendation once the job succeeded. ``artifacts`` in step
    order."""
    results = _StepResults.of(steps)
    options = task_options or {}
    tolerance = float(options.get("max_accuracy_drop", DEFAULT_TOLERANCE))
    lossless = lossless_artifacts(artifacts)

    entries, candidates = _entries(results, original, artifacts, lossless)
    judgements, rec = recommend(
        candidates,
        tolerance=tolerance,
        evaluated=any(s.name == "evaluate" for s in steps),
        limits=Limits.of(options.get("constraints")),
    )
    for entry in entries:
        entry.verdict, entry.verdict_reason = judgements[entry.name].verdict, judgements[entry.name].reason
    resolved_task = task
    if task == "auto":
        resolved_task = next((r["task"] for r in results.eval_by_name.values() if r.get("task")), task)
    return ReportRead(
        job_id=job_id,
        status=status,
        recommended=rec if status == JobStatus.succeeded else None,
        task=resolved_task,
        machine=(results.bench or {}).get("machine"),
        target=options.get("target"),
        constraints=options.get("constraints"),
        latency_note=STAND_IN_NOTES.get(options.get("target") or ""),
        entries=entries,
        front=_front(entries, lossless | {original.name}),
        failed_candidates=_failed_candidates(steps, original.format),
        left_out=[LeftOut.model_validate(x) for x in options.get("left_out", [])],
    )
