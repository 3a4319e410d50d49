"""Latency measurement that several steps share (benchmark, the INT8 speed search): percentiles of
timed runs, and ONNX models timed round-robin so that every variant sees the same machine noise."""

from __future__ import annotations

import time
from collections.abc import Callable

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
    """ONNX models on the same inputs, timed round-robin (time_round_robin)."""
    from worker.runtime import load_runner

    runners = {label: load_runner(ArtifactRef(label, ONNX, path), threads=threads) for label, path in models.items()}
    calls = {label: (lambda run=run: run(feeds)) for label, run in runners.items()}
    return time_round_robin(calls, runs=runs, warmup=warmup, budget_s=budget_s)


def time_round_robin(
    calls: dict[str, Callable[[], object]],
    *,
    runs: int,
    warmup: int = 5,
    budget_s: float = 20.0,
    settle_s: float = 0.0,
) -> dict[str, dict]:
    """Callables of any runtime timed round-robin (a block of calls of each per round) so that every
    variant sees the same machine noise; ``p50_ms`` is the median over rounds of each round's mean,
    which short calls need to be stable.

    ``settle_s``: a pause before each block, then one untimed call. ONNX Runtime's and OpenVINO's
    thread pools spin after a call, and a block that starts while another session's threads still
    spin is slowed by them (the same ORT model in three sessions of one rotation read 2.2, 3.9 and
    4.0 ms with no pause, 2.23-2.31 ms with 0.1 s; AMD EPYC, 2 threads). bench/peers.py settles; the
    service's own callers do not yet (0: their measurements stay as they were)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    t0 = time.perf_counter()
    for call in calls.values():
        call()
    one_round = max(time.perf_counter() - t0, 1e-6)
    per_block = max(1, min(20, int(budget_s / runs / one_round)))
    samples: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(runs):
        for label, call in calls.items():
            if settle_s:
                time.sleep(settle_s)
                call()
            t0 = time.perf_counter()
            for _ in range(per_block):
                call()
            samples[label].append((time.perf_counter() - t0) * 1000 / per_block)
    return {label: dict(percentiles(values), calls_per_round=per_block) for label, values in samples.items()}
