"""Turn an uploaded torch.export program (.pt2) back into a module that trains and prunes.

``program.module()`` runs, but its convolutions, linears and batch norms are aten calls on
get_attr'ed tensors: torch-pruning finds layers by their module type (nn.Conv2d, nn.Linear,
nn.BatchNorm2d), and ``train()`` is refused on it. Here each such call becomes a call of a real
module that holds the same Parameters and running statistics; every other node stays the aten
call it was (they run in eager). Submodules are named after the original module path
(``backbone.0.conv`` -> ``backbone_0_conv``); ``module_names`` maps them back, so that a user can
name layers to protect in the names of the model they exported.

An op is lifted only when its weights are used by nothing else (or only by calls of the same
module with the same settings, which then share one lifted module), so the lift never unties
weights. Reshapes to a fixed shape (a decomposed program flattens with ``view(x, [1, 512])``) are
rewritten to take the sizes they keep from their input, so that other batch sizes and pruned
channel counts run. The program's input guards are not installed: the upload fixes the batch.
"""

from __future__ import annotations

import copy
import operator
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.errors import PassError

if TYPE_CHECKING:
    import torch

# Where lift_exported_program records lifted submodule name -> original dotted module path.
MODULE_PATHS_META = "lifted_module_paths"

CONVOLUTIONS = frozenset(
    {
        "aten.conv1d.default",
        "aten.conv1d.padding",
        "aten.conv2d.default",
        "aten.conv2d.padding",
        "aten.conv3d.default",
        "aten.conv3d.padding",
        "aten.conv_transpose1d.default",
        "aten.conv_transpose2d.input",
        "aten.conv_transpose3d.input",
        "aten.convolution.default",
    }
)
LINEARS = frozenset({"aten.linear.default", "aten.addmm.default", "aten.mm.default"})
# Batch norms that return one tensor, and those that return a tuple whose first item is the output.
BATCH_NORMS = frozenset({"aten.batch_norm.default"})
TUPLE_BATCH_NORMS = frozenset(
    {
        "aten._native_batch_norm_legit_no_training.default",
        "aten._native_batch_norm_legit_functional.default",
        "aten.native_batch_norm.default",
    }
)
RESHAPES = frozenset({"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"})
_TRANSPOSES = frozenset({"aten.permute.default", "aten.t.default", "aten.transpose.int"})


@dataclass
class _Lift:
    """One aten call that becomes a call of a module built from ``config`` and the tensors at ``params``."""

    node: Any  # the aten call
    input: str  # the schema name of the argument it is applied to
    config: tuple  # kind first, then the settings that shape the module
    params: dict[str, str]  # role (weight, bias, running_mean, ...) -> get_attr target
    outputs: list  # nodes whose uses the module's output takes over
    consumed: list = field(default_factory=list)  # nodes erased with it (the call, getitems, permutes, copy_)


def lift_exported_program(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """A ``torch.fx.GraphModule`` that computes what ``program.module()`` computes, with conv, linear and
    batch norm calls as real modules; in eval mode. Its forward takes the program's user inputs and
    returns the same structure (its pytree specs are kept)."""
    import torch

    if not isinstance(program, torch.export.ExportedProgram):
        raise PassError("expected a torch.export ExportedProgram", code="unsupported_model")
    # A copy: the unlifted module holds the program's own tensors, which training would change in place.
    unlifted = copy.deepcopy(program.module(check_guards=False))
    graph = unlifted.graph
    groups = _shareable_groups(graph, _find_lifts(unlifted))
    root = torch.nn.Module()
    taken: set[str] = set()
    paths: dict[str, str] = {}
    lifted_calls: set = set()
    for group in groups:
        module = _build_module(unlifted, group[0])
        path = _module_path(group[0])
        name = _unique_name(re.sub(r"\W", "_", path) or group[0].config[0], taken)
        root.add_module(name, module)
        paths[name] = path
        lifted_calls.update(_rewire(graph, group, name))
    non_persistent = _adopt_attributes(unlifted, root, graph, lifted_calls, taken)
    _open_fixed_reshapes(graph)
    lifted = torch.fx.GraphModule(root, graph, class_name="LiftedProgram")
    lifted.graph.lint()
    for name in non_persistent:
        lifted.register_buffer(name, lifted.get_buffer(name), persistent=False)
    lifted.meta[MODULE_PATHS_META] = paths
    return lifted.eval()


def module_names(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Lifted submodule name -> the dotted path of the module it was in the exported model."""
    return dict(getattr(gm, "meta", {}).get(MODULE_PATHS_META, {}))


def _arguments(node) -> dict[str, Any]:
    """The call's arguments by schema name, defaults filled in."""
    bound = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound


def _attribute(gm, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _target(node) -> str | None:
    """The get_attr target a node reads, or None for anything else."""
    return node.target if getattr(node, "op", None) == "get_attr" else None


def _find_lifts(gm) -> list[_Lift]:
    graph_attrs: dict[str, list] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            graph_attrs.setdefault(node.target, []).append(node)
    lifts = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        name = str(node.target)
        lift = None
        if name in CONVOLUTIONS:
            lift = _conv_lift(gm, node, name)
        elif name in LINEARS:
            lift = _linear_lift(gm, node, name)
        elif name in BATCH_NORMS or name in TUPLE_BATCH_NORMS:
            lift = _batch_norm_lift(gm, node, name, graph_attrs)
        if lift is not None:
            lifts.append(lift)
    return lifts


def _ints(value, ndim: int) -> tuple[int, ...] | None:
    """A conv setting as a tuple of ndim ints (aten allows a single value for all dims)."""
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not all(type(v) is int for v in values):
        return None
    return tuple(values * ndim) if len(values) == 1 else tuple(values)


def _conv_lift(gm, node, name: str) -> _Lift | None:
    args = _arguments(node)
    weight, bias = _target(args["weight"]), _target(args["bias"])
    tensor = _attribute(gm, weight) if weight else None
    if tensor is None or (args["bias"] is not None and bias is None):
        return None
    ndim = tensor.ndim - 2
    transposed = "transpose" in name or bool(args.get("transposed"))
    padding = args["padding"] if isinstance(args["padding"], str) else _ints(args["padding"], ndim)
    settings = (
        _ints(args["stride"], ndim),
        padding,
        _ints(args["dilation"], ndim),
        _ints(args.get("output_padding") or 0, ndim),
    )
    if not 1 <= ndim <= 3 or any(s is None for s in settings) or type(args["groups"]) is not int:
        return None
    params = {"weight": weight} | ({"bias": bias} if bias else {})
    config = ("conv", ndim, transposed, *settings, args["groups"])
    return _Lift(node, "input", config, params, outputs=[node], consumed=[node])


def _transposed_weight(gm, node) -> str | None:
    """The 2-D parameter a decomposed linear multiplies by, through its permute/t/transpose."""
    if getattr(node, "op", None) != "call_function" or str(node.target) not in _TRANSPOSES or len(node.users) != 1:
        return None
    weight = _target(node.args[0])
    tensor = _attribute(gm, weight) if weight else None
    if tensor is None or tensor.ndim != 2:
        return None
    if str(node.target) == "aten.permute.default":
        swaps = [d % 2 for d in node.args[1]] == [1, 0]
    else:  # t(w), or transpose(w, 0, 1) in either order
        swaps = sorted(d % 2 for d in node.args[1:3]) == [0, 1] if len(node.args) == 3 else True
    return weight if swaps else None


def _linear_lift(gm, node, name: str) -> _Lift | None:
    args = _arguments(node)
    if name == "aten.linear.default":
        weight, bias, source = _target(args["weight"]), args["bias"], "input"
        consumed = [node]
    else:  # addmm(bias, x, w.T) or mm(x, w.T), as run_decompositions writes a linear
        if name == "aten.addmm.default" and (args["beta"] != 1 or args["alpha"] != 1):
            return None
        transposed = args["mat2"]
        weight = _transposed_weight(gm, transposed)
        bias = args["self"] if name == "aten.addmm.default" else None
        source = "mat1" if name == "aten.addmm.default" else "self"
        consumed = [node, transposed]
    tensor = _attribute(gm, weight) if weight else None
    if tensor is None or tensor.ndim != 2:
        return None
    params = {"weight": weight}
    if bias is not None:
        bias_tensor = _attribute(gm, _target(bias)) if _target(bias) else None
        if bias_tensor is None or tuple(bias_tensor.shape) != (tensor.shape[0],):
            return None
        params["bias"] = _target(bias)
    return _Lift(node, source, ("linear",), params, outputs=[node], consumed=consumed)


def _tuple_outputs(node, name: str, stats: dict[str, str]) -> tuple[list, list] | None:
    """(getitem 0 nodes, nodes to erase) of a tuple-returning batch norm; None when another output is
    used, other than a functional batch norm's new running stats copied back into the buffers."""
    outputs, consumed = [], [node]
    for user in node.users:
        if user.target is not operator.getitem:
            return None
        consumed.append(user)
        index = user.args[1]
        if index == 0:
            outputs.append(user)
            continue
        stat = {3: stats["running_mean"], 4: stats["running_var"]}.get(index)
        if "functional" not in name or stat is None:
            if user.users:
                return None
            continue
        for write in user.users:
            if str(write.target) != "aten.copy_.default" or _target(write.args[0]) != stat or write.users:
                return None
            consumed.append(write)
    return (outputs, consumed) if outputs else None


def _step_counter(graph_attrs: dict[str, list], target: str) -> list | None:
    """The nodes that only count a batch norm's steps (add_(n, 1), or add then copy_ back), to be
    dropped since the lifted module counts; None when the counter is read for anything else."""
    consumed = []
    for attr in graph_attrs.get(target, []):
        consumed.append(attr)
        for user in attr.users:
            if str(user.target) == "aten.copy_.default" and not user.users:
                consumed.append(user)
            elif str(user.target) == "aten.add_.Tensor" and not user.users:
                consumed.append(user)
            elif str(user.target) == "aten.add.Tensor" and all(
                str(u.target) == "aten.copy_.default" and _target(u.args[0]) == target for u in user.users
            ):
                consumed.append(user)
            else:
                return None
    return consumed


def _batch_norm_lift(gm, node, name: str, graph_attrs: dict[str, list]) -> _Lift | None:
    args = _arguments(node)
    stats = {"running_mean": _target(args["running_mean"]), "running_var": _target(args["running_var"])}
    affine = {"weight": _target(args["weight"]), "bias": _target(args["bias"])}
    value = args["input"].meta.get("val") if hasattr(args["input"], "meta") else None
    rank = getattr(value, "ndim", None)
    if None in stats.values() or rank not in (2, 3, 4, 5) or len({v is None for v in affine.values()}) != 1:
        return None
    if type(args["momentum"]) is not float or type(args["eps"]) is not float:
        return None
    if any(args[role] is not None and affine[role] is None for role in affine):  # computed, not read
        return None
    if name in BATCH_NORMS:
        outputs, consumed = [node], [node]
    else:
        found = _tuple_outputs(node, name, stats)
        if found is None:
            return None
        outputs, consumed = found
    params = stats | {k: v for k, v in affine.items() if v}
    owner = stats["running_mean"].rpartition(".")[0]
    counter = f"{owner}.num_batches_tracked" if owner else "num_batches_tracked"
    counting = _step_counter(graph_attrs, counter)
    if counting:
        params["num_batches_tracked"] = counter
        consumed += counting
    # The counter is named in config too: its value starts the module's count even where its nodes stay.
    config = ("batch_norm", rank, args["momentum"], args["eps"], affine["weight"] is not None, counter)
    return _Lift(node, "input", config, params, outputs=outputs, consumed=consumed)


def _shareable_groups(graph, lifts: list[_Lift]) -> list[list[_Lift]]:
    """Lifts grouped by the tensors they read. A group is kept when its calls agree on the settings (one
    module, called once per call) and nothing outside it reads those tensors, so no weight is untied."""
    by_params: dict[tuple, list[_Lift]] = {}
    for lift in lifts:
        by_params.setdefault(tuple(sorted(lift.params.items())), []).append(lift)
    readers: dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(node.target, []).extend(node.users)
    groups, claimed = [], set()
    for group in by_params.values():
        consumed = {node for lift in group for node in lift.consumed}
        targets = {target for lift in group for target in lift.params.values()}
        private = all(user in consumed for target in targets for user in readers.get(target, []))
        if private and len({lift.config for lift in group}) == 1 and not consumed & claimed:
            groups.append(group)
            claimed |= consumed
    return groups


def _module_path(lift: _Lift) -> str:
    """The dotted path of the module the call was made in: the innermost nn_module_stack entry, else
    the module that owns the weight."""
    stack = lift.node.meta.get("nn_module_stack") or {}
    if stack:
        path = str(list(stack.values())[-1][0])
    else:
        path = next(iter(lift.params.values())).rpartition(".")[0]
    path = re.sub(r"^L\['self'\]\.?", "", path)  # dynamo-style paths: L['self'].backbone[0]
    path = re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r".\1", path)
    return re.sub(r"@\d+$", "", path).strip(".")


def _unique_name(base: str, taken: set[str]) -> str:
    import torch

    name = f"m_{base}" if base[:1].isdigit() else base
    reserved = set(dir(torch.fx.GraphModule)) | {"training", "meta", "graph", "_in_spec", "_out_spec"}
    candidate, suffix = name, 1
    while candidate in taken or candidate in reserved:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    taken.add(candidate)
    return candidate


def _build_module(gm, lift: _Lift):
    """The module the call becomes, holding the program's own Parameter and buffer objects."""
    import torch
    from torch import nn
    from torch.nn.utils import skip_init

    tensors = {role: _attribute(gm, target) for role, target in lift.params.items()}
    weight, has_bias = tensors.get("weight"), "bias" in tensors
    if lift.config[0] == "conv":
        _, ndim, transposed, stride, padding, dilation, output_padding, groups = lift.config
        settings = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups, "bias": has_bias}
        if transposed:
            cls, channels = getattr(nn, f"ConvTranspose{ndim}d"), (weight.shape[0], weight.shape[1] * groups)
            settings["output_padding"] = output_padding
        else:
            cls, channels = getattr(nn, f"Conv{ndim}d"), (weight.shape[1] * groups, weight.shape[0])
        module = skip_init(cls, *channels, tuple(weight.shape[2:]), **settings)
    elif lift.config[0] == "linear":
        module = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=has_bias)
    else:
        _, rank, momentum, eps, affine, counter = lift.config
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
        mean = tensors["running_mean"]
        module = skip_init(cls, mean.shape[0], eps=eps, momentum=momentum, affine=affine)
        module.running_mean, module.running_var = mean, tensors["running_var"]
        count = _attribute(gm, counter)
        module.num_batches_tracked = count if isinstance(count, torch.Tensor) else torch.tensor(0)
    for role in ("weight", "bias"):
        if tensors.get(role) is not None:
            value = tensors[role]
            if not isinstance(value, nn.Parameter):  # a constant in the program: trainable from here on
                value = nn.Parameter(value.detach(), requires_grad=value.is_floating_point())
            setattr(module, role, value)
    return module


def _rewire(graph, group: list[_Lift], name: str) -> list:
    """Replace the group's calls by calls of submodule ``name``; the new call_module nodes."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    created, doomed = [], set()
    for lift in group:
        with graph.inserting_before(lift.node):
            source = _arguments(lift.node)[lift.input]  # read now: an earlier lift may have replaced it
            call = graph.create_node("call_module", name, (source,))  # the owner is the old module
        for key in ("val", "tensor_meta", "stack_trace", "nn_module_stack"):
            source = lift.outputs[0] if key in lift.outputs[0].meta else lift.node
            if key in source.meta:
                call.meta[key] = source.meta[key]
        for output in lift.outputs:
            output.replace_all_uses_with(call)
        created.append(call)
        doomed.update(lift.consumed)
    for node in sorted(doomed, key=order.__getitem__, reverse=True):
        graph.erase_node(node)
    return created


def _adopt_attributes(gm, root, graph, lifted: set, taken: set[str]) -> list[str]:
    """Move what the remaining get_attr (and any call_module) nodes read onto ``root`` under flat names,
    as the Parameter, buffer or constant it was; the names to register as non-persistent buffers."""
    import torch

    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    parameters = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    persistent = {name for name, _ in gm.named_buffers(remove_duplicate=False) if _persistent(gm, name)}
    renamed: dict[str, str] = {}
    non_persistent = []
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module") or node in lifted:
            continue
        if node.target not in renamed:
            value = _attribute(gm, node.target)
            name = _unique_name(re.sub(r"\W", "_", node.target), taken)
            if node.target in parameters:
                root.register_parameter(name, value)
            elif isinstance(value, torch.Tensor):
                root.register_buffer(name, value)
                if node.target not in persistent:  # constants, non-persistent buffers: not in a state_dict
                    non_persistent.append(name)
            elif isinstance(value, torch.nn.Module):
                root.add_module(name, value)
            else:
                setattr(root, name, value)
            renamed[node.target] = name
        node.target = renamed[node.target]
    return non_persistent


def _persistent(gm, target: str) -> bool:
    owner, _, leaf = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    return leaf not in module._non_persistent_buffers_set


def _reshape_plan(before: list[int], after: list[int]) -> list | None:
    """Per output dim of a reshape: the input dims whose sizes multiply to it, or its fixed size where
    the reshape splits a dim (or adds leading 1s, which a batch of 1 would make ambiguous)."""
    groups, i, j = [], 0, 0
    while i < len(before) and j < len(after):
        ins, outs, a, b = [i], [j], before[i], after[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b and i < len(before):
                ins.append(i)
                a, i = a * before[i], i + 1
            elif b < a and j < len(after):
                outs.append(j)
                b, j = b * after[j], j + 1
            else:
                return None
        groups.append((ins, outs))
    if not groups:
        return None
    groups[-1][0].extend(range(i, len(before)))  # trailing 1s
    groups[-1][1].extend(range(j, len(after)))
    plan: list = list(after)
    for ins, outs in groups:
        if len(outs) == 1 or (after[outs[0]] != 1 and all(after[o] == 1 for o in outs[1:])):
            plan[outs[0]] = tuple(ins)
    return plan if any(isinstance(p, tuple) for p in plan) else None


def _open_fixed_reshapes(graph) -> None:
    """Make reshapes to a traced shape (view(x, [1, 512])) read the sizes they keep from their input, so
    that the module runs at other batch sizes and after pruning changes channel counts."""
    import torch

    for node in list(graph.nodes):
        if node.op != "call_function" or str(node.target) not in RESHAPES or len(node.args) != 2:
            continue
        source = node.args[0]
        before = getattr(getattr(source, "meta", {}).get("val"), "shape", None)
        after = getattr(node.meta.get("val"), "shape", None)
        if before is None or after is None or not all(type(d) is int for d in (*before, *after)) or 0 in before:
            continue
        plan = _reshape_plan(list(before), list(after))
        if plan is None:
            continue
        shape = []
        with graph.inserting_before(node):
            for entry in plan:
                if not isinstance(entry, tuple):
                    shape.append(entry)
                    continue
                size = graph.call_function(torch.ops.aten.sym_size.int, (source, entry[0]))
                for dim in entry[1:]:
                    other = graph.call_function(torch.ops.aten.sym_size.int, (source, dim))
                    size = graph.call_function(operator.mul, (size, other))
                shape.append(size)
        node.args = (source, shape)
