"""``cvopt doctor``: what this worker can run, found by running it.

Without ``--gpu``: the CPU, and each runtime the passes use: ONNX Runtime, OpenVINO and torch run a
tiny convolution and must get its known answer; LiteRT and TensorFlow must import.

With ``--gpu`` (on a GPU worker): the GPU and its queues, then the service's own GPU steps on a
ResNet-18 (torchvision's, random weights with BatchNorm statistics from random batches, so that
activations have a trained model's scale), each artifact loaded by the runtime as a job would,
checked against the FP32 model and timed with CUDA events at batch 1 and 8:

  compile_gpu          the FP16 AOTInductor package (checked in a child process by the step)
  compile_gpu fallback the FP16 ExportedProgram compiled at load (torch.compile, CUDA graphs)
  tensorrt             which TensorRT imports
  tensorrt fp16        export_onnx, then build_tensorrt fp16
  tensorrt int8        export_onnx, quantize_int8 as preset tensorrt-int8 has it (symmetric Q/DQ,
                       calibrated on random images), then build_tensorrt int8

Every check says ok, fail (and why) or skip (and what it waits for); the exit status is 1 when a
check failed. The TensorRT checks are the first place engines are built from the service's own
artifacts: TensorRT cannot be installed on the machines this code is developed on.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("cvopt.doctor")

OK, FAIL, SKIP = "ok", "fail", "skip"
TIMED_BATCHES = (1, 8)
INPUT_SHAPE = (3, 224, 224)
# Below these the artifact is not a usable FP16 / INT8 rendering of the model (SNR of the logits).
MIN_SNR_DB = {"fp16": 30.0, "int8": 12.0}


@dataclass
class Check:
    name: str
    status: str
    detail: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def run_checks(*, gpu: bool, gpu_kind: str = "") -> list[Check]:
    """Every check, in order; GPU checks when ``gpu`` (``gpu_kind``: CVOPT_GPU_KIND, if set)."""
    checks = runtime_checks()
    if gpu:
        with tempfile.TemporaryDirectory(prefix="cvopt-doctor-") as tmp:
            checks += gpu_checks(Path(tmp), gpu_kind=gpu_kind)
    return checks


def _timed_check(
    name: str, fn: Callable[[], tuple[str, dict[str, Any]]], optional: tuple[str, str] | None = None
) -> Check:
    """Run ``fn`` -> (detail, facts) as check ``name``: ok, or fail with the exception. ``optional``
    is (module, extra) for a runtime that an install may leave out: its absence is a skip."""
    t0 = time.perf_counter()
    try:
        detail, facts = fn()
        status = OK
    except Exception as exc:  # a doctor reports every failure; it never stops at one
        if optional and isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == optional[0]:
            return Check(name, SKIP, f"not installed (pip extra [{optional[1]}])")
        log.debug("check %s failed", name, exc_info=True)
        code = getattr(exc, "code", None)
        detail, status = f"{type(exc).__name__}{f' ({code})' if code else ''}: {exc}"[:600], FAIL
        facts = {"traceback": traceback.format_exc()[-2000:]}
    return Check(name, status, detail, facts, round(time.perf_counter() - t0, 1))


# -- the CPU side ------------------------------------------------------------------------------------


def _probe_cpu() -> tuple[str, dict[str, Any]]:
    from worker.passes.benchmark import cpu_name
    from worker.quantization.graph import cpu_has_vnni

    info = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "vnni": cpu_has_vnni()}
    info["python"] = platform.python_version()
    return f"{info['cpu']}, {info['cpu_count']} cores, VNNI {'yes' if info['vnni'] else 'no'}", info


def runtime_checks() -> list[Check]:
    checks = [_timed_check("cpu", _probe_cpu)]
    for name, (probe, module, extra) in RUNTIME_PROBES.items():
        checks.append(_timed_check(name, probe, optional=(module, extra)))
    return checks


def _tiny_onnx(path: Path) -> Path:
    """A 1x3x8x8 conv + relu ONNX model, written with onnx's helpers."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((4, 3, 3, 3), 0.1, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _ones_feed():
    import numpy as np

    return np.ones((1, 3, 8, 8), np.float32)


def _expect_tiny(y) -> None:
    # Every interior output is 27 * 0.1 = 2.7 (3x3x3 ones times 0.1).
    if not math.isclose(float(y[0, 0, 4, 4]), 2.7, rel_tol=1e-3):
        raise RuntimeError(f"the tiny model ran but gave {float(y[0, 0, 4, 4])}, not 2.7")


def _probe_onnxruntime() -> tuple[str, dict[str, Any]]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        session = ort.InferenceSession(str(_tiny_onnx(Path(tmp) / "t.onnx")), providers=["CPUExecutionProvider"])
        _expect_tiny(session.run(None, {"x": _ones_feed()})[0])
    providers = ort.get_available_providers()
    return f"{ort.__version__}, providers {', '.join(providers)}", {"version": ort.__version__, "providers": providers}


def _probe_openvino() -> tuple[str, dict[str, Any]]:
    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        compiled = core.compile_model(core.read_model(str(_tiny_onnx(Path(tmp) / "t.onnx"))), "CPU")
        _expect_tiny(next(iter(compiled([_ones_feed()]).values())))
    devices = core.available_devices
    return f"{ov.__version__}, devices {', '.join(devices)}", {"version": ov.__version__, "devices": devices}


def _probe_litert() -> tuple[str, dict[str, Any]]:
    from importlib.metadata import version

    from ai_edge_litert.interpreter import Interpreter  # noqa: F401 - importing is the check

    return version("ai-edge-litert"), {"version": version("ai-edge-litert")}


def _probe_tensorflow() -> tuple[str, dict[str, Any]]:
    from worker.tf_models import import_tensorflow

    tf = import_tensorflow()
    return tf.__version__, {"version": tf.__version__}


def _probe_torch() -> tuple[str, dict[str, Any]]:
    import torch

    y = torch.nn.functional.conv2d(torch.ones(1, 3, 8, 8), torch.full((4, 3, 3, 3), 0.1), padding=1).relu()
    _expect_tiny(y.numpy())
    cuda = torch.cuda.is_available()
    return f"{torch.__version__}, CUDA {'yes' if cuda else 'no'}", {"version": torch.__version__, "cuda": cuda}


# name -> (probe, the module whose absence means "not installed", the pip extra that installs it)
RUNTIME_PROBES: dict[str, tuple[Callable[[], tuple[str, dict[str, Any]]], str, str]] = {
    "onnxruntime": (_probe_onnxruntime, "onnxruntime", "worker"),
    "openvino": (_probe_openvino, "openvino", "worker"),
    "litert": (_probe_litert, "ai_edge_litert", "tflite"),
    "tensorflow": (_probe_tensorflow, "tensorflow", "tflite"),
    "torch": (_probe_torch, "torch", "torch"),
}


# -- the GPU side ------------------------------------------------------------------------------------


def gpu_checks(
    work_dir: Path, *, gpu_kind: str = "", device: str = "cuda", precision: str = "fp16", size: int = 224
) -> list[Check]:
    """The GPU checks. ``device="cpu"`` runs the compile checks' logic on the CPU (FP32 packages,
    perf_counter timing), for the tests; the TensorRT checks need CUDA either way."""
    from worker.devices import detect_gpu

    checks: list[Check] = []
    if device == "cuda":

        def probe_gpu() -> tuple[str, dict[str, Any]]:
            gpu = detect_gpu(gpu_kind)
            if gpu is None:
                raise RuntimeError("torch sees no CUDA GPU on this machine")
            queues = ["gpu", f"gpu.{gpu['kind']}"]
            memory = f"{gpu['memory_gib']} GiB"
            detail = f"{gpu['name']} (sm {gpu['compute_capability']}, {memory}), queues {', '.join(queues)}"
            return detail, {**gpu, "queues": queues}

        checks.append(_timed_check("gpu", probe_gpu))
        if checks[-1].status != OK:
            return checks + [Check(name, SKIP, "needs a CUDA GPU") for name in GPU_CHECK_NAMES[1:]]
    fixture = _Fixture(work_dir, device=device, size=size)
    for package, name in (("aoti", "compile_gpu"), ("exported_program", "compile_gpu fallback")):
        checks.append(_timed_check(name, lambda p=package: fixture.compile_gpu(p, precision)))
    trt = _timed_check("tensorrt", _tensorrt_version) if device == "cuda" else Check("tensorrt", SKIP, "needs CUDA")
    checks.append(trt)
    for precision_ in ("fp16", "int8"):
        name = f"tensorrt {precision_}"
        if trt.status != OK:
            checks.append(Check(name, SKIP, "needs TensorRT"))
        else:
            checks.append(_timed_check(name, lambda p=precision_: fixture.tensorrt(p)))
    return checks


GPU_CHECK_NAMES = ("gpu", "compile_gpu", "compile_gpu fallback", "tensorrt", "tensorrt fp16", "tensorrt int8")


def _tensorrt_version() -> tuple[str, dict[str, Any]]:
    from worker import tensorrt_backend

    version = tensorrt_backend.version()  # PassError (tensorrt_missing) when it does not import
    return version, {"version": version}


class _Fixture:
    """The model the GPU checks run the steps on: torchvision's ResNet-18 as a state_dict upload."""

    def __init__(self, work_dir: Path, *, device: str, size: int) -> None:
        self.work_dir, self.device = Path(work_dir), device
        self.spec = [{"name": "x", "shape": [1, 3, size, size], "dtype": "float32"}]
        self._original = None
        self._onnx = None
        self._sources: dict[str, Any] = {}

    @property
    def original(self):
        if self._original is None:
            import torch
            import torchvision

            from worker.gpu_compile import batch_norm_statistics_from
            from worker.passes.base import ArtifactRef

            torch.manual_seed(0)
            shape = self.spec[0]["shape"][1:]
            model = batch_norm_statistics_from(torchvision.models.resnet18(weights=None), lambda: torch.rand(8, *shape))
            path = self.work_dir / "resnet18.pt"
            torch.save(model.state_dict(), path)
            self._original = ArtifactRef("resnet18.pt", "state_dict", path, meta={"architecture": "resnet18"})
        return self._original

    def context(self, step: str, **kw):
        from core.schemas import Preprocessing
        from worker.passes.base import PassContext

        work = self.work_dir / step
        work.mkdir(parents=True, exist_ok=True)
        return PassContext(
            work_dir=work,
            original=self.original,
            artifacts=[],
            input_spec=self.spec,
            preprocessing=Preprocessing(),
            log=log,
            **kw,
        )

    def run_step(self, step: str, source, ctx=None, **config):
        from worker.passes.base import ArtifactRef
        from worker.passes.registry import get_pass

        cls = get_pass(step)
        result = cls().run(ctx or self.context(step), source, cls.Config(**config))
        return ArtifactRef(
            result.artifact.name, result.format, result.artifact, step=step, meta=dict(result.meta)
        ), result

    def feeds(self, batch: int) -> dict:
        import numpy as np

        rng = np.random.default_rng(batch)
        return {"x": rng.random((batch, *self.spec[0]["shape"][1:]), dtype=np.float32)}

    def reference(self, feeds: dict):
        import torch

        from worker.torch_models import load_module

        with torch.no_grad():
            return load_module(self.original)(torch.from_numpy(feeds["x"])).numpy()

    def measure(self, ref, floor: float) -> tuple[str, dict[str, Any]]:
        """Load ``ref`` with the runtime, check it against the FP32 model, time it."""
        from worker.metrics.fidelity import snr_db
        from worker.runtime import load_runner, runtime_info

        t0 = time.perf_counter()
        runner = load_runner(ref, device=self.device)
        facts: dict[str, Any] = {"format": ref.format, "runtime": runtime_info(ref, device=self.device)}
        timings, snrs = {}, {}
        for batch in TIMED_BATCHES:
            feeds = self.feeds(batch)
            got = runner(feeds)[0]
            if batch == TIMED_BATCHES[0]:
                facts["load_and_first_run_seconds"] = round(time.perf_counter() - t0, 1)
            snrs[batch] = round(snr_db(self.reference(feeds), got), 1)
            if snrs[batch] < floor:  # every batch: an open batch runs other kernels (and another CUDA graph)
                raise RuntimeError(
                    f"it runs but disagrees with the FP32 model at batch {batch}: SNR {snrs[batch]:g} dB < {floor:g}"
                )
            time_ms = getattr(runner, "time_ms", None)
            if time_ms is not None:  # CUDA events on device-resident inputs
                samples = time_ms(feeds, runs=20, warmup=5)
            else:
                samples = []
                for _ in range(5):
                    t1 = time.perf_counter()
                    runner(feeds)
                    samples.append((time.perf_counter() - t1) * 1000)
            timings[batch] = round(sorted(samples)[len(samples) // 2], 3)
        facts["snr_db"] = min(snrs.values())
        facts["snr_db_per_batch"] = snrs
        facts["p50_ms"] = timings
        clock = "CUDA events" if getattr(runner, "time_ms", None) is not None else "perf_counter"
        shown = ", ".join(f"b{b} {ms:.2f} ms" for b, ms in timings.items())
        return f"SNR {facts['snr_db']:g} dB vs FP32; {shown} ({clock})", facts

    def compile_gpu(self, package: str, precision: str) -> tuple[str, dict[str, Any]]:
        ref, result = self.run_step(
            "compile_gpu",
            self.original,
            self.context(f"compile_gpu-{package}"),
            device=self.device,
            precision=precision,
            package=package,
            max_batch=max(TIMED_BATCHES),
        )
        if package == "aoti" and ref.format != "aoti_package":
            raise RuntimeError(result.metrics.get("warning", "the step did not make an AOTInductor package"))
        floor = result.metrics.get("min_snr_db", MIN_SNR_DB["fp16"])
        detail, facts = self.measure(ref, floor)
        facts["step"] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str, bool))}
        return f"{ref.format}, {detail}", facts

    def onnx(self):
        if self._onnx is None:
            self._onnx, _ = self.run_step("export_onnx", self.original)
        return self._onnx

    def tensorrt_source(self, precision: str):
        """The ONNX model build_tensorrt takes, as the presets make it: the export (tensorrt-fp16), or
        the export quantized as preset tensorrt-int8 quantizes it (symmetric Q/DQ)."""
        if precision not in self._sources:
            source = self.onnx()
            if precision == "int8":
                from core.recipes import PRESETS

                (step,) = [s for s in PRESETS["tensorrt-int8"] if s.name == "quantize_int8"]
                calibration = self._calibration()
                source, _ = self.run_step(
                    "quantize_int8",
                    source,
                    self.context("quantize_int8", calibration_dataset=calibration),
                    **{**step.config, "num_calibration_samples": calibration.num_samples},
                )
            self._sources[precision] = source
        return self._sources[precision]

    def tensorrt(self, precision: str) -> tuple[str, dict[str, Any]]:
        engine, result = self.run_step(
            "build_tensorrt",
            self.tensorrt_source(precision),
            self.context(f"build_tensorrt-{precision}"),
            precision=precision,
        )
        detail, facts = self.measure(engine, MIN_SNR_DB[precision])
        facts["engine"] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str, bool))}
        return f"{engine.path.name}, {detail}", facts

    def _calibration(self):
        import numpy as np

        from worker.passes.base import DatasetRef

        path = self.work_dir / "calibration.npz"
        shape = self.spec[0]["shape"][1:]
        np.savez(path, x=np.random.default_rng(0).random((32, *shape), dtype=np.float32))
        return DatasetRef(path, "npz", labeled=False, num_samples=32, layout="NCHW", sample_shape=list(shape))


# -- output ------------------------------------------------------------------------------------------


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [
        f"{c.status:<4}  {c.name:<{width}}  {c.detail}" + (f"  [{c.seconds:g} s]" if c.seconds >= 1 else "")
        for c in checks
    ]
    failed = [c.name for c in checks if c.status == FAIL]
    lines.append(
        f"{len(checks) - len(failed)} of {len(checks)} checks passed or skipped"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return "\n".join(lines)


def as_json(checks: list[Check]) -> list[dict[str, Any]]:
    return [
        {"name": c.name, "status": c.status, "detail": c.detail, "seconds": c.seconds, "facts": c.facts} for c in checks
    ]
