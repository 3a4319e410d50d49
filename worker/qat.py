"""Quantization-aware training for ONNX Runtime's static INT8 (the quantize_qat step).

Post-training INT8 rounds weights and activations that the network never saw rounded. A few epochs with
the rounding in the forward pass (straight-through gradients) let the weights settle where it costs least;
for that to hold at deployment, training rounds exactly where and how ONNX Runtime's Q/DQ graph will. So
the graph comes first: the model (batch norms folded into the convolutions before them, torch.fx,
eval-mode statistics, as the exported graph has them) is exported and quantized by the service's own
quantizer, as quantize_int8 would, and that graph says what to round:

- every activation tensor it quantizes (convolution and linear inputs, and also residual adds, pools,
  concats, sigmoids...) is found in the module by its values on a few calibration images (the graph was
  exported from the module, so each of its tensors is computed there too), and an ActivationQuant is
  inserted after the fx node that computes it: per tensor, u8 asymmetric, scale (max - min) / 255 and zero
  point round(-min / scale) as ORT's compute_scale_zp gives them. Its range starts at the graph's own
  scale and zero point (the service's calibration: min/max or percentile) and then follows a moving
  average of each training batch's (EMA_MOMENTUM), as PyTorch's QAT observers do: not learned, so the
  graph can take it as it is; saved with the best epoch's weights.
- every weight it stores in int8: symmetric, per output channel (or per tensor), scale max|w| / 127, or
  / 64 where the quantizer uses reduce_range (7-bit weights on x86 without VNNI).
- what it keeps float stays float: the layers that make the model's outputs (graph_pruning's
  OUTPUT_LAYER, excluded from the graph), mixed-scale detector heads (the quantizer's own rule).

After training the rounding is taken out, the float module exported again and quantized by the same
quantizer with the same float nodes; the trained ranges replace the calibrated ones in its calibration
cache, which it reads every range from, so each tensor gets the scale and zero point it was trained with.
(That cache is the one way into the service's Quantizer, whose extra_options are fixed; it hands ORT the
rmin/rmax a TensorQuantOverrides entry would, through the same compute_scale_zp.) Not emulated: the int32
rounding of biases (a step of input scale x weight scale), and ORT's integer kernels' own rounding.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import PassError

# u8 activations, as the service's quantizer writes them (QuantizeInt8Config.activation_type).
ACTIVATION_QMIN, ACTIVATION_QMAX = 0, 255
# Symmetric int8 weights: [-127, 127], or [-64, 64] with reduce_range (ORT's ranges for each).
WEIGHT_QMAX, REDUCED_WEIGHT_QMAX = 127, 64
# How far each training batch moves a range (PyTorch's MovingAverageMinMaxObserver's default).
EMA_MOMENTUM = 0.01
# A percentile range is taken over at most this many values of a batch (a strided sample).
QUANTILE_SAMPLES = 1 << 16
WEIGHTED_TYPES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d)
WEIGHTED_TYPES += (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d, torch.nn.Linear)
ONNX_WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass(frozen=True)
class QuantScheme:
    """How the runtime will round: per-channel or per-tensor weights, 7-bit weights (reduce_range), and how
    activation ranges are measured ("minmax" or "percentile" with ``percentile``)."""

    per_channel: bool
    reduce_range: bool
    method: str = "minmax"
    percentile: float = 99.999

    @property
    def weight_qmax(self) -> int:
        return REDUCED_WEIGHT_QMAX if self.reduce_range else WEIGHT_QMAX


# -- the numerics ----------------------------------------------------------------------------------


def activation_qparams(lowest: float, highest: float) -> tuple[float, int]:
    """(scale, zero point) of a u8 asymmetric tensor with this range, as ORT's compute_scale_zp gives them:
    the range widened to hold 0, the scale stored as float32, the zero point rounded half to even."""
    lo, hi = min(float(lowest), 0.0), max(float(highest), 0.0)
    scale = (hi - lo) / (ACTIVATION_QMAX - ACTIVATION_QMIN)
    if np.float32(scale) < np.finfo(np.float32).tiny:
        return 1.0, 0
    zero_point = int(np.round(ACTIVATION_QMIN - lo / scale))
    return float(np.float32(scale)), min(max(zero_point, ACTIVATION_QMIN), ACTIVATION_QMAX)


def weight_scales(weight: torch.Tensor, scheme: QuantScheme, axis: int) -> torch.Tensor:
    """Symmetric int8 scales: max|w| / qmax per output channel (``axis``), or one for the tensor; a channel
    of zeros gets 1 (ORT's rule for a scale below float32's smallest)."""
    magnitude = weight.detach().abs()
    if scheme.per_channel:
        magnitude = magnitude.transpose(0, axis).flatten(1).amax(1)
    else:
        magnitude = magnitude.max().reshape(1)
    scales = (magnitude.double() / scheme.weight_qmax).float()
    return torch.where(scales < torch.finfo(torch.float32).tiny, torch.ones_like(scales), scales)


def fake_quantize_weight(weight: torch.Tensor, scheme: QuantScheme, axis: int) -> torch.Tensor:
    """``weight`` rounded to the int8 grid ORT will store it on (straight-through gradient)."""
    scales = weight_scales(weight, scheme, axis)
    qmax = scheme.weight_qmax
    if not scheme.per_channel:
        return torch.fake_quantize_per_tensor_affine(weight, float(scales[0]), 0, -qmax, qmax)
    zero_points = torch.zeros(len(scales), dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scales, zero_points, axis, -qmax, qmax)


def fake_quantize_activation(x: torch.Tensor, lowest: float, highest: float) -> torch.Tensor:
    """``x`` through u8 QuantizeLinear/DequantizeLinear with this range (straight-through inside it)."""
    scale, zero_point = activation_qparams(lowest, highest)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, ACTIVATION_QMIN, ACTIVATION_QMAX)


def batch_range(x: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's (lowest, highest): its min and max, or ORT's percentile cut (half of 100 - percentile
    off each end) on a strided sample of it."""
    x = x.detach().float()
    if scheme.method != "percentile":
        return x.min(), x.max()
    flat = x.flatten()
    flat = flat[:: max(1, math.ceil(len(flat) / QUANTILE_SAMPLES))]
    cut = (100.0 - scheme.percentile) / 200.0
    lo, hi = torch.quantile(flat, torch.tensor([cut, 1.0 - cut], device=flat.device))
    return lo, hi


class ActivationQuant(torch.nn.Module):
    """A tensor the Q/DQ graph quantizes, rounded the same way: its range (``lowest``, ``highest``) starts
    at what the service's quantizer calibrated and, in training mode, moves towards each batch's by
    EMA_MOMENTUM; in eval mode it is fixed. ``tensors``: the graph's names for it."""

    def __init__(self, scheme: QuantScheme, lowest: float, highest: float, tensors: list[str]) -> None:
        super().__init__()
        self.scheme, self.tensors = scheme, tensors
        self.register_buffer("lowest", torch.tensor(float(lowest)))
        self.register_buffer("highest", torch.tensor(float(highest)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                lo, hi = batch_range(x, self.scheme)
                self.lowest.add_(EMA_MOMENTUM * (lo - self.lowest))
                self.highest.add_(EMA_MOMENTUM * (hi - self.highest))
        return fake_quantize_activation(x, float(self.lowest), float(self.highest))


class WeightQuantized(torch.nn.Module):
    """A convolution or linear whose weight is rounded to the int8 grid ORT stores it on."""

    def __init__(self, layer: torch.nn.Module, scheme: QuantScheme) -> None:
        super().__init__()
        self.layer, self.scheme = layer, scheme
        # The weight's output channels: ORT's per-channel axis (1 for a transposed convolution).
        self.axis = 1 if isinstance(layer, torch.nn.modules.conv._ConvTransposeNd) else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize_weight(self.layer.weight, self.scheme, self.axis)
        return torch.func.functional_call(self.layer, {"weight": weight}, (x,))


class QatModel(torch.nn.Module):
    """The model being trained: in training mode everything trains but the batch norms left unfolded,
    which keep their running statistics (the exported graph uses those)."""

    def __init__(self, model: torch.fx.GraphModule) -> None:
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> QatModel:
        super().train(mode)
        for module in self.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, *args: Any) -> Any:
        return self.model(*args)

    def layers(self) -> dict[str, WeightQuantized]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, WeightQuantized)}

    def activations(self) -> dict[str, ActivationQuant]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, ActivationQuant)}


# -- what the Q/DQ graph quantizes -------------------------------------------------------------------


@dataclass
class QdqPlan:
    """What a Q/DQ graph made by the service's quantizer rounds: each activation tensor it quantizes, with
    the tensor whose scale it uses (ORT names a scale "<tensor>_scale"; a Flatten's output shares its
    input's) and the range that scale and zero point hold; and the weighted nodes whose weights it stores
    in int8."""

    activations: dict[str, tuple[str, float, float]]  # tensor -> (governing tensor, lowest, highest)
    weighted_nodes: set[str]


def read_qdq_graph(path: Path) -> QdqPlan:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    tensors = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    activations: dict[str, tuple[str, float, float]] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants or len(node.input) < 3:
            continue
        scale, zero_point = float(constants[node.input[1]]), int(constants[node.input[2]])
        governing = node.input[1].removesuffix("_scale")
        governing = governing if governing in tensors else node.input[0]
        lowest = scale * (ACTIVATION_QMIN - zero_point)
        activations[node.input[0]] = (governing, lowest, scale * (ACTIVATION_QMAX - zero_point))
    weighted = {
        n.name
        for n in model.graph.node
        if n.op_type in ONNX_WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in dequantized
    }
    return QdqPlan(activations, weighted)


def graph_values(graph: Path, names: Collection[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The values of the tensors ``names`` in the float ``graph`` on ``feeds`` (ONNX Runtime)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(graph))
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in outputs
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = list(names)
    return dict(zip(wanted, session.run(wanted, feeds), strict=True))


def module_values(gm: torch.fx.GraphModule, x: torch.Tensor) -> list[tuple[torch.fx.Node, np.ndarray]]:
    """Every floating-point tensor the module computes on ``x``, by the fx node that computes it, in order."""
    values: list[tuple[torch.fx.Node, np.ndarray]] = []

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            out = super().run_node(node)
            if node.op not in ("get_attr", "output") and isinstance(out, torch.Tensor) and out.is_floating_point():
                values.append((node, out.detach().float().cpu().numpy()))
            return out

    with torch.no_grad():
        Recorder(gm).run(x)
    return values


def match_tensors(
    values: dict[str, np.ndarray], computed: list[tuple[torch.fx.Node, np.ndarray]]
) -> dict[str, torch.fx.Node]:
    """{graph tensor: the first fx node that computes the same values} (same shape, within 1e-3 of the
    tensor's largest magnitude): the module was exported to that graph, so its tensors are there too."""
    by_shape: dict[tuple, list[tuple[torch.fx.Node, np.ndarray]]] = {}
    for node, value in computed:
        by_shape.setdefault(value.shape, []).append((node, value))
    found: dict[str, torch.fx.Node] = {}
    for name, reference in values.items():
        tolerance = 1e-3 * float(np.abs(reference).max(initial=0.0)) + 1e-6
        for node, value in by_shape.get(reference.shape, ()):
            if float(np.abs(value - reference).max(initial=0.0)) <= tolerance:
                found[name] = node
                break
    return found


# -- preparing and undoing -------------------------------------------------------------------------


def fold_batch_norms(module: torch.nn.Module) -> tuple[torch.fx.GraphModule, int]:
    """(a torch.fx copy of ``module`` with each BatchNorm that follows a convolution or linear folded into
    it, how many were folded). A module that is not a GraphModule is traced symbolically first."""
    from torch.fx.experimental.optimization import fuse

    def count(m: torch.nn.Module) -> int:
        return sum(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())

    try:
        folded = fuse(module.eval(), no_trace=isinstance(module, torch.fx.GraphModule))
    except Exception as exc:  # symbolic tracing raises many types on data-dependent control flow
        raise PassError(
            f"the model could not be traced to fold its batch norms: {str(exc).splitlines()[0][:300]}",
            code="not_trainable",
        ) from exc
    return folded.eval(), count(module) - count(folded)


def kept_float_layers(gm: torch.fx.GraphModule, example: tuple) -> dict[str, str]:
    """{layer: why it stays float}: the layers that make the model's outputs (a classifier's classes, a
    detector's box and class channels), and grouped transposed convolutions (ORT's per-channel axis 1 of
    their weight is not their output channels)."""
    from worker.graph_pruning import OUTPUT_LAYER, protected_layers

    kept = {name: OUTPUT_LAYER for name, why in protected_layers(gm, example).items() if why == OUTPUT_LAYER}
    for name, module in gm.named_modules():
        if isinstance(module, torch.nn.modules.conv._ConvTransposeNd) and module.groups != 1:
            kept.setdefault(name, "a grouped transposed convolution: ORT's per-channel axis would mix its groups")
    return kept


def prepare_qat(
    gm: torch.fx.GraphModule,
    plan: QdqPlan,
    matches: dict[str, torch.fx.Node],
    layer_nodes: dict[str, str],
    scheme: QuantScheme,
) -> QatModel:
    """``gm`` (in place) rounding what the Q/DQ graph ``plan`` rounds: after each fx node that computes a
    quantized tensor (``matches``), an ActivationQuant at that tensor's range; each layer whose graph node
    (``layer_nodes``) has int8 weights, wrapped in WeightQuantized."""
    for name, node in layer_nodes.items():
        if node in plan.weighted_nodes:
            parent, _, leaf = name.rpartition(".")
            holder = gm.get_submodule(parent) if parent else gm
            setattr(holder, leaf, WeightQuantized(getattr(holder, leaf), scheme))
    tensors_of: dict[torch.fx.Node, list[str]] = {}
    for tensor, node in matches.items():
        tensors_of.setdefault(node, []).append(tensor)
    first_computed = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for index, (node, tensors) in enumerate(tensors_of.items()):
        _, lowest, highest = plan.activations[tensors[0]]
        target = f"qat_activation_{index}"
        gm.add_submodule(target, ActivationQuant(scheme, lowest, highest, tensors))
        place = (
            gm.graph.inserting_before(first_computed) if node.op == "placeholder" else gm.graph.inserting_after(node)
        )
        with place:
            rounded = gm.graph.call_module(target, (node,))
        node.replace_all_uses_with(rounded, delete_user_cb=lambda user, rounded=rounded: user is not rounded)
    gm.recompile()
    return QatModel(gm)


def trained_ranges(model: QatModel) -> dict[str, tuple[float, float]]:
    """{graph tensor: its trained (lowest, highest)}."""
    return {tensor: (float(m.lowest), float(m.highest)) for m in model.activations().values() for tensor in m.tensors}


def strip_fake_quant(model: QatModel) -> torch.fx.GraphModule:
    """The trained float module: the rounding taken out (in place)."""
    gm = model.model
    for name, wrapper in model.layers().items():
        parent, _, leaf = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, wrapper.layer)
    activations = model.activations()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in activations:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
    gm.recompile()
    return gm.eval()


# -- the graph's side -------------------------------------------------------------------------------


def onnx_layers(graph: Path, layers: dict[str, torch.nn.Module]) -> dict[str, tuple[str, str]]:
    """{layer: (the ONNX node that computes it, that node's input tensor)} in ``graph``: the node whose weight
    initializer is named after the layer's weight (the TorchScript exporter keeps parameter names), else the
    one whose weight holds the same numbers (as is, or transposed for a MatMul)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    initializers = {i.name: i for i in model.graph.initializer}
    weighted = [n for n in model.graph.node if n.op_type in ONNX_WEIGHTED_OPS and len(n.input) > 1]
    by_name = {n.input[1]: n for n in weighted if n.input[1] in initializers}
    found: dict[str, tuple[str, str]] = {}
    for name, layer in layers.items():
        node = by_name.get(f"{name}.weight")
        if node is None:
            weight = layer.weight.detach().cpu().numpy()
            for candidate in by_name.values():
                value = numpy_helper.to_array(initializers[candidate.input[1]])
                if (value.shape == weight.shape and np.array_equal(value, weight)) or (
                    value.ndim == 2 and value.shape == weight.T.shape and np.array_equal(value, weight.T)
                ):
                    node = candidate
                    break
        if node is not None:
            found[name] = (node.name, node.input[0])
    return found


def governing_ranges(ranges: dict[str, tuple[float, float]], plan: QdqPlan) -> dict[str, tuple[float, float]]:
    """{the tensor whose range sets a scale: trained range}: several tensors sharing one scale (a Flatten's
    output and its input) saw the same values, and get the span of theirs."""
    out: dict[str, tuple[float, float]] = {}
    for tensor, (lo, hi) in ranges.items():
        governing = plan.activations[tensor][0] if tensor in plan.activations else tensor
        old = out.get(governing, (lo, hi))
        out[governing] = (min(old[0], lo), max(old[1], hi))
    return out


def write_trained_ranges(cache: Path, ranges: dict[str, tuple[float, float]]) -> int:
    """Put ``ranges`` ({tensor: (lowest, highest)}) into ORT's calibration cache at ``cache`` in place of the
    calibrated ones (the quantizer reads its ranges from there); a tensor the calibration did not collect is
    one the quantizer does not quantize, and is left out. How many were written."""
    from onnxruntime.quantization.calibrate import TensorData, load_tensors_data, save_tensors_data

    data = load_tensors_data(cache)
    written = 0
    for tensor, (lo, hi) in ranges.items():
        if tensor in data.data:
            data.data[tensor] = TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
            written += 1
    save_tensors_data(data, cache)
    return written
