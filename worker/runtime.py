"""Load any artifact the passes make and run it on numpy inputs (CPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from worker.passes.base import ONNX, TFLITE, ArtifactRef

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def _flatten(out: Any) -> list[np.ndarray]:
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [a for o in out for a in _flatten(o)]
    return [out.detach().cpu().numpy()]


def load_runner(ref: ArtifactRef, *, threads: int = 1) -> Runner:
    if ref.format == ONNX:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(ref.path), opts, providers=["CPUExecutionProvider"])
        output_names = [o.name for o in session.get_outputs()]

        def run_onnx(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return session.run(output_names, feeds)

        return run_onnx
    if ref.format == TFLITE:
        from worker.litert import TfliteRunner

        return TfliteRunner(ref.path, threads=threads, layout=ref.meta.get("io_layout", "nchw"))

    import torch

    torch.set_num_threads(threads)
    from worker.torch_models import load_module

    module = load_module(ref)

    def run_torch(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            return _flatten(module(*[torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]))

    return run_torch


def sample_tensors(input_spec: list[dict[str, Any]], *, batch: int | None = None) -> tuple:
    """sample_feeds as a tuple of torch tensors, in input order (example args for torch)."""
    import torch

    return tuple(torch.from_numpy(v) for v in sample_feeds(input_spec, batch=batch).values())


def sample_feeds(input_spec: list[dict[str, Any]], *, batch: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every model input (the batch dimension replaced when given)."""
    from worker.data import NP_DTYPES

    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in input_spec:
        shape = [int(d) for d in spec["shape"]]
        if batch is not None and shape:
            shape[0] = batch
        dtype = NP_DTYPES.get(spec.get("dtype", "float32"), np.float32)
        feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
    return feeds


def runtime_info(ref: ArtifactRef, *, threads: int = 1) -> dict[str, Any]:
    """Which runtime measures this artifact, for the report."""
    if ref.format == ONNX:
        import onnxruntime

        return {"name": "onnxruntime", "version": onnxruntime.__version__, "provider": "CPUExecutionProvider"}
    if ref.format == TFLITE:
        from importlib.metadata import version

        from worker.litert import delegate_coverage

        return {"name": "litert", "version": version("ai-edge-litert"), **delegate_coverage(ref.path, threads)}
    import torch

    return {"name": "torch", "version": torch.__version__, "device": "cpu"}
