"""Everything that touches ``tensorrt``: parse (pre-flight), build, and run an engine.

Written against TensorRT 10's Python API (explicit batch networks, ``build_serialized_network``,
named I/O tensors with ``set_tensor_address``/``execute_async_v3``, explicit quantization from
Q/DQ nodes). TensorRT cannot be installed on the development machines (NVIDIA's index, no GPU),
so this module is exercised on GPU workers only; the decisions it carries out are made and
tested in ``worker.passes.build_tensorrt``. Device buffers come from torch, which every GPU
worker has, so no pycuda is needed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from core.errors import PassError


def _trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise PassError(
            "TensorRT is not installed on this worker: run GPU jobs on the GPU worker image "
            "(Dockerfile.worker --target gpu)",
            code="tensorrt_missing",
        ) from exc
    return trt


def version() -> str:
    return _trt().__version__


class _Logger:
    """A TensorRT logger that forwards to ``logging`` (warnings and errors only)."""

    def __new__(cls, log: logging.Logger):
        trt = _trt()

        class Forward(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity, msg) -> None:  # noqa: A003 - TensorRT's interface
                if severity <= trt.ILogger.Severity.ERROR:
                    log.error("tensorrt: %s", msg)
                elif severity <= trt.ILogger.Severity.WARNING:
                    log.warning("tensorrt: %s", msg)

        return Forward()


# When the parser fails without saying where.
_PARSE_FAILED = {"node": -1, "node_name": "", "op_type": "", "message": "parse failed"}


def _parse(path: Path, log: logging.Logger):
    trt = _trt()
    logger = _Logger(log)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit batch
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        errors.append(
            {
                "node": err.node(),
                "node_name": err.node_name(),
                "op_type": err.node_operator(),
                "message": err.desc(),
                "code": str(err.code()),
            }
        )
    return builder, network, parser, logger, ok, errors


def unsupported_ops(path: Path, log: logging.Logger | None = None) -> list[dict[str, Any]]:
    """Parse the model with TensorRT's ONNX parser; every node it refuses, with its op type."""
    _builder, _network, _parser, _logger, ok, errors = _parse(path, log or logging.getLogger("cvopt.tensorrt"))
    return [] if ok else (errors or [_PARSE_FAILED])


def build_engine(
    onnx_path: Path,
    out: Path,
    *,
    plan,
    profiles,
    workspace_mib: int,
    optimization_level: int,
    timing_cache: Path | None,
    log: logging.Logger,
) -> dict[str, Any]:
    trt = _trt()
    builder, network, _parser, _logger, ok, errors = _parse(onnx_path, log)
    if not ok:  # the pre-flight: nothing is built for a model TensorRT cannot parse
        errors = errors or [_PARSE_FAILED]
        ops = sorted({e["op_type"] for e in errors if e.get("op_type")})
        raise PassError(
            f"TensorRT {trt.__version__} cannot parse {len(errors)} node(s) of this model (ops: "
            f"{', '.join(ops) or 'see details'})",
            code="tensorrt_unsupported_ops",
            details={"unsupported": errors[:50]},
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.builder_optimization_level = optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))

    pinned = set(plan.fp32_layers)
    if pinned:
        # The parser names each layer after its ONNX node (with a suffix for multi-layer nodes).
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if any(layer.name == n or layer.name.startswith(n + "_") or layer.name.startswith(n + " ") for n in pinned):
                layer.precision = trt.float32
                for k in range(layer.num_outputs):
                    if layer.get_output(k).dtype in (trt.float32, trt.float16):
                        layer.set_output_type(k, trt.float32)

    dynamic = any(-1 in tuple(network.get_input(i).shape) for i in range(network.num_inputs))
    if dynamic:
        for profile_plan in profiles:
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profile_plan.shapes.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)

    cache, blob = None, b""
    if timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.exists() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PassError("TensorRT failed to build the engine (see the log tail)", code="tensorrt_build_failed")
    out.write_bytes(bytes(serialized))
    if cache is not None:
        timing_cache.write_bytes(bytes(cache.serialize()))
    engine = trt.Runtime(_Logger(log)).deserialize_cuda_engine(bytes(serialized))
    layers = _layer_precisions(engine)
    return {
        "build_seconds": round(time.perf_counter() - started, 2),
        "dynamic_shapes": dynamic,
        "layers": len(layers),
        "layer_precisions": _count(layers),
        "timing_cache_reused": bool(blob),
    }


def _layer_precisions(engine) -> list[str]:
    import json

    trt = _trt()
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    out = []
    for layer in info.get("Layers", []):
        if isinstance(layer, dict):
            outputs = layer.get("Outputs") or [{}]
            out.append(str(outputs[0].get("Format/Datatype", "unknown")))
    return out


def _count(values: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        key = "int8" if "Int8" in v else "fp16" if "Half" in v else "fp32" if "Float" in v else v
        counts[key] = counts.get(key, 0) + 1
    return counts


class EngineRunner:
    """Runs an engine on the GPU: numpy in, numpy out like every runner, plus ``time_ms`` which
    times the engine alone with CUDA events on device-resident inputs."""

    def __init__(self, path: Path, log: logging.Logger | None = None) -> None:
        import torch

        trt = _trt()
        self.torch = torch
        self.runtime = trt.Runtime(_Logger(log or logging.getLogger("cvopt.tensorrt")))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise PassError("the engine does not load on this GPU / TensorRT version", code="engine_incompatible")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: torch.from_numpy(_np_zero(trt.nptype(self.engine.get_tensor_dtype(n)))).dtype for n in names}
        self.stream = torch.cuda.Stream()

    def _bind(self, tensors: list) -> list:
        for name, tensor in zip(self.inputs, tensors, strict=True):
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = self.torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        return outs

    def _device_inputs(self, feeds: dict) -> list:
        return [
            self.torch.from_numpy(v).to("cuda", dtype=self.dtypes[n]).contiguous()
            for n, v in zip(self.inputs, feeds.values(), strict=True)
        ]

    def __call__(self, feeds: dict) -> list:
        tensors = self._device_inputs(feeds)
        outs = self._bind(tensors)
        with self.torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise PassError("TensorRT execution failed", code="tensorrt_run_failed")
        self.stream.synchronize()
        return [o.float().cpu().numpy() for o in outs]

    def time_ms(self, feeds: dict, *, runs: int, warmup: int) -> list[float]:
        tensors = self._device_inputs(feeds)
        self._bind(tensors)
        handle = self.stream.cuda_stream
        for _ in range(warmup):
            self.context.execute_async_v3(handle)
        samples = []
        start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
        for _ in range(runs):
            start.record(self.stream)
            self.context.execute_async_v3(handle)
            end.record(self.stream)
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return samples


def _np_zero(dtype):
    import numpy as np

    return np.zeros(1, dtype=dtype)
