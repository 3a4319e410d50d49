"""Load any artifact the passes make and run it on numpy inputs: ONNX Runtime and LiteRT on the
CPU, torch on the CPU or (on GPU workers) CUDA, TensorRT engines and AOTInductor packages on the
GPU they were built for. GPU runners also time themselves with CUDA events (``time_ms``).

One registry (RUNTIMES: format -> Runtime) answers the three questions every caller asks of an
artifact: how to run it, what runs it (for the report), and whether this worker can. Each entry
imports its runtime library only when called, so importing this module stays cheap."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any

import numpy as np

from core.errors import PassError
from core.formats import (
    AOTI_PACKAGE,
    EXPORTED_PROGRAM,
    KERAS,
    ONNX,
    OPENVINO_IR,
    SAVED_MODEL,
    STATE_DICT,
    TENSORRT_ENGINE,
    TFLITE,
    TORCHSCRIPT,
)
from worker.metrics.detection import PerSample, batchless_post_nms
from worker.openvino_ir import read_ir_archive
from worker.passes.base import ArtifactRef, is_out_of_memory

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
NO_GPU = "needs an NVIDIA GPU; this worker has none"


@dataclass(frozen=True)
class Runtime:
    """What runs one artifact format: ``load(ref, threads, device)`` -> Runner, ``info(ref, threads,
    device)`` -> the report's runtime facts, and ``unavailable(ref)`` -> why this worker cannot run
    it (None when it can). ``device`` applies to torch models (default: where the artifact was made
    for, else cpu)."""

    load: Callable[[ArtifactRef, int, str | None], Runner]
    info: Callable[[ArtifactRef, int, str | None], dict[str, Any]]
    unavailable: Callable[[ArtifactRef], str | None] = lambda ref: None


def load_runner(ref: ArtifactRef, *, threads: int = 1, device: str | None = None) -> Runner:
    """The artifact as a callable on numpy feeds (``device``: see Runtime)."""
    return runtime_for(ref).load(ref, threads, device)


def runtime_info(ref: ArtifactRef, *, threads: int = 1, device: str | None = None) -> dict[str, Any]:
    """Which runtime measures this artifact, on what, for the report."""
    return runtime_for(ref).info(ref, threads, device)


def not_runnable_here(ref: ArtifactRef) -> str | None:
    """Why this machine cannot run the artifact (None when it can): engines run only on the GPU
    model and TensorRT version they were built for; CUDA packages need a GPU."""
    runtime = RUNTIMES.get(ref.format)
    if runtime is None:
        return f"no runtime on this worker runs {ref.format} artifacts"
    if ref.meta.get("device") == "cuda" and not gpu_available():
        return NO_GPU
    return runtime.unavailable(ref)


def runtime_for(ref: ArtifactRef) -> Runtime:
    try:
        return RUNTIMES[ref.format]
    except KeyError:
        raise PassError(f"no runtime runs {ref.format} artifacts", code="unsupported_model") from None


def split_runnable(refs: list[ArtifactRef]) -> tuple[list[ArtifactRef], list[tuple[ArtifactRef, str]]]:
    """(what this machine can run, [(what it cannot, why)]) for the measuring steps. ``refs[0]`` is
    the reference every other artifact is compared with (the original): a machine that cannot run
    it fails the step saying why, rather than measuring the rest against the wrong model."""
    reason = not_runnable_here(refs[0]) if refs else None
    if reason:
        raise PassError(f"this worker cannot run the original model: {reason}", code="runtime_unavailable")
    runnable, skipped = [], []
    for ref in refs:
        reason = not_runnable_here(ref)
        if reason:
            skipped.append((ref, reason))
        else:
            runnable.append(ref)
    return runnable, skipped


def gpu_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# -- ONNX Runtime ----------------------------------------------------------------------------------


def _load_onnx(ref: ArtifactRef, threads: int, device: str | None) -> Runner:
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


def _onnx_info(ref: ArtifactRef, threads: int, device: str | None) -> dict[str, Any]:
    import onnxruntime

    return {
        "name": "onnxruntime",
        "version": onnxruntime.__version__,
        "device": "cpu",
        "provider": "CPUExecutionProvider",
    }


# -- OpenVINO --------------------------------------------------------------------------------------


def openvino_cpu_config(inference_precision: str, threads: int) -> dict[str, Any]:
    """compile_model's properties: latency-first on ``threads`` threads, as the other CPU runtimes
    are measured, and the compute precision asked for ("auto": the device's own default)."""
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if inference_precision != "auto":
        config["INFERENCE_PRECISION_HINT"] = inference_precision
    return config


def compile_openvino(ref: ArtifactRef, threads: int) -> Any:
    """The IR archive (read from memory, worker.openvino_ir.read_ir_archive) compiled for this CPU in
    the precision its meta names. An IR with fixed input shapes (static_shape) takes those only: a
    feed of another batch raises, so callers that feed other batches go through BatchRunner at the
    IR's batch (evaluate: the job's, which static_shape fixes)."""
    import openvino as ov

    model = read_ir_archive(ref.path, ref.name)
    try:
        config = openvino_cpu_config(ref.meta.get("inference_precision", "auto"), threads)
        return ov.Core().compile_model(model, "CPU", config)
    except RuntimeError as exc:  # OpenVINO raises RuntimeError for an IR it cannot compile
        message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise PassError(f"OpenVINO cannot load {ref.name}: {message}", code="corrupt_model") from exc


def compiled_precision(compiled: Any) -> str:
    """The precision the compiled model computes in, as OpenVINO names it ("f32", "bf16", "f16")."""
    return str(compiled.get_property("INFERENCE_PRECISION_HINT").to_string())


# The precision each loaded IR really ran in, until the report asks (benchmark loads the runner, then
# asks for the runtime's facts: compiling a second time only to ask would double its cost).
_OPENVINO_PRECISIONS: dict[tuple[str, int, int, str], str] = {}


def _openvino_key(ref: ArtifactRef, threads: int) -> tuple[str, int, int, str]:
    return (str(ref.path), ref.path.stat().st_mtime_ns, threads, ref.meta.get("inference_precision", "auto"))


def _load_openvino(ref: ArtifactRef, threads: int, device: str | None) -> Runner:
    compiled = compile_openvino(ref, threads)
    _OPENVINO_PRECISIONS[_openvino_key(ref, threads)] = compiled_precision(compiled)
    request = compiled.create_infer_request()

    def run_openvino(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        # infer() copies the outputs out of the request (share_outputs=False): the next call
        # does not overwrite what this one returned. Outputs come in the model's order.
        return list(request.infer(feeds).to_tuple())

    return run_openvino


def _openvino_info(ref: ArtifactRef, threads: int, device: str | None) -> dict[str, Any]:
    import openvino

    precision = _OPENVINO_PRECISIONS.pop(_openvino_key(ref, threads), None)
    if precision is None:
        precision = compiled_precision(compile_openvino(ref, threads))
    return {
        "name": "openvino",
        "version": openvino.get_version(),
        "device": "cpu",
        "inference_precision": precision,
        "inference_precision_hint": ref.meta.get("inference_precision", "auto"),
        "threads": threads,
    }


# -- LiteRT and TensorFlow -------------------------------------------------------------------------


def _load_tflite(ref: ArtifactRef, threads: int, device: str | None) -> Runner:
    from worker.litert import TfliteRunner

    return TfliteRunner(ref.path, threads=threads, layout=ref.meta.get("io_layout", "nchw"))


def _tflite_info(ref: ArtifactRef, threads: int, device: str | None) -> dict[str, Any]:
    from importlib.metadata import version

    from worker.litert import delegate_coverage

    return {
        "name": "litert",
        "version": version("ai-edge-litert"),
        "device": "cpu",
        **delegate_coverage(ref.path, threads),
    }


def _needs_module(module: str, package: str) -> Callable[[ArtifactRef], str | None]:
    return lambda ref: None if find_spec(module) is not None else f"needs {package}; this worker has none"


def _load_tf(ref: ArtifactRef, threads: int, device: str | None) -> Runner:
    from worker.tf_models import tf_runner

    return tf_runner(ref)


def _tf_info(ref: ArtifactRef, threads: int, device: str | None) -> dict[str, Any]:
    from worker.tf_models import import_tensorflow

    return {"name": "tensorflow", "version": import_tensorflow().__version__, "device": "cpu"}


# -- TensorRT --------------------------------------------------------------------------------------


def _load_engine(ref: ArtifactRef, threads: int, device: str | None) -> Runner:
    from worker.tensorrt_backend import EngineRunner

    return EngineRunner(ref.path)


def _engine_info(ref: ArtifactRef, threads: int, device: str | None) -> dict[str, Any]:
    return _torch_info("cuda", name="tensorrt", version=ref.meta.get("tensorrt"), precision=ref.meta.get("precision"))


def _engine_unavailable(ref: ArtifactRef) -> str | None:
    """Engines run only on the GPU model and TensorRT version they were built for."""
    if not gpu_available():
        return NO_GPU
    if find_spec("tensorrt") is None:
        return "needs TensorRT; this worker has none"
    from worker.devices import detect_gpu

    gpu = detect_gpu()
    if ref.meta.get("compute_capability") and gpu["compute_capability"] != ref.meta["compute_capability"]:
        return (
            f"built for {ref.meta.get('gpu_name')} (sm {ref.meta['compute_capability']}); this worker has "
            f"{gpu['name']} (sm {gpu['compute_capability']})"
        )
    return None


# -- torch: modules, AOTInductor packages ----------------------------------------------------------


def _load_aoti(ref: ArtifactRef, threads: int, device: str | None) -> Runner:
    import torch

    from worker.gpu_compile import load_aoti

    torch.set_num_threads(threads)
    return TorchRunner(load_aoti(ref.path), ref.meta.get("device", "cuda"))


def _aoti_info(ref: ArtifactRef, threads: int, device: str | None) -> dict[str, Any]:
    return _torch_info(
        device or ref.meta.get("device") or "cpu", name="aotinductor", precision=ref.meta.get("precision")
    )


def _load_module(ref: ArtifactRef, threads: int, device: str | None) -> Runner:
    import torch

    from worker.torch_models import load_module

    torch.set_num_threads(threads)
    module = load_module(ref)
    device = device or ref.meta.get("device") or "cpu"
    if ref.meta.get("compile_at_load"):
        from worker.gpu_compile import compile_at_load

        return TorchRunner(compile_at_load(module, device), device)
    return TorchRunner(module.to(device), device)


def _module_info(ref: ArtifactRef, threads: int, device: str | None) -> dict[str, Any]:
    on = device or ref.meta.get("device") or "cpu"
    if ref.meta.get("compile_at_load"):
        return _torch_info(on, name="torch.compile", precision=ref.meta.get("precision"))
    return _torch_info(on)


def _torch_info(on: str, **facts: Any) -> dict[str, Any]:
    """torch's facts on device ``on`` (and its GPU's name), overridden by ``facts``."""
    import torch

    info: dict[str, Any] = {"name": "torch", "version": torch.__version__, "device": on, **facts}
    if on == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


_TORCH_MODULE = Runtime(_load_module, _module_info)
_TENSORFLOW = Runtime(_load_tf, _tf_info, _needs_module("tensorflow", "TensorFlow"))
RUNTIMES: dict[str, Runtime] = {
    ONNX: Runtime(_load_onnx, _onnx_info),
    OPENVINO_IR: Runtime(_load_openvino, _openvino_info, _needs_module("openvino", "OpenVINO")),
    TFLITE: Runtime(_load_tflite, _tflite_info, _needs_module("ai_edge_litert", "ai-edge-litert")),
    KERAS: _TENSORFLOW,
    SAVED_MODEL: _TENSORFLOW,
    TENSORRT_ENGINE: Runtime(_load_engine, _engine_info, _engine_unavailable),
    AOTI_PACKAGE: Runtime(_load_aoti, _aoti_info),
    TORCHSCRIPT: _TORCH_MODULE,
    EXPORTED_PROGRAM: _TORCH_MODULE,
    STATE_DICT: _TORCH_MODULE,
}


def _flatten(out: Any) -> list[np.ndarray]:
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [a for o in out for a in _flatten(o)]
    return [out.detach().cpu().numpy()]


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


def pad_batch(x: np.ndarray, batch: int) -> np.ndarray:
    """``x`` with copies of its last sample appended up to ``batch`` rows: a fixed-batch model's
    last, short batch (a repeat changes no calibrated min/max, and its outputs are dropped)."""
    short = batch - len(x)
    return np.concatenate([x, np.repeat(x[-1:], short, axis=0)]) if short > 0 else x


def run_in_fixed_batches(run: Runner, feeds: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
    """``run``'s outputs for every sample of ``feeds``, for a model that takes exactly ``batch``
    samples: run ``batch`` at a time, the last chunk padded (pad_batch) and its padding's outputs
    dropped."""
    n = len(next(iter(feeds.values())))
    chunks = []
    for i in range(0, n, batch):
        part = {k: v[i : i + batch] for k, v in feeds.items()}
        real = len(next(iter(part.values())))
        chunks.append([out[:real] for out in run({k: pad_batch(v, batch) for k, v in part.items()})])
    return [np.concatenate(outputs) for outputs in zip(*chunks, strict=True)]


class BatchRunner:
    """A variant fed batches of any size, returning every output with a leading batch axis (or
    PerSample). The whole batch is tried first; a model that refuses that size (exports with the
    batch fixed at 1 are common) runs ``model_batch`` samples at a time from then on, the last chunk
    padded with copies of its last sample (run_in_fixed_batches), so no sample is ever dropped.

    Batch-less outputs (post-NMS detections of one image, boxes (K, 4)) are decided once, from the
    ranks of the first outputs, and then run a sample at a time, each output given its batch axis:
    deciding per call from sizes would read one detection's (1, 4) boxes as a batch of one."""

    def __init__(
        self, run: Runner, input_name: str, model_batch: int | None = None, *, batchless: bool | None = None
    ) -> None:
        self.run, self.input_name = run, input_name
        self.model_batch = max(int(model_batch or 1), 1)
        self.batchless = batchless
        self.split = bool(batchless)

    def __call__(self, x: np.ndarray) -> list[np.ndarray] | PerSample:
        if not self.split:
            try:
                outputs = self.run({self.input_name: x})
            except Exception as exc:  # runtimes raise their own types for a batch size they refuse
                if is_out_of_memory(exc) or len(x) == self.model_batch:
                    raise
                self.split = True
            else:
                if self._decide_batchless(outputs):
                    if len(x) == 1:
                        return [o[None] for o in outputs]
                    self.split = True  # one image's detections came back for the whole batch: not usable
                else:
                    return list(outputs)
        if self.batchless or self.model_batch == 1:
            return self._one_at_a_time(x)
        return run_in_fixed_batches(self.run, {self.input_name: x}, self.model_batch)

    def _decide_batchless(self, outputs: list[np.ndarray]) -> bool:
        if self.batchless is None:
            self.batchless = batchless_post_nms([o.shape for o in outputs])
        return self.batchless

    def _one_at_a_time(self, x: np.ndarray) -> list[np.ndarray] | PerSample:
        per_sample = []
        for i in range(len(x)):
            outputs = self.run({self.input_name: x[i : i + 1]})
            per_sample.append([o[None] for o in outputs] if self._decide_batchless(outputs) else list(outputs))
        if any(len({p[k].shape for p in per_sample}) > 1 for k in range(len(per_sample[0]))):
            return PerSample(per_sample)  # a detection count that varies by image
        return [np.concatenate(parts) for parts in zip(*per_sample, strict=True)]
