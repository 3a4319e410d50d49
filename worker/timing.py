"""Latency measurement that several steps share (benchmark, the INT8 speed search): percentiles of
timed runs, and ONNX models timed round-robin so that every variant sees the same machine noise."""

from __future__ import annotations

import time

from core.formats import ONNX
from worker.passes.base import ArtifactRef


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    import numpy as np

    arr = np.asarray(samples_ms)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p90_ms": float(np.percentile(arr, 90)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "runs": len(samples_ms),
    }


def time_interleaved(
    models: dict, feeds: dict, *, runs: int, threads: int, warmup: int = 5, budget_s: float = 20.0
) -> dict[str, dict]:
    """ONNX models on the same inputs, timed round-robin (a block of calls of each per round)
    so that every variant sees the same machine noise; ``p50_ms`` is the median over rounds of
    each round's mean, which short calls need to be stable."""
    from worker.runtime import load_runner

    runners = {label: load_runner(ArtifactRef(label, ONNX, path), threads=threads) for label, path in models.items()}
    for run in runners.values():
        for _ in range(warmup):
            run(feeds)
    t0 = time.perf_counter()
    for run in runners.values():
        run(feeds)
    one_round = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, min(20, int(budget_s / runs / one_round)))
    samples: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(runs):
        for label, run in runners.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                run(feeds)
            samples[label].append((time.perf_counter() - t0) * 1000 / calls)
    return {label: dict(percentiles(values), calls_per_round=calls) for label, values in samples.items()}
