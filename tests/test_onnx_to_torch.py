"""worker.onnx_to_torch: ONNX graphs as trainable torch.fx modules, checked against onnxruntime.

Setup / execute / assert on the real thing: each operator in a one-node graph (and the real models
of tests/real_models.py) run by onnxruntime and by the converted module on the same inputs. The
slow layer exports the converted modules (torch.export with dynamic shapes, torch.onnx.export) and
runs what was written.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from core.errors import PassError
from core.onnx_ops import TRAINABLE_ONNX_OPS, unsupported_onnx_ops
from tests.real_models import ORIENTATION, TEXT_DETECTOR, YOLOV8N, asset
from tests.synthetic_detector import FIXTURES

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from worker.onnx_to_torch import _HANDLERS, convert_onnx, module_name  # noqa: E402

RNG = np.random.default_rng(0)
# max |torch - onnxruntime| / max |onnxruntime| the real models must stay within.
REAL_TOLERANCE = 1e-4


def _rand(*shape: int, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    return RNG.uniform(low, high, size=shape).astype(np.float32)


def _model(nodes: list, inputs: dict, consts: dict, outputs: list[str], opset: int = 17):
    graph = helper.make_graph(
        nodes,
        "test",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in inputs.items()
        ],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _op(op: str, args: list, attrs: dict | None = None, opset: int = 17, n_out: int = 1):
    """A one-node model: ``args`` are ("in", array) graph inputs, ("const", array) initializers or None
    (an absent optional input). Returns (model, feeds)."""
    names, inputs, consts = [], {}, {}
    for i, arg in enumerate(args):
        if arg is None:
            names.append("")
            continue
        kind, value = arg
        names.append(f"x{i}")
        (inputs if kind == "in" else consts)[f"x{i}"] = value
    outputs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outputs, name=f"the_{op}", **(attrs or {}))
    return _model([node], inputs, consts, outputs, opset), inputs


def _run_both(model, feeds: dict) -> tuple[list, list, object]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, feeds)
    module = convert_onnx(model)
    with torch.no_grad():
        got = module(*[torch.from_numpy(v) for v in feeds.values()])
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    return want, [g.numpy() for g in got], module


def _check(model, feeds: dict, tol: float = 1e-5):
    want, got, module = _run_both(model, feeds)
    assert len(want) == len(got)
    for w, g in zip(want, got, strict=True):
        assert g.shape == w.shape, (g.shape, w.shape)
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        if w.dtype.kind == "f":  # float32 sums in another order: relative to the output's scale
            assert np.abs(g - w).max(initial=0) <= tol * max(1.0, np.abs(w).max(initial=0)), np.abs(g - w).max()
        else:
            np.testing.assert_array_equal(g, w)
    return module


def _i64(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# -- the operator list --------------------------------------------------------------------------


def test_every_listed_operator_has_a_handler():
    assert set(_HANDLERS) == TRAINABLE_ONNX_OPS


def test_unsupported_onnx_ops_names_each_once_sorted():
    pairs = [("", "Conv"), ("", "Loop"), ("ai.onnx", "NonMaxSuppression"), ("", "Loop"), ("com.microsoft", "FusedConv")]
    assert unsupported_onnx_ops(pairs) == ["Loop", "NonMaxSuppression", "com.microsoft::FusedConv"]
    assert unsupported_onnx_ops([("", op) for op in TRAINABLE_ONNX_OPS]) == []


def test_unsupported_operators_are_refused_all_at_once():
    boxes, scores = _rand(1, 4, 4), _rand(1, 1, 4)
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, [])],
    )
    nodes = [
        helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["keep"]),
        helper.make_node("Loop", ["", "cond"], [], body=body),
        helper.make_node("Relu", ["scores"], ["r"]),
        helper.make_node("FusedConv", ["r"], ["f"], domain="com.microsoft"),
    ]
    model = _model(nodes, {"boxes": boxes, "scores": scores}, {"cond": np.array(True)}, ["keep", "f"])
    with pytest.raises(PassError) as info:
        convert_onnx(model)
    assert info.value.code == "unsupported_operators"
    wanted = ["Loop", "NonMaxSuppression", "com.microsoft::FusedConv"]
    assert info.value.details["operators"] == wanted
    assert unsupported_onnx_ops((n.domain, n.op_type) for n in model.graph.node) == wanted
    assert "NonMaxSuppression" in info.value.message


def test_module_name_rule():
    assert module_name("/model.22/cv2.0/cv2.0.2/Conv") == "model_22_cv2_0_cv2_0_2_Conv"
    assert module_name("p2o.Conv.0") == "p2o_Conv_0"
    assert module_name("0_conv") == "m_0_conv"
    assert module_name("///") == ""
    assert module_name("forward") == "forward_"
    assert module_name("class") == "class_"


def test_submodules_are_named_after_their_nodes_unique_and_with_a_fallback():
    w = _rand(4, 3, 3, 3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="/backbone.0/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w2"], ["b"], name="/backbone_0/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    model = _model(nodes, {"x": _rand(1, 3, 8, 8)}, {"w": w, "w2": _rand(4, 4, 3, 3)}, ["y"])
    module = _check(model, {"x": _rand(1, 3, 8, 8)})
    convs = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == ["backbone_0_Conv", "backbone_0_Conv_1", "Conv_2"]
    assert module.meta["onnx_module_names"] == {
        "/backbone.0/Conv": "backbone_0_Conv",
        "/backbone_0/Conv": "backbone_0_Conv_1",
    }


# -- operators one at a time against onnxruntime ------------------------------------------------

X = _rand(2, 3, 5, 6)
POS = _rand(2, 3, 5, 6, low=0.1, high=3.0)
INTS = RNG.integers(-9, 10, size=(2, 3, 4)).astype(np.int64)
NONZERO = np.where(INTS == 0, 3, INTS).astype(np.int64)
IMG = _rand(1, 4, 8, 10)

ELEMENTWISE = [
    ("Relu", [("in", X)], {}, 17),
    ("Sigmoid", [("in", X)], {}, 17),
    ("Tanh", [("in", X)], {}, 17),
    ("Exp", [("in", X)], {}, 17),
    ("Log", [("in", POS)], {}, 17),
    ("Sqrt", [("in", POS)], {}, 17),
    ("Neg", [("in", X)], {}, 17),
    ("Abs", [("in", X)], {}, 17),
    ("Reciprocal", [("in", POS)], {}, 17),
    ("Erf", [("in", X)], {}, 17),
    ("Floor", [("in", X)], {}, 17),
    ("Ceil", [("in", X)], {}, 17),
    ("Round", [("in", X * 2)], {}, 17),
    ("Sign", [("in", X)], {}, 17),
    ("Sin", [("in", X)], {}, 17),
    ("Cos", [("in", X)], {}, 17),
    ("Softplus", [("in", X)], {}, 17),
    ("Softsign", [("in", X)], {}, 17),
    ("Mish", [("in", X)], {}, 18),
    ("HardSwish", [("in", X * 3)], {}, 17),
    ("HardSigmoid", [("in", X * 3)], {"alpha": 0.3, "beta": 0.4}, 17),
    ("LeakyRelu", [("in", X)], {"alpha": 0.2}, 17),
    ("Elu", [("in", X)], {"alpha": 0.5}, 17),
    ("Gelu", [("in", X)], {}, 20),
    ("Gelu", [("in", X)], {"approximate": "tanh"}, 20),
    ("Clip", [("in", X), ("const", np.float32(-0.5)), ("const", np.float32(0.7))], {}, 13),
    ("Clip", [("in", X), None, ("const", np.float32(0.7))], {}, 13),
    ("Clip", [("in", X)], {"min": -0.5, "max": 0.5}, 6),
    ("Not", [("in", X > 0)], {}, 17),
    ("Add", [("in", X), ("const", _rand(6))], {}, 17),
    ("Sub", [("const", np.float32(1.5)), ("in", X)], {}, 17),
    ("Mul", [("in", X), ("in", _rand(3, 1, 1))], {}, 17),
    ("Div", [("in", X), ("const", _rand(1, 3, 1, 1, low=0.5))], {}, 17),
    ("Div", [("in", INTS), ("const", _i64(4, -3, 2, 5))], {}, 17),
    ("Pow", [("in", POS), ("const", np.float32(1.7))], {}, 17),
    ("Mod", [("in", INTS), ("const", _i64(4, -3, 2, 5))], {}, 17),
    ("Mod", [("in", X), ("const", np.float32(0.7))], {"fmod": 1}, 17),
    ("Equal", [("in", INTS), ("const", np.int64(2))], {}, 17),
    ("Less", [("in", X), ("in", _rand(6))], {}, 17),
    ("Greater", [("in", X), ("const", np.float32(0.1))], {}, 17),
    ("LessOrEqual", [("in", INTS), ("const", np.int64(0))], {}, 17),
    ("GreaterOrEqual", [("in", INTS), ("const", np.int64(0))], {}, 17),
    ("And", [("in", X > 0), ("in", X < 1)], {}, 17),
    ("Or", [("in", X > 1), ("in", X < -1)], {}, 17),
    ("Max", [("in", X), ("in", _rand(6)), ("const", _rand(3, 1, 1))], {}, 17),
    ("Min", [("in", X), ("in", _rand(6))], {}, 17),
    ("Sum", [("in", X), ("in", _rand(6)), ("in", _rand(5, 6))], {}, 17),
    ("Mean", [("in", X), ("in", _rand(6))], {}, 17),
    ("Where", [("in", X > 0), ("in", X), ("const", np.float32(-1.0))], {}, 17),
    ("Cast", [("in", X * 3)], {"to": TensorProto.INT64}, 17),
    ("Cast", [("in", INTS)], {"to": TensorProto.FLOAT}, 17),
    ("CastLike", [("in", INTS), ("const", np.zeros(1, np.float32))], {}, 17),
    ("Identity", [("in", X)], {}, 17),
    ("Dropout", [("in", X), ("const", np.float32(0.3))], {}, 13),
    ("Softmax", [("in", X)], {"axis": 1}, 11),
    ("Softmax", [("in", X)], {"axis": 1}, 13),
    ("Softmax", [("in", X)], {}, 17),
    ("LogSoftmax", [("in", X)], {"axis": 2}, 11),
    ("LogSoftmax", [("in", X)], {"axis": -1}, 17),
]


@pytest.mark.parametrize(("op", "args", "attrs", "opset"), ELEMENTWISE, ids=lambda v: v if isinstance(v, str) else "")
def test_elementwise_operator(op, args, attrs, opset):
    model, feeds = _op(op, args, attrs, opset)
    _check(model, feeds)


LAYOUT = [
    ("Concat", [("in", X), ("const", _rand(2, 2, 5, 6))], {"axis": 1}, 17, 1),
    ("Split", [("in", X), ("const", _i64(2, 4))], {"axis": -1}, 13, 2),
    ("Split", [("in", X)], {"axis": 3, "split": [1, 5]}, 11, 2),
    ("Split", [("in", X)], {"axis": 1}, 13, 3),
    ("Split", [("in", X)], {"axis": 2, "num_outputs": 3}, 18, 3),
    (
        "Slice",
        [("in", X), ("const", _i64(1, -1)), ("const", _i64(4, -7)), ("const", _i64(2, 3)), ("const", _i64(2, -2))],
        {},
        13,
        1,
    ),
    (
        "Slice",
        [("in", X), ("const", _i64(-1)), ("const", _i64(-(2**63))), ("const", _i64(1)), ("const", _i64(-1))],
        {},
        13,
        1,
    ),
    ("Slice", [("in", X), ("const", _i64(0)), ("const", _i64(2**63 - 1)), ("const", _i64(3))], {}, 13, 1),
    ("Slice", [("in", X)], {"starts": [1], "ends": [3], "axes": [1]}, 9, 1),
    ("Gather", [("in", X), ("const", np.int64(-1))], {"axis": 1}, 13, 1),
    ("Gather", [("in", X), ("const", _i64(2, 0, -1))], {"axis": 3}, 13, 1),
    ("Gather", [("in", X), ("const", np.array([[0, -1], [1, 1]], np.int64))], {"axis": 2}, 13, 1),
    ("GatherElements", [("in", X), ("const", RNG.integers(-3, 3, size=(2, 3, 5, 2)))], {"axis": 3}, 13, 1),
    ("Squeeze", [("in", X[:, :1])], {}, 13, 1),
    ("Squeeze", [("in", X[:, :1]), ("const", _i64(1))], {}, 13, 1),
    ("Squeeze", [("in", X[:, :1])], {"axes": [-3]}, 11, 1),
    ("Unsqueeze", [("in", X), ("const", _i64(-1, 0))], {}, 13, 1),
    ("Unsqueeze", [("in", X)], {"axes": [2]}, 11, 1),
    ("Reshape", [("in", X), ("const", _i64(0, -1, 6))], {}, 13, 1),
    ("Reshape", [("in", X), ("const", _i64(6, -1, 5))], {"allowzero": 1}, 14, 1),
    ("Flatten", [("in", X)], {}, 13, 1),
    ("Flatten", [("in", X)], {"axis": 0}, 13, 1),
    ("Flatten", [("in", X)], {"axis": -1}, 13, 1),
    ("Transpose", [("in", X)], {}, 13, 1),
    ("Transpose", [("in", X)], {"perm": [0, 2, 3, 1]}, 13, 1),
    ("Expand", [("in", _rand(3, 1)), ("const", _i64(2, 1, 4))], {}, 13, 1),
    ("Tile", [("in", X), ("const", _i64(1, 2, 1, 3))], {}, 13, 1),
    ("Pad", [("in", X), ("const", _i64(0, 1, 2, 0, 0, 0, 1, 3)), ("const", np.float32(0.5))], {}, 13, 1),
    ("Pad", [("in", X), ("const", _i64(0, 0, 2, 1, 0, 0, 1, 2))], {"mode": "reflect"}, 13, 1),
    ("Pad", [("in", X), ("const", _i64(0, 0, 2, -1, 0, 0, 1, 2))], {"mode": "edge"}, 13, 1),
    ("Pad", [("in", X), ("const", _i64(1, 2, 3, 0)), None, ("const", _i64(-2, 3))], {}, 18, 1),
    ("Pad", [("in", X)], {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "value": 2.0}, 9, 1),
    ("ReduceMean", [("in", X)], {"axes": [2, 3]}, 13, 1),
    ("ReduceMean", [("in", X), ("const", _i64(-1))], {"keepdims": 0}, 18, 1),
    ("ReduceSum", [("in", X), ("const", _i64(1))], {}, 13, 1),
    ("ReduceSum", [("in", X)], {}, 13, 1),
    ("ReduceMax", [("in", X)], {"axes": [1], "keepdims": 0}, 13, 1),
    ("ReduceMin", [("in", X)], {"axes": [0, 3]}, 13, 1),
    ("ArgMax", [("in", np.round(X))], {"axis": 1, "select_last_index": 1}, 13, 1),
    ("ArgMin", [("in", X)], {"axis": -1, "keepdims": 0}, 13, 1),
    ("TopK", [("in", X), ("const", _i64(3))], {"axis": -1}, 13, 2),
    ("TopK", [("in", X), ("const", _i64(2))], {"axis": 1, "largest": 0}, 13, 2),
    ("DepthToSpace", [("in", _rand(2, 8, 3, 4))], {"blocksize": 2}, 13, 1),
    ("DepthToSpace", [("in", _rand(2, 8, 3, 4))], {"blocksize": 2, "mode": "CRD"}, 13, 1),
    ("SpaceToDepth", [("in", _rand(2, 3, 4, 6))], {"blocksize": 2}, 13, 1),
    (
        "ConstantOfShape",
        [("const", _i64(2, 3))],
        {"value": numpy_helper.from_array(np.array([1.5], np.float32))},
        13,
        1,
    ),
    ("Range", [("const", np.int64(2)), ("const", np.int64(11)), ("const", np.int64(3))], {}, 13, 1),
    ("Shape", [("in", X)], {"start": 1, "end": -1}, 15, 1),
    ("Size", [("in", X)], {}, 13, 1),
    ("Constant", [], {"value_floats": [1.0, 2.5]}, 13, 1),
]


@pytest.mark.parametrize(
    ("op", "args", "attrs", "opset", "n_out"), LAYOUT, ids=lambda v: v if isinstance(v, str) else ""
)
def test_layout_operator(op, args, attrs, opset, n_out):
    model, feeds = _op(op, args, attrs, opset, n_out)
    if op == "Constant":
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(convert_onnx(model)().numpy(), session.run(None, {})[0])
        return
    _check(model, feeds)


WINDOWS = [
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("MaxPool", {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0], "ceil_mode": 1, "strides": [2, 2]}),
    ("MaxPool", {"kernel_shape": [2, 2], "dilations": [2, 1]}),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("AveragePool", {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0], "strides": [2, 1]}),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"}),
]


@pytest.mark.parametrize(("op", "attrs"), WINDOWS)
def test_pooling(op, attrs):
    model, feeds = _op(op, [("in", IMG)], attrs, 17)
    _check(model, feeds)


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
def test_global_pooling(op):
    model, feeds = _op(op, [("in", IMG)], {}, 17)
    _check(model, feeds)


RESIZES = [
    (
        [None, ("const", np.array([1, 1, 2, 2], np.float32))],
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
        13,
    ),
    (
        [None, ("const", np.array([1, 1, 1.5, 0.5], np.float32))],
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
        13,
    ),
    (
        [None, None, ("const", _i64(1, 4, 13, 7))],
        {"mode": "nearest", "coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_ceil"},
        13,
    ),
    ([None, ("const", np.array([1, 1, 2, 0.5], np.float32))], {"mode": "nearest"}, 13),
    (
        [None, ("const", np.array([1, 1, 2, 3], np.float32))],
        {"mode": "nearest", "coordinate_transformation_mode": "align_corners", "nearest_mode": "round_prefer_floor"},
        13,
    ),
    ([None, ("const", np.array([1, 1, 2, 2], np.float32))], {"mode": "linear"}, 13),
    (
        [None, ("const", np.array([1, 1, 0.5, 1.5], np.float32))],
        {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
        13,
    ),
    (
        [None, None, ("const", _i64(1, 4, 13, 7))],
        {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
        13,
    ),
    ([None, ("const", np.array([1, 1, 2, 2], np.float32))], {"mode": "cubic"}, 13),
    ([("const", np.array([1, 1, 2, 2], np.float32))], {"mode": "nearest"}, 10),
    ([("const", np.array([1, 1, 2, 3], np.float32))], {"mode": "nearest"}, 9),
]


@pytest.mark.parametrize(("args", "attrs", "opset"), RESIZES)
def test_resize(args, attrs, opset):
    op = "Upsample" if opset < 10 else "Resize"
    model, feeds = _op(op, [("in", IMG), *args], attrs, opset)
    _check(model, feeds)


CONVS = [
    (_rand(6, 4, 3, 3), {"pads": [1, 1, 1, 1]}),
    (_rand(6, 2, 3, 3), {"group": 2, "strides": [2, 1], "dilations": [1, 2], "pads": [0, 2, 1, 1]}),
    (_rand(4, 1, 3, 3), {"group": 4, "pads": [1, 1, 1, 1]}),
    (_rand(5, 4, 3, 2), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    (_rand(5, 4, 4, 3), {"auto_pad": "SAME_LOWER"}),
    (_rand(5, 4, 3, 3), {"auto_pad": "VALID", "strides": [2, 2]}),
]


@pytest.mark.parametrize(("weight", "attrs"), CONVS)
def test_conv_is_a_conv2d_module(weight, attrs):
    model, feeds = _op("Conv", [("in", IMG), ("const", weight), ("const", _rand(weight.shape[0]))], attrs)
    module = _check(model, feeds, tol=1e-4)
    (conv,) = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert conv.groups == attrs.get("group", 1) and isinstance(conv.weight, torch.nn.Parameter)


def test_conv1d():
    model, feeds = _op("Conv", [("in", _rand(2, 4, 9)), ("const", _rand(3, 4, 3))], {"pads": [2, 0], "strides": [2]})
    module = _check(model, feeds)
    assert any(isinstance(m, torch.nn.Conv1d) for m in module.modules())


CONV_TRANSPOSES = [
    (_rand(4, 3, 2, 2), {"strides": [2, 2]}),
    (_rand(4, 3, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 0]}),
    (_rand(4, 2, 3, 3), {"strides": [2, 2], "group": 2, "pads": [0, 1, 2, 0]}),
    (_rand(4, 3, 3, 3), {"strides": [2, 2], "output_shape": [17, 21]}),
    (_rand(4, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    (_rand(4, 3, 3, 3), {"strides": [1, 1], "dilations": [2, 2], "pads": [1, 1, 1, 1]}),
]


@pytest.mark.parametrize(("weight", "attrs"), CONV_TRANSPOSES)
def test_conv_transpose_is_a_module(weight, attrs):
    model, feeds = _op(
        "ConvTranspose",
        [("in", IMG), ("const", weight), ("const", _rand(weight.shape[1] * attrs.get("group", 1)))],
        attrs,
    )
    module = _check(model, feeds, tol=1e-4)
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in module.modules())


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 7), (2, 4, 5, 6)])
def test_batch_norm_is_a_module_that_keeps_running_stats(shape):
    stats = [_rand(4), _rand(4), _rand(4), _rand(4, low=0.5, high=2.0)]
    model, feeds = _op(
        "BatchNormalization",
        [("in", _rand(*shape)), *(("const", s) for s in stats)],
        {"epsilon": 1e-3, "momentum": 0.8},
    )
    module = _check(model, feeds)
    (bn,) = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bn.eps == pytest.approx(1e-3) and bn.momentum == pytest.approx(0.2)
    torch.testing.assert_close(bn.running_var, torch.from_numpy(stats[3]))


def test_gemm_is_a_linear_with_alpha_beta_and_transposes_folded():
    a, b, c = _rand(4, 3), _rand(5, 3), _rand(5)
    attrs = {"alpha": 0.5, "beta": 2.0, "transA": 1, "transB": 1}
    model, feeds = _op("Gemm", [("in", a.T.copy()), ("const", b), ("const", c)], attrs)
    module = _check(model, feeds)
    (linear,) = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    assert linear.bias is not None and (linear.in_features, linear.out_features) == (3, 5)


def test_gemm_with_a_full_c_matrix_and_dynamic_b():
    model, feeds = _op("Gemm", [("in", _rand(4, 3)), ("const", _rand(3, 5)), ("const", _rand(4, 5))], {"beta": 0.5})
    _check(model, feeds)
    model, feeds = _op("Gemm", [("in", _rand(4, 3)), ("in", _rand(5, 3)), ("const", _rand(5))], {"transB": 1})
    _check(model, feeds)


def test_matmul_and_bias_add_become_one_linear():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), helper.make_node("Add", ["b", "m"], ["y"])]
    model = _model(nodes, {"x": _rand(2, 7, 6)}, {"w": _rand(6, 4), "b": _rand(4)}, ["y"])
    module = _check(model, {"x": _rand(2, 7, 6)})
    assert isinstance(module.fc, torch.nn.Linear) and module.fc.bias is not None
    assert [n.op for n in module.graph.nodes] == ["placeholder", "call_module", "output"]


def test_matmul_feeding_two_nodes_keeps_its_add():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "b"], ["y"]),
        helper.make_node("Relu", ["m"], ["z"]),
    ]
    model = _model(nodes, {"x": _rand(3, 6)}, {"w": _rand(6, 4), "b": _rand(4)}, ["y", "z"])
    module = _check(model, {"x": _rand(3, 6)})
    assert module.fc.bias is None


def test_batched_matmul_weight_is_a_parameter():
    model, feeds = _op("MatMul", [("in", _rand(2, 3, 6)), ("const", _rand(2, 6, 4))])
    module = _check(model, feeds)
    assert [p.shape for p in module.parameters()] == [torch.Size([2, 6, 4])]


def test_conv_bias_added_per_channel_is_folded_into_the_conv():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Add", ["c", "b"], ["y"])]
    model = _model(nodes, {"x": IMG}, {"w": _rand(5, 4, 1, 1), "b": _rand(1, 5, 1, 1)}, ["y"])
    module = _check(model, {"x": IMG})
    assert module.conv.bias is not None and [n.op for n in module.graph.nodes] == [
        "placeholder",
        "call_module",
        "output",
    ]
    # A (W,)-shaped constant broadcasts over the last axis, not the channels: it stays an Add.
    model = _model(nodes, {"x": IMG}, {"w": _rand(5, 4, 1, 1), "b": _rand(10)}, ["y"])
    module = _check(model, {"x": IMG})
    assert module.conv.bias is None


@pytest.mark.parametrize(
    ("x", "slope", "module_made"),
    [
        (IMG, _rand(4, 1, 1), True),
        (IMG, np.array([0.2], np.float32), True),
        (_rand(3, 4), _rand(4), True),
        (IMG, _rand(10), False),
    ],
)
def test_prelu(x, slope, module_made):
    model, feeds = _op("PRelu", [("in", x), ("const", slope)])
    module = _check(model, feeds)
    assert any(isinstance(m, torch.nn.PReLU) for m in module.modules()) == module_made
    assert sum(p.numel() for p in module.parameters()) == slope.size


@pytest.mark.parametrize("axis", [-1, -2, 2])
def test_layer_normalization(axis):
    x = _rand(2, 3, 5, 6)
    shape = x.shape[axis:]
    model, feeds = _op(
        "LayerNormalization", [("in", x), ("const", _rand(*shape)), ("const", _rand(*shape))], {"axis": axis}
    )
    module = _check(model, feeds)
    assert any(isinstance(m, torch.nn.LayerNorm) for m in module.modules())


def test_instance_normalization():
    model, feeds = _op(
        "InstanceNormalization", [("in", IMG), ("const", _rand(4)), ("const", _rand(4))], {"epsilon": 1e-4}
    )
    module = _check(model, feeds)
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in module.modules())


def _dynamic_flatten_model():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape, Range over a dimension, ConstantOfShape, Expand:
    the shape arithmetic exporters write, on an input of dynamic batch, height and width."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Gather", ["s", "three"], ["w"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
        helper.make_node("Range", ["f0", "wf", "f1"], ["cols"]),
        helper.make_node("Div", ["w", "two"], ["half"]),
        helper.make_node("Unsqueeze", ["half", "axes0"], ["half1"]),
        helper.make_node("Concat", ["n1", "half1"], ["fill_shape"], axis=0),
        helper.make_node(
            "ConstantOfShape", ["fill_shape"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32))
        ),
        helper.make_node("Slice", ["x", "zero1", "half1", "three1"], ["left"]),
        helper.make_node("Expand", ["cols", "s"], ["grid"]),
        helper.make_node("Add", ["grid", "x"], ["y2"]),
    ]
    consts = {
        "zero": np.int64(0),
        "three": np.int64(3),
        "axes0": _i64(0),
        "minus1": _i64(-1),
        "f0": np.float32(0),
        "f1": np.float32(1),
        "two": np.int64(2),
        "zero1": _i64(0),
        "three1": _i64(3),
    }
    graph_input = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    model = _model(nodes, {}, consts, ["flat", "ones", "left", "y2"])
    model.graph.input.append(graph_input)
    return model


def test_shape_arithmetic_stays_python_and_follows_the_input():
    model = _dynamic_flatten_model()
    module = None
    for shape in [(1, 3, 4, 6), (3, 3, 5, 9)]:
        x = _rand(*shape)
        want, got, module = _run_both(model, {"x": x})
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6)
    assert module is not None and not list(module.buffers()), "shape values must not become constant tensors"


def test_shape_comparisons_where_and_shape_outputs():
    """torch.onnx's pattern for expand(-1, 3, -1, -1) (Where(Equal(c, -1), Shape(x), c)), and shape values
    that leave as tensors: a comparison (bool), a float computation, the shape itself."""
    c = _i64(-1, 3, -1, -1)
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Equal", ["c", "minus1"], ["open"]),
        helper.make_node("Where", ["open", "s", "c"], ["target"]),
        helper.make_node("Expand", ["b", "target"], ["expanded"]),
        helper.make_node("Equal", ["s", "c"], ["same"]),
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["sf", "half"], ["scaled"]),
        helper.make_node("Identity", ["s"], ["shape"]),
    ]
    consts = {"c": c, "minus1": np.int64(-1), "half": np.float32(0.5)}
    model = _model(nodes, {"b": _rand(1, 3, 1, 1)}, consts, ["expanded", "same", "scaled", "shape"])
    model.graph.input.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"]))
    for shape in [(2, 3, 4, 5), (1, 3, 7, 3)]:
        _check(model, {"b": _rand(1, 3, 1, 1), "x": _rand(*shape)})


def test_shape_arithmetic_exports_with_dynamic_dims():
    module = convert_onnx(_dynamic_flatten_model())
    dims = {
        0: torch.export.Dim("batch", min=1, max=16),
        2: torch.export.Dim("h", min=2, max=64),
        3: 2 * torch.export.Dim("half_w", min=2, max=32),  # the graph slices at w // 2
    }
    program = torch.export.export(module, (torch.rand(2, 3, 4, 6),), dynamic_shapes=(dims,))
    x = torch.rand(5, 3, 7, 10)
    for want, got in zip(module(x), program.module()(x), strict=True):
        torch.testing.assert_close(got, want)


# -- the real models ----------------------------------------------------------------------------


def _model_path(name: str) -> str:
    return str(FIXTURES / name) if name == "shapes_yolo.onnx" else str(asset(name))


def _text_page(size: int = 320) -> np.ndarray:
    """scikit-image's printed page as the text detector's package feeds it: BGR, (x/255 - 0.5) / 0.5."""
    from PIL import Image

    page = Image.open(asset("page.png")).convert("RGB").resize((size, size), Image.BILINEAR)
    bgr = np.asarray(page, dtype=np.float32)[:, :, ::-1] / 255.0
    return ((bgr - 0.5) / 0.5).transpose(2, 0, 1)[None].copy()


def _inputs(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name == TEXT_DETECTOR.file:
        return _text_page(shape[-1])  # on noise its probability map is ~1e-5 everywhere: nothing to compare
    return np.random.default_rng(1).random(shape, dtype=np.float32)


def _relative_error(want: np.ndarray, got: np.ndarray) -> float:
    assert want.shape == got.shape, (want.shape, got.shape)
    return float(np.abs(want.astype(np.float64) - got).max() / np.abs(want).max())


REAL_CASES = [
    (ORIENTATION.file, [(1, 3, 224, 224), (2, 3, 224, 224)]),
    (TEXT_DETECTOR.file, [(1, 3, 320, 320)]),
    (YOLOV8N.file, [(1, 3, 320, 320), (2, 3, 256, 320)]),
    ("shapes_yolo.onnx", [(1, 3, 128, 128), (2, 3, 96, 160)]),
]


@pytest.fixture(scope="module")
def converted():
    """Each real model converted once: {file: (module, seconds)}."""
    out = {}
    for name, _ in REAL_CASES:
        model = onnx.load(_model_path(name))
        start = time.perf_counter()
        module = convert_onnx(model)
        out[name] = (module, time.perf_counter() - start)
    return out


@pytest.mark.parametrize(("name", "shapes"), REAL_CASES, ids=[c[0] for c in REAL_CASES])
def test_real_model_matches_onnxruntime(name, shapes, converted):
    module, seconds = converted[name]
    session = ort.InferenceSession(_model_path(name), providers=["CPUExecutionProvider"])
    for shape in shapes:
        x = _inputs(name, shape)
        (want,) = session.run(None, {session.get_inputs()[0].name: x})
        with torch.no_grad():
            got = module(torch.from_numpy(x)).numpy()
        assert _relative_error(want, got) <= REAL_TOLERANCE, (name, shape)
    assert seconds < 10, f"{name} took {seconds:.1f} s to convert"


def test_real_models_get_modules_for_every_weighted_node(converted):
    for name, _ in REAL_CASES:
        model = onnx.load(_model_path(name))
        module, _ = converted[name]
        convs = sum(n.op_type in ("Conv", "ConvTranspose") for n in model.graph.node)
        modules = [m for m in module.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
        assert len(modules) == convs, name
        assert all(isinstance(m.weight, torch.nn.Parameter) for m in modules)
    yolo, _ = converted[YOLOV8N.file]
    assert isinstance(yolo.get_submodule("model_22_cv2_0_cv2_0_2_Conv"), torch.nn.Conv2d)


def test_converted_module_trains():
    module = convert_onnx(onnx.load(_model_path(ORIENTATION.file)))
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    bn = next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    module.train()
    loss = module(torch.rand(2, 3, 128, 128)).log().mean()
    loss.backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)
    assert not torch.equal(bn.running_mean, before)
    assert all(p.requires_grad for p in module.parameters())


def test_converted_module_copies_and_pickles(tmp_path):
    import copy

    module = convert_onnx(onnx.load(_model_path("shapes_yolo.onnx")))
    torch.save(module, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        want = module(x)
        torch.testing.assert_close(copy.deepcopy(module)(x), want)
        torch.testing.assert_close(loaded(x), want)


def test_tensors_the_graph_makes_follow_the_input_device():
    """ConstantOfShape, Range and shape tensors are made on the input's device ("meta" stands in for a GPU:
    a tensor made on the CPU could not be added to it)."""
    module = convert_onnx(onnx.load(_model_path(YOLOV8N.file))).to("meta")
    out = module(torch.empty(2, 3, 256, 320, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 22, 1680)


def test_torch_pruning_prunes_a_middle_conv_of_the_orientation_model():
    import torch_pruning as tp

    module = convert_onnx(onnx.load(_model_path(ORIENTATION.file)))
    x = torch.rand(1, 3, 224, 224)
    graph = tp.DependencyGraph().build_dependency(module, example_inputs=x)
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.out_channels > 16]
    conv = convs[len(convs) // 2]
    channels = conv.out_channels
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(8)))
    group.prune()
    assert conv.out_channels == channels - 8
    with torch.no_grad():
        assert module(x).shape == (1, 4)


# -- exports (slow) -----------------------------------------------------------------------------

EXPORTED = [(ORIENTATION.file, (3, 224, 224), False), (YOLOV8N.file, (3, 320, 320), True)]


@pytest.mark.integration
@pytest.mark.parametrize(("name", "sample", "spatial"), EXPORTED, ids=[c[0] for c in EXPORTED])
def test_torch_export_with_dynamic_shapes(name, sample, spatial, converted):
    module, _ = converted[name]
    dims = {0: torch.export.Dim("batch", min=1, max=32)}
    if spatial:
        dims.update({2: 32 * torch.export.Dim("h", min=2, max=20), 3: 32 * torch.export.Dim("w", min=2, max=20)})
    program = torch.export.export(module, (torch.rand(2, *sample),), dynamic_shapes=(dims,))
    session = ort.InferenceSession(_model_path(name), providers=["CPUExecutionProvider"])
    shapes = [(1, *sample), (3, *sample)] + ([(3, 3, 256, 192)] if spatial else [])
    for shape in shapes:
        x = _inputs(name, shape)
        (want,) = session.run(None, {session.get_inputs()[0].name: x})
        got = program.module()(torch.from_numpy(x)).detach().numpy()
        assert _relative_error(want, got) <= REAL_TOLERANCE, shape


@pytest.mark.integration
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize(("name", "sample", "spatial"), EXPORTED, ids=[c[0] for c in EXPORTED])
def test_torch_onnx_export_runs_in_onnxruntime(name, sample, spatial, dynamo, converted, tmp_path):
    """Both exporters keep the batch (and a detector's height and width) open: the anchors the graph
    computes from shapes follow the input in the written ONNX."""
    module, _ = converted[name]
    out = tmp_path / "exported.onnx"
    x = torch.rand(2, *sample)
    axes = [0, 2, 3] if spatial else [0]
    if dynamo:
        dims = ({axis: torch.export.Dim.AUTO for axis in axes},)
        torch.onnx.export(module, (x,), str(out), dynamo=True, input_names=["x"], dynamic_shapes=dims)
    else:
        dynamic_axes = {
            "x": {axis: f"d{axis}" for axis in axes},
            "y": {0: "d0", 2: "anchors"} if spatial else {0: "d0"},
        }
        torch.onnx.export(
            module,
            (x,),
            str(out),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes=dynamic_axes,
        )
    exported = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(_model_path(name), providers=["CPUExecutionProvider"])
    for shape in [(1, *sample), (3, *sample)] + ([(3, 3, 256, 192)] if spatial else []):
        x = _inputs(name, shape)
        (want,) = original.run(None, {original.get_inputs()[0].name: x})
        (got,) = exported.run(None, {exported.get_inputs()[0].name: x})
        assert _relative_error(want, got) <= REAL_TOLERANCE, shape
