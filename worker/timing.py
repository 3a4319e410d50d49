"""Latency measurement that several steps share (benchmark, the INT8 speed search): percentiles of
timed runs, and ONNX models timed round-robin so that every variant sees the same machine noise."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

from core.formats import ONNX
from worker.passes.base import ArtifactRef

# Seconds before each block of a round-robin, long enough for the previous session's spinning
# intra-op threads to sleep (time_round_robin says what it fixes).
SETTLE_S = 0.1

Label = TypeVar("Label", bound=Hashable)


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
    models: dict,
    feeds: dict,
    *,
    runs: int,
    threads: int,
    warmup: int = 5,
    budget_s: float = 20.0,
    settle_s: float = SETTLE_S,
) -> dict[str, dict]:
    """ONNX models on the same inputs, timed round-robin (time_round_robin)."""
    from worker.runtime import load_runner

    runners = {label: load_runner(ArtifactRef(label, ONNX, path), threads=threads) for label, path in models.items()}
    calls = {label: (lambda run=run: run(feeds)) for label, run in runners.items()}
    return time_round_robin(calls, runs=runs, warmup=warmup, budget_s=budget_s, settle_s=settle_s)


def time_round_robin(
    calls: dict[Label, Callable[[], object]],
    *,
    runs: int,
    warmup: int = 5,
    budget_s: float = 20.0,
    settle_s: float = SETTLE_S,
    max_block: int = 20,
    min_block_s: float = 0.0,
    per_call: bool = False,
    on_round: Callable[[int], bool | None] | None = None,
) -> dict[Label, dict]:
    """Callables of any runtime timed round-robin (``runs`` rounds, a block of calls of each per
    round) so that every variant sees the same machine noise. A block holds up to ``max_block``
    calls, fewer where ``budget_s`` (all rounds of all variants) would not hold them. ``p50_ms`` is
    the median over rounds of each round's mean, which short calls need to be stable; ``per_call``
    times every call on its own instead and takes the percentiles over all calls (``runs`` then
    counts calls), for reports whose p90/p99 are to show the tail of single calls.

    ``min_block_s``: blocks of fast calls grow past ``max_block`` until a block of an average call
    lasts this long (still within ``budget_s``): a 0.4 ms model timed 5 calls after each settle reads
    its first, slower calls as much as its steady ones.

    ``on_round(rounds_done)`` runs after every round (progress, cancellation); a true answer ends
    the timing there, with the rounds done so far.

    ``settle_s``: a pause before each block, then one untimed call. ONNX Runtime's and OpenVINO's
    thread pools spin after a call, and a block that starts while another session's threads still
    spin is slowed by them (the same ORT model in three sessions of one rotation read 2.2, 3.9 and
    4.0 ms with no pause, 2.23-2.31 ms with 0.1 s; AMD EPYC, 2 threads), so the service settles by
    default (SETTLE_S); 0 times back to back, for a single variant that has nobody to wait for."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    t0 = time.perf_counter()
    for call in calls.values():
        call()
    one_round = max(time.perf_counter() - t0, 1e-6)
    fits = int(budget_s / runs / one_round)  # calls per block that all rounds of all variants have time for
    per_block = max(1, min(max_block, fits))
    if min_block_s:
        per_block = max(per_block, min(fits, math.ceil(min_block_s * len(calls) / one_round)))
    samples: dict[Label, list[float]] = {label: [] for label in calls}
    for done in range(1, runs + 1):
        for label, call in calls.items():
            if settle_s:
                time.sleep(settle_s)
                call()
            samples[label] += _time_block(call, per_block, per_call)
        if on_round is not None and on_round(done):
            break
    return {label: dict(percentiles(values), calls_per_round=per_block) for label, values in samples.items()}


def _time_block(call: Callable[[], object], calls: int, per_call: bool) -> list[float]:
    """The block's milliseconds: one sample per call, or the block's mean as one sample."""
    if per_call:
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1000)
        return times
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    return [(time.perf_counter() - t0) * 1000 / calls]
