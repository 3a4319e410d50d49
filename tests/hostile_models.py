"""ONNX models that attack the worker rather than its inputs: one that asks for more memory
than any step may have, one that never finishes. Built with onnx.helper, nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 8, 8])
OUTPUT = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hostile")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def memory_bomb(path: Path, gib: int = 16) -> Path:
    """Expands the input into a tensor of ``gib`` GiB on every run (the size is taken from the
    input's shape at run time, so no optimizer can fold it away), then sums it."""
    elements = gib * 2**30 // 4
    side = int(np.sqrt(elements // 64))
    nodes = [
        helper.make_node("Shape", ["image"], ["image_shape"]),
        helper.make_node("Mul", ["image_shape", "blow_up"], ["big_shape"]),
        helper.make_node("Expand", ["image", "big_shape"], ["big"]),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Reshape", ["total", "one_dim"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([side, side, 1, 1], np.int64), "blow_up"),
        numpy_helper.from_array(np.array([1], np.int64), "one_dim"),
    ]
    return _save(helper.make_graph(nodes, "memory_bomb", [INPUT], [OUTPUT], inits), path)


def endless_loop(path: Path) -> Path:
    """A Loop of 2**62 iterations: a model that hangs whoever runs it."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "step"], ["v_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1]),
        ],
        [numpy_helper.from_array(np.array([1.0], np.float32), "step")],
    )
    nodes = [
        helper.make_node("ReduceSum", ["image"], ["total"], keepdims=0),
        helper.make_node("Reshape", ["total", "one_dim"], ["start"]),
        helper.make_node("Loop", ["trips", "yes", "start"], ["logits"], body=body),
    ]
    inits = [
        numpy_helper.from_array(np.array(2**62, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "yes"),
        numpy_helper.from_array(np.array([1], np.int64), "one_dim"),
    ]
    return _save(helper.make_graph(nodes, "endless_loop", [INPUT], [OUTPUT], inits), path)
