"""The LiteRT (TensorFlow Lite) interpreter: run a ``.tflite`` the way a phone app does (XNNPACK
delegate on the CPU), and say how much of the graph the delegate took.

The only module that imports ``ai_edge_litert``; it is imported lazily by the passes and the
runtime, so the API never loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

XNNPACK = "XNNPACK"


def _interpreter(path: Path, threads: int, *, delegate: bool = True):
    from ai_edge_litert import interpreter as litert

    resolver = litert.OpResolverType.AUTO if delegate else litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interp = litert.Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver)
    interp.allocate_tensors()
    return interp


def delegate_coverage(path: Path, threads: int = 1) -> dict[str, Any]:
    """Which of the model's ops the default delegate (XNNPACK) runs and which fall back to the
    interpreter's own kernels.

    The interpreter keeps the model's nodes and appends one DELEGATE node per partition it
    handed to XNNPACK; a partition covers every node between the delegate node's inputs and its
    outputs, found by walking back from its outputs through their producers.
    """
    interp = _interpreter(path, threads)
    ops = interp._get_ops_details()  # noqa: SLF001 - the interpreter's only per-node view
    model_ops = [op for op in ops if op["op_name"] != "DELEGATE"]
    producer = {int(t): op["index"] for op in model_ops for t in op["outputs"]}
    by_index = {op["index"]: op for op in model_ops}
    covered: set[int] = set()
    partitions = 0
    for node in (op for op in ops if op["op_name"] == "DELEGATE"):
        partitions += 1
        boundary = {int(t) for t in node["inputs"]}
        stack = [int(t) for t in node["outputs"]]
        while stack:
            tensor = stack.pop()
            index = producer.get(tensor)
            if index is None or index in covered or tensor in boundary:
                continue
            covered.add(index)
            stack.extend(int(t) for t in by_index[index]["inputs"] if int(t) >= 0 and int(t) not in boundary)
    fallback = sorted({by_index[i]["op_name"] for i in by_index if i not in covered})
    return {
        "delegate": XNNPACK if partitions else None,
        "ops": len(model_ops),
        "ops_delegated": len(covered),
        "ops_fallback": len(model_ops) - len(covered),
        "fallback_op_types": fallback,
        "partitions": partitions,
    }


def io_details(path: Path) -> dict[str, Any]:
    interp = _interpreter(path, 1, delegate=False)

    def describe(d: dict) -> dict:
        scale, zero = d["quantization"]
        return {
            "name": d["name"],
            "shape": [int(v) for v in d["shape"]],
            "dtype": np.dtype(d["dtype"]).name,
            "quantization": {"scale": float(scale), "zero_point": int(zero)} if scale else None,
        }

    return {
        "inputs": [describe(d) for d in interp.get_input_details()],
        "outputs": [describe(d) for d in interp.get_output_details()],
    }


class TfliteRunner:
    """Runs a ``.tflite`` on NCHW float feeds like every other runner: inputs are transposed to
    the model's layout (``nhwc``: transposed from NCHW; ``nchw`` or ``source``: as given) and
    quantized when its I/O is integer, outputs dequantized. A batch
    other than the model's is tried by resizing the input; a graph that cannot be resized
    raises, and callers split the batch."""

    def __init__(self, path: Path, *, threads: int = 1, layout: str = "nchw") -> None:
        self.interp = _interpreter(path, threads)
        self.layout = layout
        self.inputs = self.interp.get_input_details()
        self.outputs = self.interp.get_output_details()
        self.shapes = [tuple(int(v) for v in d["shape"]) for d in self.inputs]

    def _prepare(self, value: np.ndarray, detail: dict) -> np.ndarray:
        if self.layout == "nhwc" and value.ndim == 4:
            value = value.transpose(0, 2, 3, 1)
        dtype = np.dtype(detail["dtype"])
        scale, zero = detail["quantization"]
        if dtype.kind in "iu" and scale:
            info = np.iinfo(dtype)
            value = np.clip(np.round(value / scale) + zero, info.min, info.max)
        return np.ascontiguousarray(value.astype(dtype, copy=False))

    def _resize(self, shapes: list[tuple]) -> None:
        previous = self.shapes
        try:
            for detail, shape in zip(self.inputs, shapes, strict=True):
                self.interp.resize_tensor_input(detail["index"], list(shape), strict=False)
            self.interp.allocate_tensors()
            self.shapes = shapes
        except (RuntimeError, ValueError):
            # A graph with the batch baked into a reshape cannot take another batch size; put
            # the shapes back so that the next call at the model's own batch still runs.
            for detail, shape in zip(self.inputs, previous, strict=True):
                self.interp.resize_tensor_input(detail["index"], list(shape), strict=False)
            self.interp.allocate_tensors()
            raise

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        values = [self._prepare(v, d) for v, d in zip(feeds.values(), self.inputs, strict=True)]
        shapes = [tuple(v.shape) for v in values]
        if shapes != self.shapes:
            self._resize(shapes)
        for detail, value in zip(self.inputs, values, strict=True):
            self.interp.set_tensor(detail["index"], value)
        self.interp.invoke()
        results = []
        for detail in self.outputs:
            out = self.interp.get_tensor(detail["index"])
            scale, zero = detail["quantization"]
            if np.dtype(detail["dtype"]).kind in "iu" and scale:
                out = (out.astype(np.float32) - zero) * scale
            results.append(np.array(out, dtype=np.float32))
        return results
