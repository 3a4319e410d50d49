"""Recognise an uploaded model file by its content and read its inputs and outputs.

Runs in the API, so it never imports torch and never executes or unpickles anything:
- ONNX is read with a small streaming protobuf scanner that seeks past weights, so a
  multi-GB model costs kilobytes of memory; only the graph's input/output records are parsed.
- TorchScript and torch.export ``.pt2`` files are zip archives; their code and JSON members
  are read as text, their pickles are only walked opcode by opcode (``pickletools``).
"""

from __future__ import annotations

import json
import pickletools
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from core.datasets import check_zip_members
from core.errors import InvalidInput, UnsupportedMedia
from core.formats import EXPORTED_PROGRAM, KERAS, ONNX, SAVED_MODEL, STATE_DICT, TORCHSCRIPT

# torchvision classification architectures a state_dict upload may name, with the input size
# each was trained at (the job's input_shape may choose another the architecture accepts).
# Kept here as data, so the API needs no torchvision; a test checks them against torchvision.
TORCHVISION_ARCHITECTURES: dict[str, int] = {
    **{f"resnet{d}": 224 for d in (18, 34, 50, 101, 152)},
    "resnext50_32x4d": 224,
    "resnext101_32x8d": 224,
    "wide_resnet50_2": 224,
    "wide_resnet101_2": 224,
    "mobilenet_v2": 224,
    "mobilenet_v3_small": 224,
    "mobilenet_v3_large": 224,
    **{f"efficientnet_b{i}": 224 for i in range(8)},
    "efficientnet_v2_s": 224,
    "efficientnet_v2_m": 224,
    "efficientnet_v2_l": 224,
    **{f"densenet{d}": 224 for d in (121, 161, 169, 201)},
    "shufflenet_v2_x0_5": 224,
    "shufflenet_v2_x1_0": 224,
    "shufflenet_v2_x1_5": 224,
    "shufflenet_v2_x2_0": 224,
    "squeezenet1_0": 224,
    "squeezenet1_1": 224,
    "mnasnet0_5": 224,
    "mnasnet1_0": 224,
    "regnet_y_400mf": 224,
    "regnet_y_800mf": 224,
    "regnet_x_400mf": 224,
    "convnext_tiny": 224,
    "convnext_small": 224,
    "vgg11": 224,
    "vgg16": 224,
    "alexnet": 224,
    "googlenet": 224,
    "inception_v3": 299,
}
# Each architecture's state_dict keys and shapes (written by tests/architecture_shapes.py, which
# a test runs against the installed torchvision).
SHAPES_FILE = Path(__file__).with_name("torchvision_shapes.json.gz")
# A state_dict's data.pkl holds names and shapes only (the largest listed, EfficientNet-V2-L's:
# 250 KB, 58k opcodes): walking much more would only cost the API's memory and time.
MAX_WEIGHTS_PICKLE_BYTES = 4 * 1024**2
MAX_PICKLE_OPCODES = 500_000
# Everything a plain (or checkpoint-wrapped) state_dict pickle refers to. Anything else in the
# pickle's opcodes means it would run other code when loaded: refused, never loaded.
STATE_DICT_GLOBALS = {
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch.FloatStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.DoubleStorage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
}


@dataclass
class ModelInfo:
    format: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    details: dict[str, Any] = field(default_factory=dict)


def inspect_model(path: Path, *, architecture: str | None = None) -> ModelInfo:
    """``architecture``: a torchvision architecture name, which makes a state_dict upload
    acceptable (its weights alone say nothing about the graph)."""
    if architecture is not None and architecture not in TORCHVISION_ARCHITECTURES:
        raise InvalidInput(
            f"unknown architecture {architecture!r}",
            code="unknown_architecture",
            details={"architectures": sorted(TORCHVISION_ARCHITECTURES)},
        )
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        raise UnsupportedMedia("the model file is empty", code="empty_file")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _pickle_refused("a raw Python pickle")
    if head[:4] == b"PK\x03\x04":
        return _inspect_torch_zip(path, architecture)
    return _inspect_onnx(path)


def _pickle_refused(what: str) -> UnsupportedMedia:
    return UnsupportedMedia(
        f"the file is {what}; cvopt never unpickles uploads. Upload ONNX, a TorchScript file "
        "(torch.jit.save) or a torch.export archive (torch.export.save, .pt2).",
        code="pickle_not_allowed",
    )


def _unrecognized() -> UnsupportedMedia:
    return UnsupportedMedia(
        "the file is not a recognised model format (expected ONNX, TorchScript or a torch.export .pt2 archive)",
        code="unrecognized_model_format",
    )


# -- ONNX --------------------------------------------------------------------------------------

_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    16: "bfloat16",
}


class _Corrupt(Exception):
    pass


def _varint(fh: BinaryIO) -> int | None:
    shift = result = 0
    while True:
        b = fh.read(1)
        if not b:
            if shift == 0:
                return None
            raise _Corrupt("truncated varint")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise _Corrupt("varint too long")


def _fields(fh: BinaryIO, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field_number, wire_type, payload_offset, payload_length) up to ``end`` (a varint's
    payload is the varint's own bytes; fixed-width fields are skipped)."""
    while fh.tell() < end:
        tag = _varint(fh)
        if tag is None:
            raise _Corrupt("truncated message")
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _Corrupt("field number 0")
        if wire == 0:
            start = fh.tell()
            _varint(fh)
            yield number, wire, start, fh.tell() - start
        elif wire == 1:
            fh.seek(8, 1)
        elif wire == 5:
            fh.seek(4, 1)
        elif wire == 2:
            length = _varint(fh)
            if length is None:
                raise _Corrupt("truncated length")
            start = fh.tell()
            if start + length > end:
                raise _Corrupt("a field runs past the end of the file (truncated upload?)")
            yield number, wire, start, length
            fh.seek(start + length)
        else:
            raise _Corrupt(f"wire type {wire} is not protobuf")
    if fh.tell() != end:
        raise _Corrupt("a field runs past the end of its message")


def _node_operator(fh: BinaryIO, start: int, length: int) -> str:
    """A NodeProto's operator as "op_type" (default domain) or "domain::op_type", its attributes (a
    Constant node's weights) skipped, not read."""
    here = fh.tell()
    fh.seek(start)
    found: dict[int, str] = {}
    for number, wire, f_start, f_len in _fields(fh, start + length):
        if number in (4, 7) and wire == 2:
            inner = fh.tell()
            fh.seek(f_start)
            found[number] = fh.read(f_len).decode("utf-8", "replace")
            fh.seek(inner)
    fh.seek(here)
    domain = found.get(7, "")
    return found.get(4, "") if domain in ("", "ai.onnx") else f"{domain}::{found.get(4, '')}"


def _tensor_spec(value_info_bytes: bytes) -> dict[str, Any]:
    import onnx

    vi = onnx.ValueInfoProto.FromString(value_info_bytes)
    tt = vi.type.tensor_type
    shape: list[int | str | None] | None = None
    if tt.HasField("shape"):
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                shape.append(d.dim_param)
            else:
                shape.append(None)
    return {"name": vi.name, "shape": shape, "dtype": _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))}


def _inspect_onnx(path: Path) -> ModelInfo:
    size = path.stat().st_size
    ir_version = None
    inputs: list[bytes] = []
    outputs: list[bytes] = []
    initializer_names: set[str] = set()
    node_count = 0
    operators: set[str] = set()
    saw_graph = False
    try:
        with open(path, "rb") as fh:
            for number, wire, start, length in _fields(fh, size):
                if number == 1 and wire == 0:
                    ir_version = True
                elif number == 7 and wire == 2:
                    saw_graph = True
                    fh.seek(start)
                    for g_num, g_wire, g_start, g_len in _fields(fh, start + length):
                        if g_wire != 2:
                            continue
                        if g_num == 1:
                            node_count += 1
                            operators.add(_node_operator(fh, g_start, g_len))
                        elif g_num in (11, 12):
                            here = fh.tell()
                            fh.seek(g_start)
                            (inputs if g_num == 11 else outputs).append(fh.read(g_len))
                            fh.seek(here)
                        elif g_num == 5:
                            # TensorProto: read only its name (field 8), seek past the weights.
                            here = fh.tell()
                            fh.seek(g_start)
                            for t_num, t_wire, t_start, t_len in _fields(fh, g_start + g_len):
                                if t_num == 13:  # external_data: weights in files beside the model
                                    raise InvalidInput(
                                        "the ONNX model keeps its weights in external files; upload a single "
                                        "file (onnx.save(model, path, save_as_external_data=False)). External "
                                        "data paths are never followed.",
                                        code="external_data_not_allowed",
                                    )
                                if t_num == 8 and t_wire == 2:
                                    inner = fh.tell()
                                    fh.seek(t_start)
                                    initializer_names.add(fh.read(t_len).decode("utf-8", "replace"))
                                    fh.seek(inner)
                            fh.seek(here)
    except _Corrupt as exc:
        if ir_version is None and not saw_graph:
            raise _unrecognized() from exc
        raise UnsupportedMedia(f"the ONNX file is corrupt: {exc}", code="corrupt_model") from exc
    if ir_version is None or not saw_graph or not outputs or node_count == 0:
        raise _unrecognized()
    try:
        in_specs = [_tensor_spec(b) for b in inputs]
        out_specs = [_tensor_spec(b) for b in outputs]
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UnsupportedMedia(f"the ONNX graph's inputs are corrupt: {exc}", code="corrupt_model") from exc
    # Old exporters list initializers among the inputs; they are weights, not inputs.
    in_specs = [s for s in in_specs if s["name"] not in initializer_names]
    return ModelInfo(
        format=ONNX, inputs=in_specs, outputs=out_specs, details={"nodes": node_count, "operators": sorted(operators)}
    )


# -- PyTorch zip archives -----------------------------------------------------------------------

# torch/_export/serde/schema.py ScalarType
_EXPORT_DTYPES = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float16",
    7: "float32",
    8: "float64",
    12: "bool",
    13: "bfloat16",
}


def _inspect_torch_zip(path: Path, architecture: str | None = None) -> ModelInfo:
    try:
        zf = zipfile.ZipFile(path)
        names = zf.namelist()
        check_zip_members(zf)
        bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UnsupportedMedia(f"the archive is corrupt or truncated: {exc}", code="corrupt_model") from exc
    if bad is not None:
        raise UnsupportedMedia(f"the archive member {bad} is corrupt", code="corrupt_model")
    with zf:
        if {"config.json", "metadata.json"} <= set(names) and any(n.endswith(".weights.h5") for n in names):
            return _inspect_keras(zf)
        saved = [n for n in names if n == "saved_model.pb" or n.endswith("/saved_model.pb")]
        if saved:
            return _inspect_saved_model(zf, min(saved, key=len))
        model_json = [
            n for n in names if n.endswith("/models/model.json") or n.endswith("serialized_exported_program.json")
        ]
        if model_json:
            return _inspect_exported_program(zf, model_json[0])
        code_files = [n for n in names if "/code/" in n and n.endswith(".py")]
        data_pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if code_files and data_pkl:
            return _inspect_torchscript(zf, code_files, data_pkl[0])
        if data_pkl and architecture is not None:
            if len(data_pkl) > 1:  # torch reads the one under the first entry's folder: check that one
                raise InvalidInput(
                    f"the checkpoint holds {len(data_pkl)} data.pkl members; torch.save writes one",
                    code="corrupt_model",
                    details={"members": data_pkl[:5]},
                )
            return _inspect_state_dict(zf, data_pkl[0], architecture)
        if data_pkl:
            raise _pickle_refused(
                "a torch.save checkpoint (a pickle, e.g. a state_dict or a whole module); a state_dict "
                "of a torchvision architecture is accepted with the form field 'architecture'"
            )
    raise UnsupportedMedia(
        "the zip archive is neither TorchScript, a torch.export .pt2 archive, a Keras .keras file nor a "
        "zipped TensorFlow SavedModel",
        code="unrecognized_model_format",
    )


def _sym_dim(size: dict[str, Any]) -> int | str | None:
    if "as_int" in size:
        return int(size["as_int"])
    expr = size.get("as_expr") or {}
    return expr.get("expr_str") or None


def _inspect_exported_program(zf: zipfile.ZipFile, member: str) -> ModelInfo:
    try:
        doc = json.loads(zf.read(member))
        gm = doc["graph_module"]
        graph, signature = gm["graph"], gm["signature"]
        values = graph["tensor_values"]

        def spec(name: str) -> dict[str, Any]:
            meta = values.get(name, {})
            return {
                "name": name,
                "shape": [_sym_dim(s) for s in meta.get("sizes", [])] if meta else None,
                "dtype": _EXPORT_DTYPES.get(meta.get("dtype"), "unknown"),
            }

        inputs = [
            spec(s["user_input"]["arg"]["as_tensor"]["name"])
            for s in signature["input_specs"]
            if "user_input" in s and "as_tensor" in s["user_input"]["arg"]
        ]
        outputs = [
            spec(s["user_output"]["arg"]["as_tensor"]["name"])
            for s in signature["output_specs"]
            if "user_output" in s and "as_tensor" in s["user_output"]["arg"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedMedia(
            f"the .pt2 archive's program description is unreadable: {exc!r}", code="corrupt_model"
        ) from exc
    return ModelInfo(
        format=EXPORTED_PROGRAM,
        inputs=inputs,
        outputs=outputs,
        details={"torch_version": doc.get("torch_version")},
    )


def _inspect_state_dict(zf: zipfile.ZipFile, data_pkl: str, architecture: str) -> ModelInfo:
    # A state_dict's pickle is its structure only (the tensors' bytes are other members): a few
    # KB to a few MB. A larger one would only cost the API memory and time to walk.
    pickle_bytes = zf.getinfo(data_pkl).file_size
    if pickle_bytes > MAX_WEIGHTS_PICKLE_BYTES:
        raise UnsupportedMedia(
            f"the checkpoint's pickle is {pickle_bytes} bytes; a state_dict's is far smaller "
            f"(at most {MAX_WEIGHTS_PICKLE_BYTES})",
            code="corrupt_model",
        )
    data = zf.read(data_pkl)
    try:
        checkpoint, foreign = _read_weights_pickle(data)
    except _UnreadablePickle as exc:
        checkpoint, foreign = None, exc.foreign or _named_globals(data)
        if not foreign:
            raise UnsupportedMedia(
                f"the checkpoint's pickle could not be read as weights: {exc}", code="corrupt_model"
            ) from exc
    if foreign:
        raise UnsupportedMedia(
            "the checkpoint is not a plain state_dict: its pickle refers to "
            + ", ".join(foreign[:5])
            + "; it is refused and never loaded",
            code="pickle_not_allowed",
            details={"globals": foreign[:20]},
        )
    _check_state_dict_fits(checkpoint, architecture)
    size = TORCHVISION_ARCHITECTURES[architecture]
    return ModelInfo(
        format=STATE_DICT,
        # torchvision models name their input x; the exported graph keeps that name.
        inputs=[{"name": "x", "shape": ["batch", 3, "height", "width"], "dtype": "float32"}],
        outputs=[],
        details={"architecture": architecture, "default_input_shape": [1, 3, size, size]},
    )


@dataclass(frozen=True)
class _TensorShape:
    """What a state_dict pickle says of one tensor, without its data."""

    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Global:
    name: str


_PUSH_ARGUMENT = {
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "BININT",
    "BININT1",
    "BININT2",
    "INT",
    "LONG",
    "LONG1",
    "LONG4",
    "BINFLOAT",
    "FLOAT",
    "BINBYTES",
    "SHORT_BINBYTES",
    "BINBYTES8",
    "BINSTRING",
    "SHORT_BINSTRING",
    "STRING",
}


def _named_globals(data: bytes) -> list[str]:
    """The globals a pickle names literally (GLOBAL, INST), for the refusal of one the interpreter
    gave up on before reaching them; never the basis of an acceptance."""
    try:
        found = [
            arg.replace(" ", ".")
            for op, arg, _ in pickletools.genops(data)
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str)
        ]
    except Exception:  # a malformed stream: what was found before it stands
        return []
    return [g for g in dict.fromkeys(found) if g not in STATE_DICT_GLOBALS]


class _UnreadablePickle(ValueError):
    def __init__(self, message: str, foreign: list[str]) -> None:
        super().__init__(message)
        self.foreign = foreign


def _read_weights_pickle(data: bytes) -> tuple[Any, list[str]]:
    """(the structure of a weights-only pickle: dicts, lists, tuples, numbers, strings, each tensor
    as its shape; the globals it names beyond STATE_DICT_GLOBALS). The opcodes are interpreted
    here, never by ``pickle``: nothing is imported or called. Globals are resolved as the stack
    resolves them (a protocol-4 STACK_GLOBAL may take memoized strings), so what is checked is
    what an unpickler would import."""
    foreign: list[str] = []
    try:
        return _interpret_weights_pickle(data, foreign), foreign
    except (ValueError, IndexError, KeyError, TypeError, AttributeError, ArithmeticError) as exc:
        raise _UnreadablePickle(str(exc) or type(exc).__name__, foreign) from exc


def _global(name: str, foreign: list[str]) -> _Global:
    if name not in STATE_DICT_GLOBALS and name not in foreign:
        foreign.append(name)
    return _Global(name)


def _interpret_weights_pickle(data: bytes, foreign: list[str]) -> Any:
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    for count, (op, arg, _pos) in enumerate(pickletools.genops(data)):
        if count > MAX_PICKLE_OPCODES:
            raise ValueError(f"more than {MAX_PICKLE_OPCODES} opcodes")
        name = op.name
        if name in ("PROTO", "FRAME", "STOP"):
            continue
        if name == "MARK":
            marks.append(len(stack))
        elif name in _PUSH_ARGUMENT:
            stack.append(arg)
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE"):
            stack.append({"EMPTY_DICT": {}, "EMPTY_LIST": [], "EMPTY_TUPLE": ()}[name])
        elif name in ("DICT", "LIST", "TUPLE"):
            items = pop_mark()
            stack.append(
                dict(zip(items[::2], items[1::2], strict=True))
                if name == "DICT"
                else list(items)
                if name == "LIST"
                else tuple(items)
            )
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            top = tuple(stack[-n:])
            del stack[-n:]
            stack.append(top)
        elif name == "APPEND":
            value = stack.pop()
            stack[-1].append(value)
        elif name == "APPENDS":
            items = pop_mark()
            stack[-1].extend(items)
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            stack[-1][key] = value
        elif name == "SETITEMS":
            items = pop_mark()
            stack[-1].update(zip(items[::2], items[1::2], strict=True))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[cast(int, arg)] = stack[-1]  # genops gives these opcodes an int
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[cast(int, arg)])
        elif name in ("GLOBAL", "INST"):
            path = cast(str, arg).replace(" ", ".")  # genops gives these opcodes "module name"
            stack.append(_global(path, foreign))
            if name == "INST":
                raise ValueError(f"an instance of {path}")
        elif name == "STACK_GLOBAL":
            attr, module = stack.pop(), stack.pop()
            stack.append(_global(f"{module}.{attr}", foreign))
        elif name == "BINPERSID":
            stack[-1] = ("storage", stack[-1])  # a reference to a data file; its bytes are not needed
        elif name == "REDUCE":
            args, fn = stack.pop(), stack.pop()
            stack.append(_reduce(fn, args))
        elif name == "BUILD":
            stack.pop()  # an object's state (an OrderedDict's _metadata): not part of the weights
        else:
            raise ValueError(f"unexpected pickle opcode {name}")
    if len(stack) != 1:
        raise ValueError("the pickle does not end with one object")
    return stack[0]


def _reduce(fn: Any, args: tuple[Any, ...]) -> Any:
    if not isinstance(fn, _Global):
        raise ValueError("a call of something that is not a global")
    if fn.name not in STATE_DICT_GLOBALS:
        return None  # refused by the caller, which lists every such global
    if fn.name == "collections.OrderedDict":
        return dict(args[0]) if args else {}
    if fn.name == "torch._utils._rebuild_tensor_v2":
        return _TensorShape(tuple(int(d) for d in args[2]))
    if fn.name == "torch._utils._rebuild_parameter":
        return args[0]
    raise ValueError(f"a call of {fn.name}")


_SHAPES: dict[str, dict[str, Any]] | None = None


def _architecture_shapes(architecture: str) -> dict[str, Any]:
    global _SHAPES
    if _SHAPES is None:
        import gzip

        _SHAPES = json.loads(gzip.decompress(SHAPES_FILE.read_bytes()))
    return _SHAPES[architecture]


def unwrap_checkpoint(obj: Any) -> Any:
    """A plain state_dict, or the one inside a checkpoint wrapped the way training scripts save
    them (the API checks, and the worker loads, the same one)."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def _check_state_dict_fits(checkpoint: Any, architecture: str) -> None:
    """Refuse weights that torchvision's ``architecture`` would not load, naming the first
    mismatches: what the worker would find only when a job runs, and what must never reach a
    step's cache. A pruned model saved by this service records its changed shapes beside its
    weights (``module_attributes``): only its keys are checked."""
    state = unwrap_checkpoint(checkpoint)
    tensors = {str(k): v for k, v in state.items() if isinstance(v, _TensorShape)} if isinstance(state, dict) else {}
    if not tensors:
        raise InvalidInput(
            "the checkpoint holds no state_dict (no tensors found)",
            code="state_dict_mismatch",
            details={"architecture": architecture},
        )
    pruned = isinstance(checkpoint, dict) and isinstance(checkpoint.get("module_attributes"), dict)
    expected = _architecture_shapes(architecture)
    want: dict[str, list[int | None]] = expected["tensors"]
    optional = set(expected["optional"])
    if optional and not optional & set(tensors):
        want = {k: v for k, v in want.items() if k not in optional}
    # Checkpoints from before BatchNorm counted its batches load without those counters.
    missing = [k for k in want if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in want]
    wrong = (
        []
        if pruned
        else [
            f"{k}: {list(tensors[k].shape)} (expected {['*' if d is None else d for d in want[k]]})"
            for k in want
            if k in tensors
            and (
                len(tensors[k].shape) != len(want[k])
                or any(d is not None and d != got for d, got in zip(want[k], tensors[k].shape, strict=False))
            )
        ]
    )
    if missing or unexpected or wrong:
        parts = [
            f"{len(v)} {what} (first: {', '.join(v[:3])})"
            for what, v in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong))
            if v
        ]
        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = "; the keys start with 'module.' (saved from DataParallel): save model.module.state_dict()"
        raise InvalidInput(
            f"the weights do not fit torchvision's {architecture}: " + "; ".join(parts) + hint,
            code="state_dict_mismatch",
            details={
                "architecture": architecture,
                "missing_keys": missing[:20],
                "unexpected_keys": unexpected[:20],
                "shape_mismatches": wrong[:20],
            },
        )


_FORWARD_RE = re.compile(r"def forward\(self(?:: [\w.]+)?,?(?P<args>.*?)\)\s*->", re.S)


def _root_class(zf: zipfile.ZipFile, data_pkl: str) -> str | None:
    """The class of the pickled root module, read from opcodes without unpickling."""
    strings: list[str] = []
    for op, arg, _pos in pickletools.genops(zf.read(data_pkl)):
        if op.name == "GLOBAL" and isinstance(arg, str):
            return arg.replace(" ", ".")
        if isinstance(arg, str):
            strings.append(arg)
        if op.name == "STACK_GLOBAL" and len(strings) >= 2:
            return f"{strings[-2]}.{strings[-1]}"
    return None


def _inspect_torchscript(zf: zipfile.ZipFile, code_files: list[str], data_pkl: str) -> ModelInfo:
    try:
        root = _root_class(zf, data_pkl)
    except Exception as exc:  # a malformed opcode stream: a corrupt archive
        raise UnsupportedMedia(f"the TorchScript archive is corrupt: {exc}", code="corrupt_model") from exc
    args: list[str] = []
    if root:
        module, _, cls = root.rpartition(".")
        candidates = [n for n in code_files if n.endswith("/code/" + module.replace(".", "/") + ".py")]
        for name in candidates:
            text = zf.read(name).decode("utf-8", "replace")
            m = re.search(rf"class {re.escape(cls)}\(.*?(?=\nclass |\Z)", text, re.S)
            if m and (fm := _FORWARD_RE.search(m.group(0))):
                args = [a.split(":")[0].strip() for a in fm.group("args").split(",") if ":" in a and "Tensor" in a]
                break
    inputs = [{"name": a, "shape": None, "dtype": "float32"} for a in args] or [
        {"name": "input", "shape": None, "dtype": "float32"}
    ]
    # TorchScript keeps no shapes: a job on it must give input_shape.
    return ModelInfo(format=TORCHSCRIPT, inputs=inputs, outputs=[], details={"root_class": root})


# -- TensorFlow: Keras .keras archives and zipped SavedModels (read, never loaded) -----------------

MAX_SAVED_MODEL_PB = 64 * 1024 * 1024  # the graph; weights live in variables/
_TF_DTYPES = {
    1: "float32",
    2: "float64",
    3: "int32",
    4: "uint8",
    6: "int8",
    9: "int64",
    10: "bool",
    19: "float16",
    14: "bfloat16",
}


def _keras_dtype(value: Any) -> str:
    if isinstance(value, dict):  # Keras 3 serializes a DTypePolicy
        value = (value.get("config") or {}).get("name", "float32")
    return str(value or "float32").replace("mixed_", "")


def _inspect_keras(zf: zipfile.ZipFile) -> ModelInfo:
    """A Keras 3 ``.keras`` file: inputs from its InputLayers (or build config), outputs from the
    last layer's units when it is Dense. Nothing is deserialized but JSON."""
    import json

    try:
        config = json.loads(zf.read("config.json"))
        metadata = json.loads(zf.read("metadata.json"))
    except (ValueError, KeyError) as exc:
        raise UnsupportedMedia(f"the .keras archive's config is not valid JSON: {exc}", code="corrupt_model") from exc
    inner = config.get("config") or {}
    layers = inner.get("layers") or []
    inputs: list[dict[str, Any]] = []
    for layer in layers:
        if layer.get("class_name") == "InputLayer":
            c = layer.get("config") or {}
            shape = c.get("batch_shape") or c.get("batch_input_shape")
            if shape is not None:
                inputs.append(
                    {
                        "name": c.get("name", f"input_{len(inputs)}"),
                        "shape": [d if isinstance(d, int) else None for d in shape],
                        "dtype": _keras_dtype(c.get("dtype")),
                    }
                )
    if not inputs:
        shape = (config.get("build_config") or {}).get("input_shape")
        if shape is not None:
            inputs.append(
                {"name": "input", "shape": [d if isinstance(d, int) else None for d in shape], "dtype": "float32"}
            )
    outputs = []
    if layers:
        last = layers[-1]
        units = (last.get("config") or {}).get("units")
        outputs.append(
            {
                "name": (last.get("config") or {}).get("name", "output"),
                "shape": [None, units] if isinstance(units, int) else None,
                "dtype": "float32",
            }
        )
    return ModelInfo(
        format=KERAS,
        inputs=inputs,
        outputs=outputs,
        details={"keras_version": metadata.get("keras_version"), "class_name": config.get("class_name")},
    )


def _inspect_saved_model(zf: zipfile.ZipFile, member: str) -> ModelInfo:
    """The ``serving_default`` signature of a SavedModel, read from saved_model.pb with the
    protobuf wire format (SavedModel.meta_graphs[].signature_def), without TensorFlow."""
    import io

    root = member[: -len("saved_model.pb")]
    for info in zf.infolist():
        name = info.filename
        if name.startswith("/") or ".." in name.split("/") or (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise InvalidInput(f"the archive holds an unsafe path: {name!r}", code="unsafe_archive")
    if zf.getinfo(member).file_size > MAX_SAVED_MODEL_PB:
        raise InvalidInput("saved_model.pb is over 64 MiB (constants frozen into the graph?)", code="model_too_large")
    data = zf.read(member)
    signatures: dict[str, dict[str, Any]] = {}
    try:
        fh = io.BytesIO(data)
        for number, wire, start, length in _fields(fh, len(data)):  # seeks past the graph's bytes
            if number == 2 and wire == 2:  # SavedModel.meta_graphs
                meta_graph = data[start : start + length]
                signatures.update(_signature_defs(meta_graph))
    except (_Corrupt, TypeError) as exc:
        raise UnsupportedMedia(f"saved_model.pb is not a valid SavedModel: {exc}", code="corrupt_model") from exc
    signature = signatures.get("serving_default") or next(iter(signatures.values()), None)
    if signature is None:
        raise InvalidInput(
            "the SavedModel has no signature to convert (export it with a serving_default "
            "signature, e.g. keras Model.export)",
            code="no_signature",
        )
    return ModelInfo(
        format=SAVED_MODEL,
        inputs=signature["inputs"],
        outputs=signature["outputs"],
        details={
            "signature": "serving_default" if "serving_default" in signatures else next(iter(signatures)),
            "root": root,
        },
    )


def _message(data: bytes) -> list[tuple[int, int | bytes]]:
    """A small protobuf message's fields: (number, varint value or payload bytes); fixed-width
    fields are skipped (none of the SavedModel fields read here has one)."""
    import io

    fh, out = io.BytesIO(data), list[tuple[int, int | bytes]]()
    while fh.tell() < len(data):
        tag = _varint(fh)
        if tag is None:
            raise _Corrupt("truncated message")
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value = _varint(fh)
            if value is None:  # a varint cut off by the message's end
                raise _Corrupt("truncated varint")
            out.append((number, value))
        elif wire == 2:
            length = _varint(fh)
            if length is None or fh.tell() + length > len(data):
                raise _Corrupt("a field runs past the end of its message")
            out.append((number, fh.read(length)))
        elif wire in (1, 5):
            fh.seek(8 if wire == 1 else 4, 1)
        else:
            raise _Corrupt(f"wire type {wire} is not protobuf")
    return out


def _map_entries(data: bytes, field_number: int) -> list[tuple[str, bytes]]:
    """A protobuf map<string, Message> field: entries are messages {key = 1; value = 2}."""
    entries = []
    for number, entry in _message(data):
        if number == field_number and isinstance(entry, bytes):
            fields = dict(_message(entry))
            entries.append((bytes(fields.get(1, b"")).decode("utf-8", "replace"), bytes(fields.get(2, b""))))
    return entries


def _signature_defs(meta_graph: bytes) -> dict[str, dict[str, Any]]:
    """MetaGraphDef.signature_def = 5; SignatureDef {inputs = 1; outputs = 2} (maps to TensorInfo)."""
    return {
        name: {
            "inputs": [_tensor_info(k, v) for k, v in _map_entries(sig, 1)],
            "outputs": [_tensor_info(k, v) for k, v in _map_entries(sig, 2)],
        }
        for name, sig in _map_entries(meta_graph, 5)
    }


def _tensor_info(key: str, data: bytes) -> dict[str, Any]:
    """TensorInfo {dtype = 2; tensor_shape = 3}; TensorShapeProto {dim = 2 {size = 1}; unknown_rank = 3}."""
    fields = _message(data)
    dtype = next((v for n, v in fields if n == 2 and isinstance(v, int)), 1)
    shape_bytes = next((v for n, v in fields if n == 3 and isinstance(v, bytes)), None)
    shape: list[int | None] | None = None
    if shape_bytes is not None:
        shape_fields = _message(shape_bytes)
        if not any(n == 3 and v for n, v in shape_fields):
            shape = []
            for n, dim in shape_fields:
                if n == 2 and isinstance(dim, bytes):
                    size = next((v for k, v in _message(dim) if k == 1 and isinstance(v, int)), None)
                    # -1 (unknown) arrives as a 64-bit two's complement varint.
                    shape.append(size if size is not None and size < (1 << 63) else None)
    return {"name": key, "shape": shape, "dtype": _TF_DTYPES.get(dtype, str(dtype))}
