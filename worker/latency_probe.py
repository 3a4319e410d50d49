"""Latency of a pruned candidate against the original, measured on this worker in the runtime the model
will run in (prune_structured's target_latency_ratio).

Counting MACs does not say what a runtime does with fewer channels (Torch-Pruning's own ResNet-50 test:
3.85x fewer MACs, 2.19x lower latency), so each pruning round writes the candidate as ONNX and times it
beside the original, round-robin in one run (worker.timing: both see the same machine noise), at the
job's input shape: in ONNX Runtime, or in OpenVINO (which reads the ONNX file, in its default precision).
The reference is the upload itself when it is ONNX (the file the user compares with), else the unpruned
model written the same way as the candidates.
"""

from __future__ import annotations

import shutil
from typing import Any

from worker.passes.base import ArtifactRef, PassContext

# Rounds of a timing: the median of the rounds' means is the latency (ratios of two medians stay
# within a few percent here on a 2-core VM, below the 5% the search aims at).
RUNS = 9
BUDGET_S = 6.0
MIN_BLOCK_S = 0.02


class LatencyProbe:
    def __init__(self, trainable, ctx: PassContext, runtime: str, source: ArtifactRef) -> None:
        from worker.data import sample_feeds, sample_tensors

        self.trainable, self.ctx, self.runtime = trainable, ctx, runtime
        self.dir = ctx.work_dir / "latency"
        self.dir.mkdir(exist_ok=True)
        self.args = sample_tensors(ctx.input_spec)
        self.feeds = sample_feeds(ctx.input_spec)
        # The upload itself where it is ONNX (what the user compares with), else its unpruned export.
        self.reference = (
            self._load(source.path) if source.format == "onnx" else self._runner(trainable.module, "original")
        )
        self.count = 0

    def _runner(self, module, stem: str):
        from worker.trainable import write_onnx

        path = self.dir / f"{stem}.onnx"
        write_onnx(self.trainable, module, self.args, path)
        return self._load(path)

    def _load(self, path):
        from worker.runtime import load_runner

        if self.runtime == "openvino":
            return _openvino_runner(path, self.ctx.threads)
        return load_runner(ArtifactRef(path.name, "onnx", path), threads=self.ctx.threads)

    def fraction_of(self, example):
        from worker.pruning import measure

        def measure_latency(candidate) -> tuple[float, dict[str, Any]]:
            from worker.timing import time_round_robin

            self.count += 1
            pruned = self._runner(candidate.eval(), f"round{self.count}")
            feeds = self.feeds
            timed = time_round_robin(
                {"original": lambda: self.reference(feeds), "pruned": lambda: pruned(feeds)},
                runs=RUNS,
                budget_s=BUDGET_S,
                min_block_s=MIN_BLOCK_S,
            )
            before, after = timed["original"]["p50_ms"], timed["pruned"]["p50_ms"]
            macs, params = measure(candidate, example)
            record = {
                "parameters": params,
                "macs": macs,
                "latency_ms": round(after, 4),
                "original_latency_ms": round(before, 4),
                "latency_ratio": round(after / before, 4),
            }
            return after / before, record

        return measure_latency

    def summary(self, rounds: list[dict[str, Any]], ratio: float) -> dict[str, Any]:
        chosen = next(r for r in rounds if r["channel_ratio"] == round(ratio, 4))
        return {
            "latency_runtime": self.runtime,
            "latency_batch": int(self.ctx.input_spec[0]["shape"][0]),
            "latency_ratio": chosen["latency_ratio"],
            "latency_ms_before": chosen["original_latency_ms"],
            "latency_ms_after": chosen["latency_ms"],
        }

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _openvino_runner(path, threads: int):
    import openvino as ov

    from worker.runtime import openvino_cpu_config

    compiled = ov.Core().compile_model(str(path), "CPU", openvino_cpu_config("auto", threads))
    request = compiled.create_infer_request()

    def run(feeds):
        return list(request.infer(feeds).to_tuple())

    return run
