"""What structured pruning leaves whole in a graph (worker.graph_pruning), the job-time refusal of ONNX
operators the converter cannot train, and the ONNX names a converted model answers to: fast, in process.
The pruning jobs on real uploads are in tests/test_prune_uploads.py."""

from __future__ import annotations

import io

import onnx
import pytest
from onnx import TensorProto, helper

from core.errors import InvalidInput
from core.formats import ONNX, SAME_AS_INPUT, STATE_DICT
from core.model_formats import inspect_model
from core.recipes import PRESETS, plan_job
from core.schemas import StepSpec
from core.steps.registry import get_spec


def _graph_module():
    """A graph with every case the walk must tell apart: a residual add and a concat (torch-pruning keeps
    them consistent), a hard-coded reshape of channels, a split into fixed sizes, a per-channel constant,
    and a flatten into a classifier."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.a = nn.Conv2d(16, 16, 3, padding=1)
            self.b = nn.Conv2d(16, 16, 1)
            self.c = nn.Conv2d(32, 32, 1)
            self.to_split = nn.Conv2d(32, 32, 1)
            self.after_split = nn.Conv2d(16, 16, 1)
            self.scaled = nn.Conv2d(16, 8, 1)
            self.reshaped = nn.Conv2d(8, 8, 1)
            self.register_buffer("scale", torch.linspace(0.5, 1.5, 8).reshape(1, 8, 1, 1))
            self.fc = nn.Linear(8 * 8 * 8, 10)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = self.a(x) + self.b(x)  # residual: a and b share channels
            x = self.c(torch.cat([x, x * 2], dim=1))
            left, right = self.to_split(x).split([16, 16], dim=1)
            y = self.after_split(left) + right
            y = self.scaled(y) * self.scale
            z = self.reshaped(y)
            logits = self.fc(z.flatten(1))
            tokens = z.reshape(z.shape[0], 8, -1).mean(-1)  # hard-codes 8 channels
            return logits, self.head(tokens)

    torch.manual_seed(0)
    return torch.fx.symbolic_trace(Net().eval())


def test_the_walk_protects_what_the_graph_hard_codes_and_nothing_else():
    import torch

    from worker.graph_pruning import INPUT_LAYER, OUTPUT_LAYER, protected_layers

    gm = _graph_module()
    why = protected_layers(gm, (torch.randn(1, 3, 8, 8),))
    assert why["stem"] == INPUT_LAYER
    assert why["fc"] == OUTPUT_LAYER and why["head"] == OUTPUT_LAYER
    assert "split" in why["to_split"] and "reshapes" in why["to_split"]
    assert why["scaled"] == "multiplies or adds a per-channel constant"
    assert "reshape" in why["reshaped"]
    # The residual pair, the concat's producer and the flatten into fc are torch-pruning's to keep right.
    assert {"a", "b", "c"}.isdisjoint(why)


def test_pruning_the_unprotected_layers_keeps_the_graph_running():
    import torch
    import torch_pruning as tp

    from worker.graph_pruning import check_pruned, protected_layers

    gm = _graph_module()
    x = (torch.randn(2, 3, 8, 8),)
    want = [tuple(o.shape) for o in gm(*x)]
    why = protected_layers(gm, x)
    modules = dict(gm.named_modules())
    pruner = tp.pruner.MetaPruner(
        gm,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[modules[n] for n in why],
        round_to=8,
    )
    pruner.step()
    check_pruned(gm, x, want)
    assert gm.a.out_channels == gm.b.out_channels == 8 and gm.c.out_channels == 16
    assert gm.to_split.out_channels == 32 and gm.scaled.out_channels == 8


def test_a_layer_the_graph_does_not_have_is_named_back():
    import torch

    from core.errors import PassError
    from worker.graph_pruning import protected_layers

    gm = _graph_module()
    why = protected_layers(gm, (torch.randn(1, 3, 8, 8),), ["/model/c/Conv"], {"/model/c/Conv": "c"})
    assert why["c"] == "named by the user"
    with pytest.raises(PassError) as err:
        protected_layers(gm, (torch.randn(1, 3, 8, 8),), ["nope"], {})
    assert err.value.code == "unknown_modules" and err.value.details["unknown"] == ["nope"]


def test_a_pruned_graph_that_changes_its_outputs_fails_the_step():
    import torch

    from core.errors import PassError
    from worker.graph_pruning import check_pruned

    gm = _graph_module()
    with pytest.raises(PassError) as err:
        check_pruned(gm, (torch.randn(1, 3, 8, 8),), [(1, 10), (1, 5)])
    assert err.value.code == "pruning_failed" and "(1, 4)" in err.value.message


def test_training_steps_keep_their_inputs_format():
    for name in ("prune_structured", "prune_unstructured", "distill", "finetune"):
        spec = get_spec(name)
        assert spec.produces == SAME_AS_INPUT and spec.trains, name
        assert {spec().output_format(f) for f in (ONNX, STATE_DICT)} == {ONNX, STATE_DICT}
    plan = plan_job(
        model_format=ONNX,
        model_inputs=[{"name": "images", "shape": ["batch", 3, 8, 8], "dtype": "float32"}],
        steps=PRESETS["prune50-distill-int8"],
        input_shape=None,
        calibration=_facts(),
        evaluation=None,
        model_operators=["Conv", "Relu", "Sigmoid"],
    )
    assert [s.name for s in plan.steps][:2] == ["prune_structured", "distill"]


def _facts():
    from core.recipes import DatasetFacts

    return DatasetFacts(id="d" * 32, layout="NCHW", sample_shape=[3, 8, 8])


def _onnx_with(op_type: str, domain: str = "") -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node(op_type, ["r"], ["y"], domain=domain),
    ]
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=opsets)
    buf = io.BytesIO()
    onnx.save(model, buf)
    return buf.getvalue()


def test_an_onnx_uploads_operators_are_listed_and_a_training_step_refuses_the_unconvertible(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_onnx_with("Tanh"))
    assert inspect_model(path).details["operators"] == ["Relu", "Tanh"]
    path.write_bytes(_onnx_with("Inverse", domain="com.microsoft"))
    operators = inspect_model(path).details["operators"]
    assert operators == ["Relu", "com.microsoft::Inverse"]
    inputs = [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}]

    def plan(steps, ops):
        return plan_job(
            model_format=ONNX,
            model_inputs=inputs,
            steps=steps,
            input_shape=None,
            calibration=_facts(),
            evaluation=None,
            model_operators=ops,
        )

    with pytest.raises(InvalidInput) as err:
        plan([StepSpec(name="export_onnx"), StepSpec(name="prune_structured")], operators)
    assert err.value.code == "unsupported_operators"
    assert err.value.details == {"index": 1, "step": "prune_structured", "operators": ["com.microsoft::Inverse"]}
    assert "com.microsoft::Inverse" in err.value.message
    # Steps that do not train take the model as it is; a model uploaded before operators were listed is
    # left to the worker, which names them the same way.
    plan([StepSpec(name="export_onnx"), StepSpec(name="benchmark")], operators)
    plan([StepSpec(name="prune_structured")], None)


def test_an_exported_model_answers_to_the_uploads_names():
    from worker.onnx_graph import rename_io

    x = helper.make_tensor_value_info("x_1", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("add_3", TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x_1"], ["r"]), helper.make_node("Add", ["r", "x_1"], ["add_3"])], "g", [x], [y]
    )
    model = helper.make_model(graph)
    assert rename_io(model, ["images"], ["output0"])
    assert [v.name for v in model.graph.input] == ["images"] and [v.name for v in model.graph.output] == ["output0"]
    assert [list(n.input) for n in model.graph.node] == [["images"], ["r", "images"]]
    onnx.checker.check_model(model)
    # A wanted name that another value already has leaves the graph as it is.
    assert not rename_io(model, ["r"], ["output0"])
