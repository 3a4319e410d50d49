"""benchmark: file size, parameter count and CPU latency (p50/p90/p99) of the original and of
every artifact made so far, timed round-robin so that all variants see the same machine noise."""

from __future__ import annotations

import math
import os
import platform
import re
import time

from core.formats import ONNX, OPENVINO_IR
from core.steps.benchmark import BenchmarkConfig, BenchmarkSpec
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult, is_out_of_memory
from worker.timing import SETTLE_S, percentiles, time_round_robin


def parameter_count(ref: ArtifactRef) -> int | None:
    import numpy as np

    if ref.format == ONNX:
        import onnx

        model = onnx.load(str(ref.path))
        return int(sum(np.prod(t.dims) for t in model.graph.initializer))
    return None


def batch_error(ref: ArtifactRef, batch: int, exc: Exception) -> str:
    """Why a variant could not run at ``batch``, in words a report can show."""
    fixed = _fixed_batch(ref, exc)
    if fixed is not None and fixed != batch:
        return f"the model's batch axis is fixed at {fixed}"
    message = str(exc).strip()
    return f"batch {batch} failed: {message.splitlines()[0][:300] if message else type(exc).__name__}"


def _fixed_batch(ref: ArtifactRef, exc: Exception) -> int | None:
    """The one batch size the variant's inputs are fixed at (None: open, mixed or unknown): read from an
    ONNX graph or an OpenVINO IR (static_shape), else from torch.export's guard in the error."""
    if ref.format == ONNX:
        import onnx

        from worker.onnx_graph import input_batch_dims

        dims = input_batch_dims(onnx.load(str(ref.path), load_external_data=False))
    elif ref.format == OPENVINO_IR:
        from worker.openvino_ir import ir_batch_dims, read_ir_archive

        dims = ir_batch_dims(read_ir_archive(ref.path, ref.name))
    else:  # torch.export's guard on a program traced at one batch size
        guard = re.search(r"size\(\)\[0\] == (\d+)", str(exc))
        return int(guard.group(1)) if guard else None
    distinct = set(dims)
    return distinct.pop() if len(distinct) == 1 else None


def _rss_mib() -> float:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return 0.0


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    import onnxruntime

    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "onnxruntime": onnxruntime.__version__,
    }


class Benchmark(BenchmarkSpec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: BenchmarkConfig) -> PassResult:
        from worker.runtime import gpu_available, split_runnable

        device = config.device if config.device != "auto" else ("cuda" if gpu_available() else "cpu")
        variants, skipped = split_runnable([ctx.original, *ctx.artifacts])
        runners, results = _load_variants(ctx, variants, device)
        for b_index, batch in enumerate(config.batch_sizes):
            _time_batch(ctx, config, variants, runners, results, batch=batch, b_index=b_index)
        results += [
            {"artifact": v.name, "step": v.step, "format": v.format, "skipped": reason, "latency": {}}
            for v, reason in skipped
        ]
        _add_ratios(results)
        return PassResult(metrics={"results": results, "machine": machine_info(ctx.threads)})


def _load_variants(ctx: PassContext, variants: list[ArtifactRef], device: str) -> tuple[list, list[dict]]:
    """A runner for every variant, each run once at batch 1, and its result entry (latency still empty)."""
    from worker.data import sample_feeds
    from worker.runtime import load_runner, runtime_info

    runners, memory = [], []
    first_feeds = sample_feeds(ctx.input_spec)
    for v in variants:
        before = _rss_mib()
        run = load_runner(v, threads=ctx.threads, device=device)
        try:
            run(first_feeds)
        except Exception as exc:  # reported by _time_batch with the batch it failed at
            if is_out_of_memory(exc):
                raise
        runners.append(run)
        memory.append(round(_rss_mib() - before, 1))
    results = [
        {
            "artifact": v.name,
            "step": v.step,
            "format": v.format,
            "size_bytes": v.path.stat().st_size,
            "parameters": parameter_count(v),
            # Resident memory that loading and one batch-1 run added to the worker (in-process,
            # so approximate: memory freed by an earlier variant can be reused).
            "memory_mib": mem,
            "threads": ctx.threads,
            "runtime": runtime_info(v, threads=ctx.threads, device=device),
            "latency": {},
        }
        for v, mem in zip(variants, memory, strict=True)
    ]
    return runners, results


def _time_batch(ctx, config: BenchmarkConfig, variants, runners, results, *, batch: int, b_index: int) -> None:
    """Every variant's latency at ``batch`` into its entry (or why it cannot run there): GPU runners
    time themselves, the rest round-robin within the time budget."""
    from worker.data import sample_feeds

    feeds = sample_feeds(ctx.input_spec, batch=batch)
    usable = []
    for i, run in enumerate(runners):
        try:
            for _ in range(config.warmup):
                run(feeds)
            usable.append(i)
        except Exception as exc:  # e.g. a model whose batch is fixed at 1
            if is_out_of_memory(exc):
                raise
            results[i]["latency"][str(batch)] = {"error": batch_error(variants[i], batch, exc)}
    stats: dict[int, dict] = {}
    # GPU runners time themselves with CUDA events, one variant after the other.
    for i in [i for i in usable if getattr(runners[i], "time_ms", None)]:
        stats[i] = percentiles(runners[i].time_ms(feeds, runs=config.runs, warmup=config.warmup))
    usable_cpu = [i for i in usable if i not in stats]
    if usable_cpu:
        stats.update(_time_cpu(ctx, config, {i: runners[i] for i in usable_cpu}, feeds, b_index=b_index))
    for i in usable:
        stats[i]["images_per_s"] = batch * 1000 / stats[i]["mean_ms"]
        results[i]["latency"][str(batch)] = stats[i]


# A block of a fast model lasts at least this long (more calls than runs / rounds): sub-millisecond
# candidates of one auto job otherwise swapped places between runs (AMD EPYC, 2 threads).
MIN_BLOCK_S = 0.02


def _time_cpu(ctx, config: BenchmarkConfig, runners: dict, feeds: dict, *, b_index: int) -> dict[int, dict]:
    """CPU variants (already warmed up) timed round-robin in settled blocks, every call timed on its
    own so that p90/p99 show single calls: 5 to 10 rounds of about ``config.runs`` calls in all (more
    for fast models: blocks of at least MIN_BLOCK_S), stopped at ``config.max_seconds`` once 5 rounds
    are done. A lone variant needs no settle: no other session's threads spin while it runs."""
    rounds = min(max(config.runs, 5), 10)
    deadline = time.perf_counter() + config.max_seconds

    def after_round(done: int) -> bool:
        ctx.report_progress((b_index + done / rounds) / len(config.batch_sizes))
        ctx.check_cancelled()
        return done >= 5 and time.perf_counter() > deadline

    ctx.check_cancelled()
    timed = time_round_robin(
        {i: (lambda run=run: run(feeds)) for i, run in runners.items()},
        runs=rounds,
        warmup=0,
        budget_s=config.max_seconds,
        settle_s=SETTLE_S if len(runners) > 1 else 0.0,
        max_block=math.ceil(config.runs / rounds),
        min_block_s=MIN_BLOCK_S,
        per_call=True,
        on_round=after_round,
    )
    return {i: {k: v for k, v in entry.items() if k != "calls_per_round"} for i, entry in timed.items()}


def _add_ratios(results: list[dict]) -> None:
    """Speed-up at batch 1 and size against the original (the first entry)."""
    baseline = results[0]["latency"].get("1", {}).get("p50_ms")
    for res in results:
        p50 = res["latency"].get("1", {}).get("p50_ms")
        res["speedup_vs_original"] = baseline / p50 if baseline and p50 else None
        if "size_bytes" in res:
            res["size_ratio"] = res["size_bytes"] / results[0]["size_bytes"]
