"""Load any artifact the passes make and run it on numpy inputs: ONNX Runtime and LiteRT on the
CPU, torch on the CPU or (on GPU workers) CUDA, TensorRT engines and AOTInductor packages on the
GPU they were built for. GPU runners also time themselves with CUDA events (``time_ms``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from worker.passes.base import (
    AOTI_PACKAGE,
    ONNX,
    TENSORRT_ENGINE,
    TF_FORMATS,
    TFLITE,
    ArtifactRef,
)

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def _flatten(out: Any) -> list[np.ndarray]:
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [a for o in out for a in _flatten(o)]
    return [out.detach().cpu().numpy()]


def load_runner(ref: ArtifactRef, *, threads: int = 1, device: str | None = None) -> Runner:
    """``device`` applies to torch models (default: where the artifact was made for, else cpu)."""
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

    if ref.format in TF_FORMATS:
        from worker.tf_models import tf_runner

        return tf_runner(ref)
    if ref.format == TENSORRT_ENGINE:
        from worker.tensorrt_backend import EngineRunner

        return EngineRunner(ref.path)

    import torch

    torch.set_num_threads(threads)
    if ref.format == AOTI_PACKAGE:
        device = ref.meta.get("device", "cuda")
        return TorchRunner(torch._inductor.aoti_load_package(str(ref.path)), device)

    from worker.torch_models import load_module

    module = load_module(ref)
    device = device or ref.meta.get("device") or "cpu"
    if device == "cuda":
        module = module.to("cuda")
        if ref.meta.get("compile_at_load"):
            # CUDA graphs ("reduce-overhead") remove the launch overhead that dominates batch 1.
            module = torch.compile(module, mode="reduce-overhead")
    return TorchRunner(module, device)


class TorchRunner:
    """A torch callable on numpy feeds; on CUDA, ``time_ms`` times it alone with CUDA events on
    device-resident inputs (no host copies in the timed region)."""

    def __init__(self, module, device: str) -> None:
        self.module, self.device = module, device

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for v in feeds.values()]
            return _flatten(self.module(*args))

    @property
    def time_ms(self):
        return self._time_cuda if self.device == "cuda" else None

    def _time_cuda(self, feeds: dict[str, np.ndarray], *, runs: int, warmup: int) -> list[float]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(v)).to("cuda") for v in feeds.values()]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        with torch.inference_mode():
            for _ in range(warmup):
                self.module(*args)
            torch.cuda.synchronize()
            for _ in range(runs):
                start.record()
                self.module(*args)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
        return samples


def gpu_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def split_runnable(refs: list[ArtifactRef]) -> tuple[list[ArtifactRef], list[tuple[ArtifactRef, str]]]:
    """(what this machine can run, [(what it cannot, why)]) for the measuring steps."""
    runnable, skipped = [], []
    for ref in refs:
        reason = not_runnable_here(ref)
        if reason:
            skipped.append((ref, reason))
        else:
            runnable.append(ref)
    return runnable, skipped


def not_runnable_here(ref: ArtifactRef) -> str | None:
    """Why this machine cannot run the artifact (None when it can): engines run only on the GPU
    model and TensorRT version they were built for; CUDA packages need a GPU."""
    needs_gpu = ref.format == TENSORRT_ENGINE or ref.meta.get("device") == "cuda"
    if not needs_gpu:
        return None
    if not gpu_available():
        return "needs an NVIDIA GPU; this worker has none"
    if ref.format == TENSORRT_ENGINE:
        from importlib.util import find_spec

        from worker.devices import detect_gpu

        if find_spec("tensorrt") is None:
            return "needs TensorRT; this worker has none"
        gpu = detect_gpu()
        if ref.meta.get("compute_capability") and gpu["compute_capability"] != ref.meta["compute_capability"]:
            return (f"built for {ref.meta.get('gpu_name')} (sm {ref.meta['compute_capability']}); this worker has "
                    f"{gpu['name']} (sm {gpu['compute_capability']})")
    return None


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


def run_in_fixed_batches(run: Runner, feeds: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
    """``run``'s outputs for every sample of ``feeds``, for a model that takes exactly ``batch``
    samples: run ``batch`` at a time, the last chunk padded with copies of its last sample whose
    outputs are dropped."""
    n = len(next(iter(feeds.values())))
    chunks = []
    for i in range(0, n, batch):
        part = {k: v[i : i + batch] for k, v in feeds.items()}
        short = batch - len(next(iter(part.values())))
        if short:
            part = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in part.items()}
        chunks.append([out[: batch - short] for out in run(part)])
    return [np.concatenate(outputs) for outputs in zip(*chunks, strict=True)]


def runtime_info(ref: ArtifactRef, *, threads: int = 1, device: str | None = None) -> dict[str, Any]:
    """Which runtime measures this artifact, on what, for the report."""
    if ref.format == ONNX:
        import onnxruntime

        return {"name": "onnxruntime", "version": onnxruntime.__version__, "device": "cpu",
                "provider": "CPUExecutionProvider"}
    if ref.format == TFLITE:
        from importlib.metadata import version

        from worker.litert import delegate_coverage

        return {"name": "litert", "version": version("ai-edge-litert"), "device": "cpu",
                **delegate_coverage(ref.path, threads)}
    if ref.format in TF_FORMATS:
        from worker.tf_models import import_tensorflow

        return {"name": "tensorflow", "version": import_tensorflow().__version__, "device": "cpu"}
    import torch

    on = device or ref.meta.get("device") or "cpu"
    if ref.format == TENSORRT_ENGINE:
        on = "cuda"
    info: dict[str, Any] = {"name": "torch", "version": torch.__version__, "device": on}
    if ref.format == TENSORRT_ENGINE:
        info.update(name="tensorrt", version=ref.meta.get("tensorrt"), precision=ref.meta.get("precision"))
    elif ref.format == AOTI_PACKAGE:
        info.update(name="aotinductor", precision=ref.meta.get("precision"))
    elif ref.meta.get("compile_at_load"):
        info.update(name="torch.compile", precision=ref.meta.get("precision"))
    if on == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
