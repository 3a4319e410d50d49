"""worker.timing.time_round_robin on cheap callables that sleep a known time: per-call samples are
counted per call and read the sleep, the per-round callback runs once a round and can end the
timing, and a settle makes one untimed call before every block."""

from __future__ import annotations

import time

import pytest

from worker.timing import time_round_robin


class Sleeper:
    """A callable that sleeps ``ms`` and counts its calls."""

    def __init__(self, ms: float) -> None:
        self.ms, self.calls = ms, 0

    def __call__(self) -> None:
        self.calls += 1
        time.sleep(self.ms / 1000)


def test_per_call_samples_count_every_call_and_read_each_callables_time():
    short, long = Sleeper(2), Sleeper(6)
    timed = time_round_robin({"short": short, "long": long}, runs=4, warmup=1, settle_s=0, max_block=3, per_call=True)
    for label in ("short", "long"):
        assert timed[label]["calls_per_round"] == 3
        assert timed[label]["runs"] == 4 * 3  # every call of every block is a sample
        assert timed[label]["p50_ms"] <= timed[label]["p90_ms"] <= timed[label]["p99_ms"]
    assert 2 <= timed["short"]["p50_ms"] < timed["long"]["p50_ms"]
    assert timed["long"]["p50_ms"] >= 6
    # warmup, the probe that sizes the block, then the timed blocks
    assert short.calls == long.calls == 1 + 1 + 4 * 3


def test_without_per_call_each_round_is_one_sample():
    timed = time_round_robin({"a": Sleeper(1)}, runs=5, warmup=0, settle_s=0, max_block=4)
    assert timed["a"]["runs"] == 5 and timed["a"]["calls_per_round"] == 4
    assert timed["a"]["p50_ms"] >= 1


def test_the_budget_shrinks_the_block():
    # 20 ms a round and 5 rounds in a 0.25 s budget leave room for 2 calls a block, not 10.
    timed = time_round_robin({"a": Sleeper(20)}, runs=5, warmup=0, budget_s=0.25, settle_s=0, max_block=10)
    assert 1 <= timed["a"]["calls_per_round"] <= 2


def test_the_callback_runs_once_a_round_and_can_stop_the_timing():
    seen: list[int] = []
    timed = time_round_robin(
        {"a": Sleeper(1), "b": Sleeper(1)},
        runs=6,
        warmup=0,
        settle_s=0,
        max_block=2,
        per_call=True,
        on_round=seen.append,
    )
    assert seen == [1, 2, 3, 4, 5, 6]
    assert timed["a"]["runs"] == timed["b"]["runs"] == 6 * 2

    seen.clear()
    a, b = Sleeper(1), Sleeper(1)

    def stop_after_three(done: int) -> bool:
        seen.append(done)
        return done >= 3

    timed = time_round_robin(
        {"a": a, "b": b}, runs=10, warmup=0, settle_s=0, max_block=2, per_call=True, on_round=stop_after_three
    )
    assert seen == [1, 2, 3]
    assert timed["a"]["runs"] == timed["b"]["runs"] == 3 * 2
    assert a.calls == b.calls == 1 + 3 * 2  # the probe, then three rounds' blocks


def test_an_exception_in_the_callback_ends_the_timing():
    def cancelled(done: int) -> None:
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        time_round_robin({"a": Sleeper(1)}, runs=5, warmup=0, settle_s=0, on_round=cancelled)


def test_a_settle_pauses_and_makes_one_untimed_call_before_every_block():
    a, b = Sleeper(1), Sleeper(1)
    started = time.perf_counter()
    timed = time_round_robin({"a": a, "b": b}, runs=3, warmup=2, settle_s=0.02, max_block=2, per_call=True)
    elapsed = time.perf_counter() - started
    # warmup, the probe, and per round one untimed call plus the block
    assert a.calls == b.calls == 2 + 1 + 3 * (1 + 2)
    assert timed["a"]["runs"] == 3 * 2  # the settling calls are not samples
    assert elapsed >= 3 * 2 * 0.02  # one pause before each of the 6 blocks


def test_settling_is_the_default():
    a = Sleeper(1)
    time_round_robin({"a": a}, runs=2, warmup=0, max_block=1)
    assert a.calls == 1 + 2 * (1 + 1)


def test_a_minimum_block_time_grows_the_blocks_of_fast_calls_within_the_budget():
    # Two 1 ms callables: max_block 2 alone gives blocks of 2 calls; min_block_s 0.02 asks for blocks of
    # about 20 ms of an average call (about 20 calls), and a tight budget caps that again.
    fast = {"a": Sleeper(1), "b": Sleeper(1)}
    grown = time_round_robin(fast, runs=3, warmup=0, settle_s=0, max_block=2, min_block_s=0.02, per_call=True)
    assert 10 <= grown["a"]["calls_per_round"] <= 20 and grown["a"]["runs"] == 3 * grown["a"]["calls_per_round"]
    capped = time_round_robin(fast, runs=3, warmup=0, settle_s=0, max_block=2, min_block_s=0.02, budget_s=0.03)
    assert capped["a"]["calls_per_round"] <= 5  # 30 ms for 3 rounds of 2 variants of ~1 ms calls
    slow = time_round_robin({"c": Sleeper(30)}, runs=2, warmup=0, settle_s=0, max_block=2, min_block_s=0.02)
    assert slow["c"]["calls_per_round"] == 2  # a call longer than the minimum keeps max_block
