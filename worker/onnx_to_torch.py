"""An ONNX graph as a trainable torch.fx.GraphModule, for the training steps (prune, distill, finetune).

Why not run the ONNX graph: the training steps need Parameters to train and real nn.Conv2d /
nn.BatchNorm2d / nn.Linear modules that torch-pruning's DependencyGraph finds by type. So every
weighted operator becomes a module (named after its ONNX node, ``module_name``) that owns its weights
as Parameters and its running statistics as buffers; a bias Add that follows a Conv, ConvTranspose or
MatMul is folded into that module, so that pruning its channels prunes the bias too. Other constant
tensors become buffers; 0-d ones are written into the graph as Python numbers.

Dynamic shapes: exporters compute reshape targets and anchor grids from ``Shape`` (Shape -> Gather ->
Unsqueeze -> Concat -> Reshape, Range, Expand, ConstantOfShape). Those values stay Python ints and lists
of (Sym)ints in the graph, never tensors, so torch.export with dynamic dimensions follows them and a
pruned model computes its own new shapes. Anything whose inputs are all constants is computed at
conversion time with the same function the graph would call.

torch is imported at module level on purpose: the functions below are what the graph calls (module-level,
so that deepcopy, pickling, torch.export and torch.onnx.export see ordinary functions). Import this
module lazily, where a step needs it.
"""

from __future__ import annotations

import keyword
import math
import operator
import re
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from core.errors import PassError
from core.onnx_ops import TRAINABLE_ONNX_OPS, unsupported_onnx_ops

if TYPE_CHECKING:
    import onnx

# ---------------------------------------------------------------------------------------------------
# Names


def module_name(onnx_node_name: str) -> str:
    """The submodule name a weighted ONNX node gets: every run of characters other than ASCII letters,
    digits and "_" becomes one "_", leading and trailing "_" are dropped, "m_" goes before a leading
    digit, and "_" after a Python keyword or an nn.Module attribute ("/model.0/conv/Conv" ->
    "model_0_conv_Conv"). "" when nothing is left: the converter then uses op_type + "_" + node index.
    A name already taken gets "_1", "_2", ... in node order."""
    name = re.sub(r"[^0-9A-Za-z_]+", "_", onnx_node_name)
    name = re.sub(r"_+", "_", name).strip("_")
    if name and name[0].isdigit():
        name = "m_" + name
    if name and (keyword.iskeyword(name) or hasattr(torch.fx.GraphModule, name)):
        name += "_"
    return name


# ---------------------------------------------------------------------------------------------------
# Functions the graph calls: values derived from shapes (Python ints and lists of SymInts)


def as_ints(value: Any) -> list:
    """A shape-like operand as a list: a list stays, an int becomes [int], a tensor is read."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:  # a size while torch.jit traces (the TorchScript ONNX exporter): keep it traced
            return [value]
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def as_scalar(value: Any) -> Any:
    """A scalar operand as a Python number (integral floats as ints, which arange and sizes want)."""
    if isinstance(value, list | tuple):
        value = value[0]
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and torch.jit.is_tracing():
            return value
        value = value.reshape(-1)[0].item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def onnx_shape(x: torch.Tensor, start: int = 0, end: int | None = None) -> list:
    return list(x.shape)[start:end]


def shape_len(values: Any) -> list:
    return [len(values)] if isinstance(values, list | tuple) else []


def shape_gather(values: list, indices: list) -> list:
    return [values[i] for i in indices]


def shape_slice(values: list, start: int, end: int, step: int) -> list:
    return list(values)[start:end:step]


def shape_concat(*parts: Any) -> list:
    out: list = []
    for part in parts:
        out.extend(part if isinstance(part, list | tuple) else [part])
    return out


def shape_unsqueeze(value: Any) -> list:
    return [value]


def shape_to_int(values: Any) -> Any:
    if isinstance(values, list | tuple):
        return [int(v) for v in values]
    return int(values)


def shape_to_tensor(values: Any, dtype: torch.dtype, like: torch.Tensor | None) -> torch.Tensor:
    """A shape value used as a tensor (a graph output, an operand of tensor arithmetic)."""
    device = like.device if like is not None else None
    if not isinstance(values, list | tuple):
        return _scalar_tensor(values, dtype, device)
    if all(isinstance(v, int | float) for v in values):
        return torch.tensor(list(values), dtype=dtype, device=device)
    return torch.stack([_scalar_tensor(v, dtype, device) for v in values])


def _scalar_tensor(value: Any, dtype: torch.dtype, device: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):  # a size while torch.jit traces
        return value.to(dtype=dtype, device=device)
    return torch.scalar_tensor(value, dtype=dtype, device=device)


def _broadcast(fn: Callable, a: Any, b: Any) -> Any:
    a_seq, b_seq = isinstance(a, list | tuple), isinstance(b, list | tuple)
    if not a_seq and not b_seq:
        return fn(a, b)
    xs, ys = (list(a) if a_seq else [a]), (list(b) if b_seq else [b])
    n = max(len(xs), len(ys))
    xs, ys = (xs * n if len(xs) == 1 else xs), (ys * n if len(ys) == 1 else ys)
    return [fn(x, y) for x, y in zip(xs, ys, strict=True)]


def _trunc_div(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int):
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q
    return a // b  # SymInts: sizes are never negative


def shape_add(a: Any, b: Any) -> Any:
    return _broadcast(operator.add, a, b)


def shape_sub(a: Any, b: Any) -> Any:
    return _broadcast(operator.sub, a, b)


def shape_mul(a: Any, b: Any) -> Any:
    return _broadcast(operator.mul, a, b)


def shape_int_div(a: Any, b: Any) -> Any:
    return _broadcast(_trunc_div, a, b)


def shape_true_div(a: Any, b: Any) -> Any:
    return _broadcast(operator.truediv, a, b)


def shape_mod(a: Any, b: Any) -> Any:
    return _broadcast(operator.mod, a, b)


def shape_max(a: Any, b: Any) -> Any:
    return _broadcast(torch.sym_max, a, b)


def shape_min(a: Any, b: Any) -> Any:
    return _broadcast(torch.sym_min, a, b)


def shape_equal(a: Any, b: Any) -> Any:
    return _broadcast(operator.eq, a, b)


def shape_less(a: Any, b: Any) -> Any:
    return _broadcast(operator.lt, a, b)


def shape_greater(a: Any, b: Any) -> Any:
    return _broadcast(operator.gt, a, b)


def shape_where(cond: Any, a: Any, b: Any) -> Any:
    values = [v for v in (cond, a, b) if isinstance(v, list | tuple)]
    if not values:
        return a if cond else b
    n = max(len(v) for v in values)

    def at(v: Any, i: int) -> Any:
        return (v[i] if len(v) > 1 else v[0]) if isinstance(v, list | tuple) else v

    return [at(a, i) if at(cond, i) else at(b, i) for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# Functions the graph calls: tensors


def onnx_div(a: Any, b: Any) -> Any:
    """ONNX Div: true division of floats, division truncated toward zero of integers."""
    ref = a if isinstance(a, torch.Tensor) else b
    if ref.is_floating_point() or ref.is_complex():
        return a / b
    if not isinstance(a, torch.Tensor):
        a = torch.full((), a, dtype=b.dtype, device=b.device)
    return torch.div(a, b, rounding_mode="trunc")


def onnx_mod(a: Any, b: Any, fmod: int) -> Any:
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


def onnx_pow(a: Any, b: Any) -> Any:
    out = torch.pow(a, b)
    return out.to(a.dtype) if isinstance(a, torch.Tensor) else out


def onnx_max(*xs: torch.Tensor) -> torch.Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = torch.maximum(out, x)
    return out


def onnx_min(*xs: torch.Tensor) -> torch.Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = torch.minimum(out, x)
    return out


def onnx_sum(*xs: torch.Tensor) -> torch.Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def onnx_mean(*xs: torch.Tensor) -> torch.Tensor:
    return onnx_sum(*xs) / len(xs)


def onnx_clip(x: torch.Tensor, lo: Any, hi: Any) -> torch.Tensor:
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


def hard_sigmoid(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


def onnx_prelu(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x, x * slope)


def onnx_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype)


def onnx_cast_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(like.dtype)


def onnx_size(x: torch.Tensor) -> Any:
    return x.numel()


def onnx_reshape(x: torch.Tensor, shape: Any, allowzero: int = 0) -> torch.Tensor:
    """ONNX Reshape: 0 copies the input's dimension (unless allowzero), -1 is inferred."""
    dims = as_ints(shape)
    if not allowzero:
        dims = [x.shape[i] if isinstance(d, int) and d == 0 else d for i, d in enumerate(dims)]
    return torch.reshape(x, dims)


def onnx_flatten(x: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis + x.dim() if axis < 0 else axis
    if axis == 0:
        return x.reshape(1, -1)
    if axis == x.dim():
        return x.reshape(-1, 1)
    return torch.flatten(torch.flatten(x, axis), 0, axis - 1)


def onnx_transpose(x: torch.Tensor, perm: list[int] | None) -> torch.Tensor:
    return x.permute(perm if perm is not None else list(range(x.dim()))[::-1])


def onnx_squeeze(x: torch.Tensor, axes: Any) -> torch.Tensor:
    if axes is None:
        return torch.squeeze(x)
    return torch.squeeze(x, tuple(a + x.dim() if a < 0 else a for a in as_ints(axes)))


def onnx_unsqueeze(x: torch.Tensor, axes: Any) -> torch.Tensor:
    axes = as_ints(axes)
    rank = x.dim() + len(axes)
    for axis in sorted(a + rank if a < 0 else a for a in axes):
        x = x.unsqueeze(axis)
    return x


def onnx_expand(x: torch.Tensor, shape: Any) -> torch.Tensor:
    """ONNX Expand broadcasts both ways (a 1 in ``shape`` keeps the input's dimension)."""
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(as_ints(shape))))


def onnx_tile(x: torch.Tensor, repeats: Any) -> torch.Tensor:
    return x.repeat(as_ints(repeats))


def onnx_constant_of_shape(shape: Any, value: Any, dtype: torch.dtype, like: torch.Tensor | None) -> torch.Tensor:
    device = like.device if like is not None else None
    return torch.full(as_ints(shape), value, dtype=dtype, device=device)


def onnx_range(start: Any, limit: Any, delta: Any, dtype: torch.dtype, like: torch.Tensor | None) -> torch.Tensor:
    device = like.device if like is not None else None
    return torch.arange(as_scalar(start), as_scalar(limit), as_scalar(delta), dtype=dtype, device=device)


def onnx_gather(x: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis + x.dim() if axis < 0 else axis
    idx = torch.where(indices < 0, indices + x.shape[axis], indices)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1 :]))


def onnx_gather_elements(x: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
    idx = torch.where(indices < 0, indices + x.shape[axis], indices)
    return torch.gather(x, axis, idx)


def onnx_slice(x: torch.Tensor, starts: Any, ends: Any, axes: Any = None, steps: Any = None) -> torch.Tensor:
    """ONNX Slice (indices clamped as ONNX clamps them; negative steps read the axis flipped)."""
    starts, ends = as_ints(starts), as_ints(ends)
    axes = list(range(len(starts))) if axes is None else as_ints(axes)
    steps = [1] * len(starts) if steps is None else as_ints(steps)
    index: list[Any] = [slice(None)] * x.dim()
    flipped = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = axis + x.dim() if axis < 0 else axis
        if isinstance(step, int) and step < 0:
            dim = x.shape[axis]
            start = start + dim if start < 0 else start
            end = end + dim if end < 0 else end
            start, end = max(0, min(start, dim - 1)), max(-1, min(end, dim - 1))
            start, end, step = dim - 1 - start, dim - 1 - end, -step
            flipped.append(axis)
        index[axis] = slice(start, end, step)
    if flipped:
        x = torch.flip(x, flipped)
    return x[tuple(index)]


def onnx_split(x: torch.Tensor, axis: int, sizes: Any, parts: int) -> tuple:
    if sizes is not None:
        return torch.split(x, as_ints(sizes), dim=axis)
    return torch.split(x, -(-x.shape[axis] // parts), dim=axis)


def onnx_pad(x: torch.Tensor, pads: Any, mode: str, value: Any, axes: Any) -> torch.Tensor:
    """ONNX Pad ([begin per axis..., end per axis...], negative pads crop) as F.pad (last axis first)."""
    pads = as_ints(pads)
    n = len(pads) // 2
    rank = x.dim()
    axes = list(range(n)) if axes is None else [a + rank if a < 0 else a for a in as_ints(axes)]
    full: list = [0] * (2 * rank)
    for axis, begin, end in zip(axes, pads[:n], pads[n:], strict=True):
        full[2 * (rank - 1 - axis)], full[2 * (rank - 1 - axis) + 1] = begin, end
    if mode == "constant":
        return F.pad(x, full, value=0.0 if value is None else float(as_scalar(value)))
    while len(full) > 2 and isinstance(full[-1], int) and full[-1] == 0 and full[-2] == 0:
        full = full[:-2]  # torch pads only the trailing (spatial) axes in these modes
    return F.pad(x, full, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])


def _torch_pads(begins: list, ends: list) -> list:
    out: list = []
    for begin, end in zip(reversed(begins), reversed(ends), strict=True):
        out += [begin, end]
    return out


def same_pads(x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int], upper: bool) -> list:
    """auto_pad SAME_UPPER / SAME_LOWER as explicit ONNX pads for this input's size."""
    n = len(kernel)
    begins, ends = [], []
    for size, k, s, d in zip(list(x.shape)[-n:], kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = (out - 1) * s + (k - 1) * d + 1 - size
        total = total.clamp(min=0) if isinstance(total, torch.Tensor) else torch.sym_max(total, 0)
        small = total // 2
        begins.append(small if upper else total - small)
        ends.append(total - small if upper else small)
    return begins + ends


def pad_same(
    x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int], upper: bool, value: float = 0.0
) -> torch.Tensor:
    pads = same_pads(x, kernel, strides, dilations, upper)
    n = len(kernel)
    return F.pad(x, _torch_pads(pads[:n], pads[n:]), value=value)


def crop_spatial(y: torch.Tensor, begins: list[int], ends: list[int]) -> torch.Tensor:
    """Drop ``begins``/``ends`` elements of each spatial axis (the pads of a transposed convolution)."""
    n = len(begins)
    index: list[Any] = [slice(None)] * (y.dim() - n)
    for size, begin, end in zip(list(y.shape)[-n:], begins, ends, strict=True):
        index.append(slice(begin, size - end))
    return y[tuple(index)]


def fit_transposed(y: torch.Tensor, output_shape: list[int], upper: bool) -> torch.Tensor:
    """A transposed convolution's full output cut to ONNX's ``output_shape`` attribute."""
    n = len(output_shape)
    begins, ends = [], []
    for size, want in zip(list(y.shape)[-n:], output_shape, strict=True):
        total = size - want
        small = total // 2
        begins.append(small if upper else total - small)
        ends.append(total - small if upper else small)
    if any(isinstance(b, int) and b < 0 for b in begins + ends):
        y = F.pad(y, _torch_pads([max(0, -b) for b in begins], [max(0, -e) for e in ends]))
        begins, ends = [max(0, b) for b in begins], [max(0, e) for e in ends]
    return crop_spatial(y, begins, ends)


def _pool_pads(x: torch.Tensor, kernel: list, strides: list, dilations: list, pads: list, auto_pad: str) -> list:
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return same_pads(x, kernel, strides, dilations, auto_pad == "SAME_UPPER")
    return pads


def _ceil_crop(
    y: torch.Tensor, x: torch.Tensor, kernel: list, strides: list, dilations: list, pads: list
) -> torch.Tensor:
    """A ceil_mode pooling of an explicitly padded input cut to ONNX's size: ONNX (like torch with implicit
    padding) drops a last window that would start in the end padding; torch cannot tell that padding
    from the input once it is explicit."""
    n = len(kernel)
    index: list[Any] = [slice(None)] * (y.dim() - n)
    for size, k, s, d, begin, end in zip(
        list(x.shape)[-n:], kernel, strides, dilations, pads[:n], pads[n:], strict=True
    ):
        out = -(-(size + begin + end - (k - 1) * d - 1) // s) + 1
        index.append(slice(0, out - 1 if (out - 1) * s >= size + begin else out))
    return y[tuple(index)]


def onnx_max_pool(
    x: torch.Tensor, kernel: list, strides: list, pads: list, dilations: list, ceil_mode: bool, auto_pad: str
) -> torch.Tensor:
    n = len(kernel)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    pads = _pool_pads(x, kernel, strides, dilations, pads, auto_pad)
    begins, ends = pads[:n], pads[n:]
    if begins == ends and all(2 * p <= (k - 1) * d + 1 for p, k, d in zip(begins, kernel, dilations, strict=True)):
        return pool(x, kernel, strides, begins, dilations, ceil_mode=ceil_mode)
    y = pool(
        F.pad(x, _torch_pads(begins, ends), value=float("-inf")), kernel, strides, 0, dilations, ceil_mode=ceil_mode
    )
    return _ceil_crop(y, x, kernel, strides, dilations, pads) if ceil_mode else y


def onnx_avg_pool(
    x: torch.Tensor, kernel: list, strides: list, pads: list, ceil_mode: bool, count_include_pad: bool, auto_pad: str
) -> torch.Tensor:
    n = len(kernel)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    pads = _pool_pads(x, kernel, strides, [1] * n, pads, auto_pad)
    begins, ends = pads[:n], pads[n:]
    if begins == ends and all(2 * p <= k for p, k in zip(begins, kernel, strict=True)):
        return pool(x, kernel, strides, begins, ceil_mode, count_include_pad)
    y = pool(F.pad(x, _torch_pads(begins, ends)), kernel, strides, 0, ceil_mode)
    if not count_include_pad:  # divide by how many of each window's elements are the input's
        y = y / pool(F.pad(torch.ones_like(x[:, :1]), _torch_pads(begins, ends)), kernel, strides, 0, ceil_mode)
    return _ceil_crop(y, x, kernel, strides, [1] * n, pads) if ceil_mode else y


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return torch.mean(x, dim=list(range(2, x.dim())), keepdim=True)


def global_max_pool(x: torch.Tensor) -> torch.Tensor:
    return torch.amax(x, dim=list(range(2, x.dim())), keepdim=True)


def onnx_reduce(x: torch.Tensor, kind: str, axes: Any, keepdims: int, noop_with_empty_axes: int) -> torch.Tensor:
    dims = [] if axes is None else as_ints(axes)
    if not dims:
        if noop_with_empty_axes:
            return x
        dims = list(range(x.dim()))
    fn = {"mean": torch.mean, "sum": torch.sum, "max": torch.amax, "min": torch.amin}[kind]
    return fn(x, dim=dims, keepdim=bool(keepdims))


def onnx_softmax(x: torch.Tensor, axis: int, log: bool, legacy: bool) -> torch.Tensor:
    """Softmax / LogSoftmax; before opset 13 over the input flattened to 2-D at ``axis``."""
    fn = F.log_softmax if log else F.softmax
    axis = axis + x.dim() if axis < 0 else axis
    if not legacy or axis == x.dim() - 1:
        return fn(x, dim=axis)
    return fn(torch.flatten(x, axis), dim=axis).reshape(x.shape)


def onnx_arg(x: torch.Tensor, axis: int, keepdims: int, select_last_index: int, largest: bool) -> torch.Tensor:
    fn = torch.argmax if largest else torch.argmin
    if not select_last_index:
        return fn(x, dim=axis, keepdim=bool(keepdims))
    return x.shape[axis] - 1 - fn(torch.flip(x, [axis]), dim=axis, keepdim=bool(keepdims))


def onnx_topk(x: torch.Tensor, k: Any, axis: int, largest: int, sorted_: int) -> tuple:
    values, indices = torch.topk(x, as_scalar(k), dim=axis, largest=bool(largest), sorted=bool(sorted_))
    return values, indices


def onnx_gemm(
    a: torch.Tensor, b: torch.Tensor, c: Any, alpha: float, beta: float, trans_a: int, trans_b: int
) -> torch.Tensor:
    y = torch.matmul(a.t() if trans_a else a, b.t() if trans_b else b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def onnx_layer_norm(x: torch.Tensor, scale: Any, bias: Any, axis: int, eps: float) -> torch.Tensor:
    axis = axis + x.dim() if axis < 0 else axis
    y = F.layer_norm(x, tuple(x.shape[axis:]), eps=eps)
    y = y * scale if scale is not None else y
    return y + bias if bias is not None else y


def onnx_instance_norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.instance_norm(x, weight=scale, bias=bias, eps=eps)


def depth_to_space(x: torch.Tensor, blocksize: int, mode: str) -> torch.Tensor:
    if mode == "CRD":
        return F.pixel_shuffle(x, blocksize)
    b, c, h, w = x.shape
    y = x.reshape(b, blocksize, blocksize, c // (blocksize * blocksize), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(b, c // (blocksize * blocksize), h * blocksize, w * blocksize)


def space_to_depth(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    b, c, h, w = x.shape
    y = x.reshape(b, c, h // blocksize, blocksize, w // blocksize, blocksize).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(b, c * blocksize * blocksize, h // blocksize, w // blocksize)


def dropout_mask(x: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.bool)


_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def onnx_resize(x: torch.Tensor, scales: Any, sizes: Any, mode: str, align_corners: bool | None) -> torch.Tensor:
    """Resize / Upsample through F.interpolate. Integral scales become sizes (in * scale, as ONNX computes
    them), which keeps torch.export's sizes integers."""
    n = x.dim() - 2
    mode = _LINEAR_MODES[n] if mode == "linear" else mode
    if sizes is None and all(float(s).is_integer() for s in scales[-n:]):
        sizes = [d * int(s) for d, s in zip(list(x.shape)[-n:], scales[-n:], strict=True)]
    if sizes is not None:
        return F.interpolate(x, size=as_ints(sizes)[-n:], mode=mode, align_corners=align_corners)
    factors = [float(s) for s in scales[-n:]]
    return F.interpolate(x, scale_factor=factors, mode=mode, align_corners=align_corners, recompute_scale_factor=False)


def _nearest_source(out: Any, size: Any, scale: float | None, coord: str, rounding: str, like: torch.Tensor):
    i = torch.arange(out, dtype=torch.float32, device=like.device)
    scale = scale if scale is not None else out / size
    if coord == "asymmetric":
        src = i / scale
    elif coord == "tf_half_pixel_for_nn":
        src = (i + 0.5) / scale
    elif coord == "align_corners":
        src = i * ((size - 1) / (out - 1)) if out > 1 else i * 0
    else:  # half_pixel, pytorch_half_pixel
        src = (i + 0.5) / scale - 0.5
    rounded = {
        "floor": torch.floor,
        "ceil": torch.ceil,
        "round_prefer_floor": lambda v: torch.ceil(v - 0.5),
        "round_prefer_ceil": lambda v: torch.floor(v + 0.5),
    }[rounding](src)
    return rounded.clamp(0, size - 1).long()


def onnx_resize_nearest(x: torch.Tensor, scales: Any, sizes: Any, coord: str, rounding: str) -> torch.Tensor:
    """Nearest Resize for the coordinate / rounding modes F.interpolate has no mode for: the source
    index of every output element, as the ONNX spec computes it."""
    n = x.dim() - 2
    out_sizes = as_ints(sizes)[-n:] if sizes is not None else None
    for axis in range(2, x.dim()):
        size = x.shape[axis]
        scale = float(scales[-n:][axis - 2]) if out_sizes is None else None
        out = out_sizes[axis - 2] if out_sizes is not None else math.floor(size * scale)
        x = torch.index_select(x, axis, _nearest_source(out, size, scale, coord, rounding, x))
    return x


class AnyRankBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """A batch norm over axis 1 for an input whose rank the ONNX graph does not state."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions (got {input.dim()})")


# ---------------------------------------------------------------------------------------------------
# Conversion


@dataclass(eq=False)
class _Const:
    """A value known at conversion time."""

    value: torch.Tensor
    name: str = ""


@dataclass(eq=False)
class _Tensor:
    """A tensor the graph computes."""

    node: torch.fx.Node


@dataclass(eq=False)
class _Shape:
    """A value derived from shapes that the graph keeps as a Python (Sym)int (rank 0) or list (rank 1)."""

    node: torch.fx.Node
    rank: int
    floating: bool = False
    boolean: bool = False  # a comparison's result


class _Like:
    """Stands for the graph's first input in emitted calls: what new tensors take their device from."""


_LIKE = _Like()
_Value = _Const | _Tensor | _Shape
_Handler = Callable[["_Converter", Any, list, dict], list]
_HANDLERS: dict[str, _Handler] = {}
# ONNX TensorProto data types -> torch.
_DTYPES = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}
_SAME = ("SAME_UPPER", "SAME_LOWER")


def _handles(*op_types: str) -> Callable[[_Handler], _Handler]:
    def register(fn: _Handler) -> _Handler:
        for op_type in op_types:
            _HANDLERS[op_type] = fn
        return fn

    return register


def _to_torch(tensor_proto) -> torch.Tensor:
    import numpy as np
    from onnx import numpy_helper

    array = numpy_helper.to_array(tensor_proto)
    if array.dtype.kind in "OSU":
        raise PassError(f"tensor {tensor_proto.name!r} holds strings", code="unsupported_operators")
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def _attrs(node) -> dict[str, Any]:
    from onnx import AttributeProto, helper

    out: dict[str, Any] = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif attr.type == AttributeProto.STRINGS:
            value = [v.decode() for v in value]
        elif attr.type == AttributeProto.TENSOR:
            value = _to_torch(value)
        out[attr.name] = value
    return out


def _ranks(model) -> dict[str, int]:
    """The rank of every value ONNX shape inference can tell (it decides BatchNorm1d or 2d, PReLU's axis)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is only a source of facts; a graph it rejects still converts without them
        inferred = model
    ranks = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            ranks[value.name] = len(tensor_type.shape.dim)
    return ranks


def _map(obj: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(obj, list | tuple):
        return type(obj)(_map(v, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return fn(obj)


def _is_dynamic(obj: Any) -> bool:
    if isinstance(obj, list | tuple):
        return any(_is_dynamic(v) for v in obj)
    if isinstance(obj, dict):
        return any(_is_dynamic(v) for v in obj.values())
    return isinstance(obj, _Tensor | _Shape | torch.fx.Node)


class _Converter:
    """One conversion: walks the ONNX nodes in order, building the fx graph and the modules it calls."""

    def __init__(self, model) -> None:
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.graph = torch.fx.Graph()
        self.root = torch.nn.Module()
        self.taken: set[str] = set()
        self.env: dict[str, _Value] = {}
        self.ranks = _ranks(model)
        self.uses = Counter(name for node in model.graph.node for name in node.input if name)
        self.uses.update(o.name for o in model.graph.output)
        self.biasable: dict[str, str] = {}  # a Conv / ConvTranspose / Linear output -> its module
        # id(value) -> (value, node); the value is held so that its id is never reused by another.
        self.buffers: dict[int, tuple[_Const, torch.fx.Node]] = {}
        self.shape_tensors: dict[int, tuple[_Shape, torch.fx.Node]] = {}
        self.like: torch.fx.Node | None = None
        self.module_names: dict[str, str] = {}
        self.node: Any = None
        self.index = 0

    def convert(self) -> torch.fx.GraphModule:
        initializers = {t.name for t in self.model.graph.initializer}
        for tensor in self.model.graph.initializer:
            self.env[tensor.name] = _Const(_to_torch(tensor), tensor.name)
        for i, value in enumerate(self.model.graph.input):
            if value.name not in initializers:
                name = module_name(value.name)
                # Not a name the generated forward needs for itself.
                name = (
                    name if name and name not in ("self", "torch", "operator", "math", "inf", "nan") else f"input_{i}"
                )
                placeholder = self.graph.placeholder(self._unique(name))
                self.like = self.like or placeholder
                self.env[value.name] = _Tensor(placeholder)
        for index, node in enumerate(self.model.graph.node):
            self.index, self.node = index, node
            ins = [self._input(name) if name else None for name in self.node.input]
            with torch.no_grad():
                outs = _HANDLERS[self.node.op_type](self, self.node, ins, _attrs(self.node))
            for name, value in zip(self.node.output, outs, strict=False):
                if name and value is not None:
                    if isinstance(value, _Const) and not value.name:
                        value.name = name
                    self.env[name] = value
        outputs = [self.fx(self._input(o.name)) for o in self.model.graph.output]
        self.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        self.graph._tracer_cls = GraphFunctionTracer
        module = torch.fx.GraphModule(self.root, self.graph, class_name="OnnxGraphModule")
        module.graph.eliminate_dead_code()
        module.delete_all_unused_submodules()
        module.graph.lint()
        module.recompile()
        module.meta["onnx_module_names"] = dict(self.module_names)
        return module.eval()

    def _input(self, name: str) -> _Value:
        if name not in self.env:
            raise PassError(
                f"the ONNX graph uses {name!r} before any node computes it, or it is an output the converter "
                "does not compute (a second output of BatchNormalization, MaxPool or LayerNormalization)",
                code="unsupported_operators",
                details={"operators": [self.node.op_type] if self.node is not None else []},
            )
        return self.env[name]

    def unsupported(self, reason: str) -> PassError:
        op = self.node.op_type
        return PassError(
            f"ONNX node {self.node.name or self.index!r} ({op}): {reason} cannot be converted to torch",
            code="unsupported_operators",
            details={"operators": [op]},
        )

    def _unique(self, name: str) -> str:
        candidate, n = name, 0
        while candidate in self.taken:
            n += 1
            candidate = f"{name}_{n}"
        self.taken.add(candidate)
        return candidate

    def _base_name(self) -> str:
        return module_name(self.node.name) or f"{self.node.op_type}_{self.index}"

    # -- values in the graph

    def fx(self, value: Any, scalars: bool = False) -> Any:
        """A value as an fx argument: a node, or a Python number for a 0-d constant where ``scalars``."""
        if isinstance(value, _Tensor):
            return value.node
        if isinstance(value, _Shape):
            return self._shape_tensor(value)
        if isinstance(value, _Const):
            if scalars and value.value.dim() == 0:
                return value.value.item()
            return self._buffer(value)
        if isinstance(value, _Like):
            return self.like
        return value

    def _buffer(self, const: _Const) -> torch.fx.Node:
        if id(const) not in self.buffers:
            name = self._unique("const_" + (module_name(const.name) or str(len(self.buffers))))
            self.root.register_buffer(name, const.value)
            self.buffers[id(const)] = (const, self.graph.get_attr(name))
        return self.buffers[id(const)][1]

    def _shape_tensor(self, value: _Shape) -> torch.fx.Node:
        if id(value) not in self.shape_tensors:
            dtype = torch.bool if value.boolean else torch.float32 if value.floating else torch.int64
            node = self.graph.call_function(shape_to_tensor, (value.node, dtype, self.like))
            self.shape_tensors[id(value)] = (value, node)
        return self.shape_tensors[id(value)][1]

    def param(self, value: _Value | None, role: str) -> Any:
        """A constant weight of a functional fallback as a Parameter of the module (None stays None)."""
        if not isinstance(value, _Const):
            return value
        name = self._unique(f"{self._base_name()}_{role}")
        self.root.register_parameter(name, torch.nn.Parameter(value.value.detach().clone().float()))
        return self.graph.get_attr(name)

    def emit(self, fn: Callable, *args: Any, scalars: bool = False, n_out: int = 0, **kwargs: Any) -> Any:
        """``fn(*args)``: computed now when every operand is a constant, else a call in the graph.
        ``n_out``: fn returns that many tensors (a list of values is returned)."""
        if not _is_dynamic((args, kwargs)):
            real = _map((args, kwargs), lambda v: v.value if isinstance(v, _Const) else None if v is _LIKE else v)
            result = fn(*real[0], **real[1])
            if n_out:
                return [_Const(r) for r in result]
            return _Const(result if isinstance(result, torch.Tensor) else torch.tensor(result))
        fx_args, fx_kwargs = _map((args, kwargs), lambda v: self.fx(v, scalars))
        node = self.graph.call_function(fn, tuple(fx_args), fx_kwargs)
        if n_out:
            return [_Tensor(self.graph.call_function(operator.getitem, (node, i))) for i in range(n_out)]
        return _Tensor(node)

    def shape_call(self, fn: Callable, args: tuple, rank: int, floating: bool = False) -> _Shape:
        return _Shape(self.graph.call_function(fn, _map(args, self.py)), rank, floating)

    def py(self, value: Any) -> Any:
        """An operand of a shape computation: constants as Python numbers and lists, shapes as their node."""
        if isinstance(value, _Const):
            return value.value.tolist()
        if isinstance(value, _Shape | _Tensor):
            return value.node
        return value

    def shape_arg(self, value: _Value | None) -> Any:
        """A shape-like operand (sizes, axes, pads): a list for a constant, else the node that computes it."""
        if value is None:
            return None
        if isinstance(value, _Const):
            return [int(v) for v in value.value.reshape(-1).tolist()]
        return value.node

    def scalar_arg(self, value: _Value | None) -> Any:
        if value is None:
            return None
        if isinstance(value, _Const):
            return value.value.reshape(-1)[0].item() if value.value.numel() else None
        return value.node

    def call_module(self, module: torch.nn.Module, x: _Value, biasable: bool = False) -> _Tensor:
        name = self._unique(self._base_name())
        self.root.add_module(name, module)
        if self.node.name:
            self.module_names[self.node.name] = name
        out = _Tensor(self.graph.call_module(name, (self.fx(x),)))
        if biasable:
            self.biasable[self.node.output[0]] = name
        return out

    def is_shape_math(self, ins: list) -> bool:
        """Arithmetic on shape values that stays Python: some operand is a shape, the rest are too or are
        small integer or float constants of rank 0 or 1."""
        values = [v for v in ins if v is not None]
        return any(isinstance(v, _Shape) for v in values) and all(
            isinstance(v, _Shape) or (isinstance(v, _Const) and v.value.dim() <= 1 and v.value.numel() <= 64)
            for v in values
        )

    def shape_math(self, fn: Callable, ins: list, floating: bool | None = None) -> _Shape:
        rank = max(v.rank if isinstance(v, _Shape) else v.value.dim() for v in ins)
        if floating is None:
            floating = any(v.floating if isinstance(v, _Shape) else v.value.is_floating_point() for v in ins)
        return self.shape_call(fn, tuple(ins), rank, floating)

    def fold_bias(self, node, ins: list) -> _Value | None:
        """Add(conv_or_linear_output, constant per-channel bias) folded into the module's bias, when the
        module's output feeds nothing else: pruning its channels then prunes the bias with them."""
        for i in (0, 1):
            name, other = node.input[i], ins[1 - i]
            target = self.biasable.get(name)
            if target is None or not isinstance(other, _Const) or self.uses[name] != 1:
                continue
            module = self.root.get_submodule(target)
            vector = _bias_vector(other.value, module, self.ranks.get(name))
            if vector is None:
                continue
            if module.bias is None:
                module.bias = torch.nn.Parameter(vector.detach().clone().float())
            else:
                module.bias.add_(vector)
            del self.biasable[name]
            self.biasable[node.output[0]] = target
            return ins[i]
        return None


def _bias_vector(bias: torch.Tensor, module: torch.nn.Module, out_rank: int | None) -> torch.Tensor | None:
    """``bias`` as a (channels,) vector when adding it to the module's output is adding that vector to each
    channel without changing the output's shape; else None."""
    if not bias.is_floating_point():
        return None
    if isinstance(module, torch.nn.Linear):
        channels, axis_from_end = module.out_features, 1
    else:
        channels, axis_from_end = module.out_channels, module.weight.dim() - 1
        out_rank = module.weight.dim()
    if bias.dim() > (out_rank if out_rank is not None else 1):
        return None
    if bias.numel() == 1:
        return bias.reshape(1).expand(channels)
    if bias.numel() != channels or bias.dim() < axis_from_end or bias.shape[bias.dim() - axis_from_end] != channels:
        return None
    return bias.reshape(channels)


# ---------------------------------------------------------------------------------------------------
# Handlers: one per ONNX operator, (converter, node, input values, attributes) -> output values

_UNARY: dict[str, Callable] = {
    "Abs": torch.abs,
    "Ceil": torch.ceil,
    "Cos": torch.cos,
    "Erf": torch.erf,
    "Exp": torch.exp,
    "Floor": torch.floor,
    "HardSwish": F.hardswish,
    "Log": torch.log,
    "Mish": F.mish,
    "Neg": torch.neg,
    "Not": torch.logical_not,
    "Reciprocal": torch.reciprocal,
    "Relu": torch.relu,
    "Round": torch.round,
    "Sigmoid": torch.sigmoid,
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "Sqrt": torch.sqrt,
    "Tanh": torch.tanh,
}
# op -> (tensor function, shape function or None); a None shape function makes shapes tensors first.
_BINARY: dict[str, tuple[Callable, Callable | None]] = {
    "Add": (operator.add, shape_add),
    "Sub": (operator.sub, shape_sub),
    "Mul": (operator.mul, shape_mul),
    "Div": (onnx_div, shape_int_div),
    "Pow": (onnx_pow, None),
    "Equal": (operator.eq, shape_equal),
    "Less": (operator.lt, shape_less),
    "Greater": (operator.gt, shape_greater),
    "LessOrEqual": (operator.le, None),
    "GreaterOrEqual": (operator.ge, None),
    "And": (torch.logical_and, None),
    "Or": (torch.logical_or, None),
}
_VARIADIC: dict[str, tuple[Callable, Callable | None]] = {
    "Max": (onnx_max, shape_max),
    "Min": (onnx_min, shape_min),
    "Sum": (onnx_sum, shape_add),
    "Mean": (onnx_mean, None),
}


@_handles("Constant")
def _constant(cv: _Converter, node, ins: list, attrs: dict) -> list:
    if "value" in attrs:
        return [_Const(attrs["value"])]
    for key, dtype in (
        ("value_float", torch.float32),
        ("value_floats", torch.float32),
        ("value_int", torch.int64),
        ("value_ints", torch.int64),
    ):
        if key in attrs:
            return [_Const(torch.tensor(attrs[key], dtype=dtype))]
    raise cv.unsupported("a Constant that holds no numeric tensor")


@_handles("Identity")
def _identity(cv: _Converter, node, ins: list, attrs: dict) -> list:
    return [ins[0]]


@_handles(*_UNARY)
def _unary(cv: _Converter, node, ins: list, attrs: dict) -> list:
    return [cv.emit(_UNARY[node.op_type], ins[0])]


@_handles("LeakyRelu", "Elu", "HardSigmoid", "Gelu", "Clip")
def _activation(cv: _Converter, node, ins: list, attrs: dict) -> list:
    x, op = ins[0], node.op_type
    if op == "LeakyRelu":
        return [cv.emit(F.leaky_relu, x, attrs.get("alpha", 0.01))]
    if op == "Elu":
        return [cv.emit(F.elu, x, attrs.get("alpha", 1.0))]
    if op == "HardSigmoid":
        return [cv.emit(hard_sigmoid, x, attrs.get("alpha", 0.2), attrs.get("beta", 0.5))]
    if op == "Gelu":
        return [cv.emit(F.gelu, x, approximate=attrs.get("approximate", "none"))]
    if cv.opset < 11:
        lo, hi = attrs.get("min"), attrs.get("max")
    else:
        lo, hi = (cv.scalar_arg(ins[i]) if len(ins) > i else None for i in (1, 2))
    return [cv.emit(onnx_clip, x, lo, hi)]


@_handles(*_BINARY, "Mod")
def _binary(cv: _Converter, node, ins: list, attrs: dict) -> list:
    op = node.op_type
    if op == "Add" and (folded := cv.fold_bias(node, ins)) is not None:
        return [folded]
    if op == "Mod":
        if cv.is_shape_math(ins) and not attrs.get("fmod", 0):
            return [cv.shape_math(shape_mod, ins)]
        return [cv.emit(onnx_mod, ins[0], ins[1], attrs.get("fmod", 0), scalars=True)]
    fn, shape_fn = _BINARY[op]
    if shape_fn is not None and cv.is_shape_math(ins):
        if op == "Div" and any(v.floating if isinstance(v, _Shape) else v.value.is_floating_point() for v in ins):
            shape_fn = shape_true_div
        if op in ("Equal", "Less", "Greater"):
            compared = cv.shape_math(shape_fn, ins, floating=False)
            return [_Shape(compared.node, compared.rank, boolean=True)]
        return [cv.shape_math(shape_fn, ins)]
    return [cv.emit(fn, ins[0], ins[1], scalars=op not in ("And", "Or", "Pow"))]


@_handles(*_VARIADIC)
def _variadic(cv: _Converter, node, ins: list, attrs: dict) -> list:
    values = [v for v in ins if v is not None]
    if len(values) == 1:
        return [values[0]]
    fn, shape_fn = _VARIADIC[node.op_type]
    if shape_fn is not None and len(values) == 2 and cv.is_shape_math(values):
        return [cv.shape_math(shape_fn, values)]
    return [cv.emit(fn, *values)]


@_handles("Where")
def _where(cv: _Converter, node, ins: list, attrs: dict) -> list:
    if cv.is_shape_math(ins):
        return [cv.shape_math(shape_where, ins, floating=any(getattr(v, "floating", False) for v in ins[1:]))]
    return [cv.emit(torch.where, *ins)]


@_handles("Softmax", "LogSoftmax")
def _softmax(cv: _Converter, node, ins: list, attrs: dict) -> list:
    legacy = cv.opset < 13
    axis = attrs.get("axis", 1 if legacy else -1)
    return [cv.emit(onnx_softmax, ins[0], axis, node.op_type == "LogSoftmax", legacy)]


@_handles("Cast", "CastLike")
def _cast(cv: _Converter, node, ins: list, attrs: dict) -> list:
    x = ins[0]
    if node.op_type == "CastLike":
        if not isinstance(ins[1], _Const):
            return [cv.emit(onnx_cast_like, x, ins[1])]
        dtype = ins[1].value.dtype
    else:
        if attrs["to"] not in _DTYPES:
            raise cv.unsupported(f"a cast to ONNX data type {attrs['to']}")
        dtype = _DTYPES[attrs["to"]]
    if isinstance(x, _Shape) and dtype != torch.bool:
        if dtype.is_floating_point:
            return [_Shape(x.node, x.rank, True)]
        return [x if not x.floating else cv.shape_call(shape_to_int, (x,), x.rank)]
    return [cv.emit(onnx_cast, x, dtype)]


@_handles("Shape", "Size")
def _shape(cv: _Converter, node, ins: list, attrs: dict) -> list:
    x = ins[0]
    if isinstance(x, _Const):
        dims = list(x.value.shape)[attrs.get("start", 0) : attrs.get("end")]
        return [_Const(torch.tensor(x.value.numel() if node.op_type == "Size" else dims, dtype=torch.int64))]
    if node.op_type == "Size":
        return [cv.shape_call(onnx_size, (cv.fx(x),), 0)]
    if isinstance(x, _Shape):
        return [cv.shape_call(shape_len, (x,), 1)]
    return [cv.shape_call(onnx_shape, (x, attrs.get("start", 0), attrs.get("end")), 1)]


@_handles("Gather", "GatherElements")
def _gather(cv: _Converter, node, ins: list, attrs: dict) -> list:
    data, indices = ins
    axis = attrs.get("axis", 0)
    if node.op_type == "GatherElements":
        return [cv.emit(onnx_gather_elements, data, indices, axis)]
    if isinstance(data, _Shape) and data.rank == 1 and isinstance(indices, _Const) and indices.value.dim() <= 1:
        if indices.value.dim() == 0:
            return [cv.shape_call(operator.getitem, (data, indices), 0, data.floating)]
        return [cv.shape_call(shape_gather, (data, indices), 1, data.floating)]
    if isinstance(indices, _Const) and indices.value.dim() == 0:
        return [cv.emit(torch.select, data, axis, int(indices.value))]
    return [cv.emit(onnx_gather, data, indices, axis)]


def _axes(cv: _Converter, ins: list, attrs: dict, since: int = 13) -> Any:
    """axes: an attribute before opset ``since``, the optional second input from it on."""
    if cv.opset < since:
        return attrs.get("axes")
    return cv.shape_arg(ins[1]) if len(ins) > 1 else None


@_handles("Unsqueeze", "Squeeze")
def _unsqueeze(cv: _Converter, node, ins: list, attrs: dict) -> list:
    x, axes = ins[0], _axes(cv, ins, attrs)
    if node.op_type == "Unsqueeze":
        if isinstance(x, _Shape) and x.rank == 0 and axes in ([0], [-1]):
            return [cv.shape_call(shape_unsqueeze, (x,), 1, x.floating)]
        return [cv.emit(onnx_unsqueeze, x, axes)]
    if isinstance(x, _Shape) and x.rank == 1 and axes in (None, [0], [-1]):
        return [cv.shape_call(operator.getitem, (x, 0), 0, x.floating)]
    return [cv.emit(onnx_squeeze, x, axes)]


@_handles("Concat")
def _concat(cv: _Converter, node, ins: list, attrs: dict) -> list:
    parts = [v for v in ins if v is not None]
    if any(isinstance(v, _Shape) for v in parts) and all(
        isinstance(v, _Shape) or (isinstance(v, _Const) and v.value.dim() == 1) for v in parts
    ):
        return [cv.shape_math(shape_concat, parts)]
    return [cv.emit(torch.cat, parts, attrs["axis"])]


@_handles("Reshape")
def _reshape(cv: _Converter, node, ins: list, attrs: dict) -> list:
    x = ins[0]
    shape = attrs["shape"] if cv.opset < 5 else cv.shape_arg(ins[1])
    if isinstance(x, _Shape) and isinstance(shape, list):
        if shape == []:
            return [x if x.rank == 0 else cv.shape_call(operator.getitem, (x, 0), 0, x.floating)]
        if shape in ([1], [-1]):
            return [x if x.rank == 1 else cv.shape_call(shape_unsqueeze, (x,), 1, x.floating)]
    return [cv.emit(onnx_reshape, x, shape, attrs.get("allowzero", 0))]


@_handles("Flatten", "Transpose", "Expand", "Tile", "DepthToSpace", "SpaceToDepth")
def _layout(cv: _Converter, node, ins: list, attrs: dict) -> list:
    x, op = ins[0], node.op_type
    if op == "Flatten":
        return [cv.emit(onnx_flatten, x, attrs.get("axis", 1))]
    if op == "Transpose":
        return [cv.emit(onnx_transpose, x, attrs.get("perm"))]
    if op == "Expand":
        return [cv.emit(onnx_expand, x, cv.shape_arg(ins[1]))]
    if op == "Tile":
        return [cv.emit(onnx_tile, x, cv.shape_arg(ins[1]))]
    if op == "DepthToSpace":
        return [cv.emit(depth_to_space, x, attrs["blocksize"], attrs.get("mode", "DCR"))]
    return [cv.emit(space_to_depth, x, attrs["blocksize"])]


@_handles("ConstantOfShape", "Range")
def _fill(cv: _Converter, node, ins: list, attrs: dict) -> list:
    if node.op_type == "ConstantOfShape":
        value = attrs.get("value", torch.zeros(1))
        fill = value.reshape(-1)[0].item()
        return [cv.emit(onnx_constant_of_shape, cv.shape_arg(ins[0]), fill, value.dtype, _LIKE)]
    const = next((v for v in ins if isinstance(v, _Const)), None)
    if const is not None:
        dtype = const.value.dtype
    else:
        dtype = torch.float32 if any(getattr(v, "floating", False) for v in ins) else torch.int64
    start, limit, delta = (cv.scalar_arg(v) for v in ins)
    return [cv.emit(onnx_range, start, limit, delta, dtype, _LIKE)]


@_handles("Slice")
def _slice(cv: _Converter, node, ins: list, attrs: dict) -> list:
    x = ins[0]
    if cv.opset < 10:
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    else:
        starts, ends, axes, steps = (cv.shape_arg(ins[i]) if len(ins) > i else None for i in range(1, 5))
    known = all(isinstance(v, list) for v in (starts, ends)) and all(
        v is None or isinstance(v, list) for v in (axes, steps)
    )
    if isinstance(x, _Shape) and x.rank == 1 and known and len(starts) == 1 and axes in (None, [0], [-1]):
        step = steps[0] if steps else 1
        return [cv.shape_call(shape_slice, (x, starts[0], ends[0], step), 1, x.floating)]
    return [cv.emit(onnx_slice, x, starts, ends, axes, steps)]


@_handles("Split")
def _split(cv: _Converter, node, ins: list, attrs: dict) -> list:
    x, axis, n = ins[0], attrs.get("axis", 0), len(node.output)
    sizes = attrs.get("split") if cv.opset < 13 else (cv.shape_arg(ins[1]) if len(ins) > 1 else None)
    if isinstance(sizes, list):
        # One slice per output, not torch.split: torch-pruning follows slices through to each consumer,
        # and loses count of a split output that feeds two (YOLOv8's C2f).
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [cv.emit(torch.narrow, x, axis, start, size) for start, size in zip(starts, sizes, strict=True)]
    return cv.emit(onnx_split, x, axis, sizes, attrs.get("num_outputs", n), n_out=n)


@_handles("Pad")
def _pad(cv: _Converter, node, ins: list, attrs: dict) -> list:
    mode = attrs.get("mode", "constant")
    if cv.opset < 11:
        pads, value, axes = attrs.get("pads", attrs.get("paddings")), attrs.get("value", 0.0), None
    else:
        pads = cv.shape_arg(ins[1])
        value = cv.scalar_arg(ins[2]) if len(ins) > 2 else None
        axes = cv.shape_arg(ins[3]) if len(ins) > 3 else None
    return [cv.emit(onnx_pad, ins[0], pads, mode, value, axes)]


def _window(attrs: dict, n: int) -> tuple[list, list, list, str]:
    """strides, pads, dilations and auto_pad of a convolution or pooling over ``n`` spatial axes."""
    auto_pad = attrs.get("auto_pad", "NOTSET")
    pads = [0] * (2 * n) if auto_pad == "VALID" else list(attrs.get("pads", [0] * (2 * n)))
    return list(attrs.get("strides", [1] * n)), pads, list(attrs.get("dilations", [1] * n)), auto_pad


@_handles("MaxPool", "AveragePool")
def _pool(cv: _Converter, node, ins: list, attrs: dict) -> list:
    if len(node.output) > 1 and node.output[1] and cv.uses[node.output[1]]:
        raise cv.unsupported("MaxPool's indices output")
    kernel = list(attrs["kernel_shape"])
    strides, pads, dilations, auto_pad = _window(attrs, len(kernel))
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    if node.op_type == "MaxPool":
        return [cv.emit(onnx_max_pool, ins[0], kernel, strides, pads, dilations, ceil_mode, auto_pad)]
    if any(d != 1 for d in dilations):
        raise cv.unsupported("a dilated AveragePool")
    include = bool(attrs.get("count_include_pad", 0))
    return [cv.emit(onnx_avg_pool, ins[0], kernel, strides, pads, ceil_mode, include, auto_pad)]


@_handles("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(cv: _Converter, node, ins: list, attrs: dict) -> list:
    return [cv.emit(global_avg_pool if node.op_type == "GlobalAveragePool" else global_max_pool, ins[0])]


@_handles("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(cv: _Converter, node, ins: list, attrs: dict) -> list:
    kind = node.op_type[len("Reduce") :].lower()
    axes = _axes(cv, ins, attrs, since=13 if kind == "sum" else 18)
    keep, noop = attrs.get("keepdims", 1), attrs.get("noop_with_empty_axes", 0)
    return [cv.emit(onnx_reduce, ins[0], kind, axes, keep, noop)]


@_handles("ArgMax", "ArgMin", "TopK")
def _select(cv: _Converter, node, ins: list, attrs: dict) -> list:
    if node.op_type == "TopK":
        k = cv.scalar_arg(ins[1]) if cv.opset >= 10 else attrs["k"]
        largest, sorted_ = attrs.get("largest", 1), attrs.get("sorted", 1)
        return cv.emit(onnx_topk, ins[0], k, attrs.get("axis", -1), largest, sorted_, n_out=2)
    axis, keep, last = attrs.get("axis", 0), attrs.get("keepdims", 1), attrs.get("select_last_index", 0)
    return [cv.emit(onnx_arg, ins[0], axis, keep, last, node.op_type == "ArgMax")]


@_handles("Dropout")
def _dropout(cv: _Converter, node, ins: list, attrs: dict) -> list:
    x = ins[0]
    ratio = attrs.get("ratio", 0.5) if cv.opset < 12 else (cv.scalar_arg(ins[1]) if len(ins) > 1 else 0.5)
    mask = cv.emit(dropout_mask, x) if len(node.output) > 1 and node.output[1] else None
    if isinstance(x, _Const) or not isinstance(ratio, float | int):
        return [x, mask]
    return [cv.call_module(torch.nn.Dropout(float(ratio)), x), mask]


def _resize_inputs(cv: _Converter, node, ins: list, attrs: dict) -> tuple[Any, Any, str, str]:
    """scales (a list of floats or None), sizes, coordinate transformation and nearest rounding of a
    Resize or Upsample, across opsets 7 to 21."""
    if node.op_type == "Upsample" or cv.opset < 11:
        scales_value, sizes_value, coord, rounding = (ins[1] if len(ins) > 1 else None), None, "asymmetric", "floor"
    else:
        scales_value = ins[2] if len(ins) > 2 else None
        sizes_value = ins[3] if len(ins) > 3 else None
        coord = attrs.get("coordinate_transformation_mode", "half_pixel")
        rounding = attrs.get("nearest_mode", "round_prefer_floor")
    scales = attrs.get("scales")
    if isinstance(scales_value, _Const) and scales_value.value.numel():
        scales = [float(s) for s in scales_value.value.reshape(-1).tolist()]
    elif scales_value is not None and not isinstance(scales_value, _Const):
        raise cv.unsupported("a Resize whose scales are computed by the graph")
    sizes = None
    if sizes_value is not None and not (isinstance(sizes_value, _Const) and not sizes_value.value.numel()):
        sizes = cv.shape_arg(sizes_value)
    if scales is None and sizes is None:
        raise cv.unsupported("a Resize with neither scales nor sizes")
    if scales is not None and sizes is None and any(s != 1.0 for s in scales[:2]):
        raise cv.unsupported("a Resize of the batch or channel axis")
    if attrs.get("antialias", 0) or attrs.get("axes") or attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise cv.unsupported("a Resize with antialias, axes or keep_aspect_ratio_policy")
    return scales, sizes, coord, rounding


@_handles("Resize", "Upsample")
def _resize(cv: _Converter, node, ins: list, attrs: dict) -> list:
    scales, sizes, coord, rounding = _resize_inputs(cv, node, ins, attrs)
    mode, x = attrs.get("mode", "nearest"), ins[0]
    if mode == "nearest":
        if coord == "asymmetric" and rounding == "floor":
            return [cv.emit(onnx_resize, x, scales, sizes, "nearest", None)]
        if coord == "half_pixel" and rounding == "round_prefer_ceil":
            return [cv.emit(onnx_resize, x, scales, sizes, "nearest-exact", None)]
        return [cv.emit(onnx_resize_nearest, x, scales, sizes, coord, rounding)]
    if mode not in ("linear", "bilinear", "cubic", "bicubic"):
        raise cv.unsupported(f"Resize mode {mode!r}")
    if coord not in ("align_corners", "half_pixel", "pytorch_half_pixel"):
        raise cv.unsupported(f"a {mode} Resize with {coord} coordinates")
    if mode in ("cubic", "bicubic") and (attrs.get("cubic_coeff_a", -0.75) != -0.75 or attrs.get("exclude_outside", 0)):
        raise cv.unsupported("a cubic Resize other than torch's (a = -0.75, outside pixels included)")
    torch_mode = "bicubic" if mode in ("cubic", "bicubic") else "linear"
    return [cv.emit(onnx_resize, x, scales, sizes, torch_mode, coord == "align_corners")]


def _weights(cv: _Converter, ins: list, first: int, last: int) -> list[torch.Tensor | None]:
    """Inputs first..last as constant tensors (absent ones None); weights the graph computes are refused."""
    out: list[torch.Tensor | None] = []
    for i in range(first, last + 1):
        value = ins[i] if len(ins) > i else None
        if value is not None and not isinstance(value, _Const):
            raise cv.unsupported("a weighted operator whose weights are computed by the graph")
        out.append(value.value if value is not None else None)
    return out


def _load(module: torch.nn.Module, **tensors: torch.Tensor | None) -> torch.nn.Module:
    for name, tensor in tensors.items():
        if tensor is not None:
            getattr(module, name).copy_(tensor.reshape(getattr(module, name).shape))
    return module


@_handles("Conv")
def _conv(cv: _Converter, node, ins: list, attrs: dict) -> list:
    weight, bias = _weights(cv, ins, 1, 2)
    assert weight is not None
    n = weight.dim() - 2
    kernel, group = list(weight.shape[2:]), attrs.get("group", 1)
    strides, pads, dilations, auto_pad = _window(attrs, n)
    x = ins[0]
    if auto_pad in _SAME and all(s == 1 for s in strides):
        total = [(k - 1) * d for k, d in zip(kernel, dilations, strict=True)]
        small = [t // 2 for t in total]
        big = [t - s for t, s in zip(total, small, strict=True)]
        pads = small + big if auto_pad == "SAME_UPPER" else big + small
    elif auto_pad in _SAME:
        x = cv.emit(pad_same, x, kernel, strides, dilations, auto_pad == "SAME_UPPER")
        pads = [0] * (2 * n)
    if pads[:n] != pads[n:]:
        x = cv.emit(F.pad, x, _torch_pads(pads[:n], pads[n:]))
        pads = [0] * (2 * n)
    cls = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)[n - 1]
    module = torch.nn.utils.skip_init(
        cls, weight.shape[1] * group, weight.shape[0], kernel, strides, pads[:n], dilations, group, bias is not None
    )
    return [cv.call_module(_load(module, weight=weight, bias=bias), x, biasable=True)]


@_handles("ConvTranspose")
def _conv_transpose(cv: _Converter, node, ins: list, attrs: dict) -> list:
    weight, bias = _weights(cv, ins, 1, 2)
    assert weight is not None
    n = weight.dim() - 2
    kernel, group = list(weight.shape[2:]), attrs.get("group", 1)
    strides, pads, dilations, auto_pad = _window(attrs, n)
    extra = list(attrs.get("output_padding", [0] * n))
    if auto_pad in _SAME:  # output = input * stride: the total padding does not depend on the input's size
        total = [o + (k - 1) * d + 1 - s for o, k, d, s in zip(extra, kernel, dilations, strides, strict=True)]
        extra = [o - min(t, 0) for o, t in zip(extra, total, strict=True)]
        total = [max(t, 0) for t in total]
        small, big = [t // 2 for t in total], [t - t // 2 for t in total]
        pads = small + big if auto_pad == "SAME_UPPER" else big + small
    output_shape = attrs.get("output_shape")
    if output_shape is not None:
        pads, extra = [0] * (2 * n), [0] * n
    common = [min(b, e) for b, e in zip(pads[:n], pads[n:], strict=True)]
    cls = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)[n - 1]
    channels = (weight.shape[0], weight.shape[1] * group)
    module = torch.nn.utils.skip_init(
        cls, *channels, kernel, strides, common, extra, group, bias is not None, dilations
    )
    out = cv.call_module(_load(module, weight=weight, bias=bias), ins[0], biasable=output_shape is None)
    if output_shape is not None:
        return [cv.emit(fit_transposed, out, list(output_shape)[-n:], auto_pad == "SAME_UPPER")]
    if pads[:n] != pads[n:]:
        cv.biasable.pop(node.output[0], None)
        begins = [b - c for b, c in zip(pads[:n], common, strict=True)]
        ends = [e - c for e, c in zip(pads[n:], common, strict=True)]
        return [cv.emit(crop_spatial, out, begins, ends)]
    return [out]


@_handles("BatchNormalization")
def _batch_norm(cv: _Converter, node, ins: list, attrs: dict) -> list:
    if any(cv.uses[name] for name in node.output[1:] if name):
        raise cv.unsupported("BatchNormalization's training outputs")
    if attrs.get("spatial", 1) != 1 or attrs.get("training_mode", 0):
        raise cv.unsupported("a BatchNormalization with spatial=0 or training_mode=1")
    scale, bias, mean, var = _weights(cv, ins, 1, 4)
    assert scale is not None and bias is not None and mean is not None and var is not None
    rank = cv.ranks.get(node.input[0])
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
    eps, momentum = attrs.get("epsilon", 1e-5), 1.0 - attrs.get("momentum", 0.9)  # ONNX keeps, torch takes
    module = cls.get(rank or 0, AnyRankBatchNorm)(scale.numel(), eps=eps, momentum=momentum)
    _load(module, weight=scale, bias=bias, running_mean=mean, running_var=var)
    return [cv.call_module(module, ins[0])]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    module = torch.nn.utils.skip_init(torch.nn.Linear, weight.shape[1], weight.shape[0], bias is not None)
    return _load(module, weight=weight, bias=bias)


@_handles("Gemm")
def _gemm(cv: _Converter, node, ins: list, attrs: dict) -> list:
    a, b, c = ins[0], ins[1], (ins[2] if len(ins) > 2 else None)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    trans_a, trans_b = attrs.get("transA", 0), attrs.get("transB", 0)
    if not isinstance(b, _Const) or b.value.dim() != 2:
        return [cv.emit(onnx_gemm, a, cv.param(b, "weight"), c, alpha, beta, trans_a, trans_b)]
    weight = (b.value if trans_b else b.value.t()) * alpha  # Linear's (out, in)
    out_features = weight.shape[0]
    bias = None
    if isinstance(c, _Const) and (c.value.numel() == 1 or tuple(c.value.shape) in ((out_features,), (1, out_features))):
        bias, c = (c.value * beta).reshape(-1).expand(out_features), None
    x = cv.emit(torch.t, a) if trans_a else a
    out = cv.call_module(_linear(weight, bias), x, biasable=c is None)
    if c is None:
        return [out]
    if beta != 1.0:
        c = cv.emit(operator.mul, c, beta, scalars=True)
    return [cv.emit(operator.add, out, c)]


@_handles("MatMul")
def _matmul(cv: _Converter, node, ins: list, attrs: dict) -> list:
    a, b = ins
    if isinstance(b, _Const) and b.value.dim() == 2 and not isinstance(a, _Const):
        return [cv.call_module(_linear(b.value.t(), None), a, biasable=True)]
    if isinstance(b, _Const) and not isinstance(a, _Const):
        return [cv.emit(torch.matmul, a, cv.param(b, "weight"))]
    return [cv.emit(torch.matmul, a, b)]


@_handles("PRelu")
def _prelu(cv: _Converter, node, ins: list, attrs: dict) -> list:
    x, slope = ins
    rank = cv.ranks.get(node.input[0])
    if isinstance(slope, _Const) and not isinstance(x, _Const):
        s = slope.value
        channels = None
        if s.numel() == 1 and (rank is None or s.dim() <= rank):
            channels = 1
        elif rank is not None and rank >= 2 and s.dim() in (rank - 1, rank):
            axis = s.dim() - (rank - 1)  # the slope's axis that lines up with the input's axis 1
            channels = s.numel() if s.shape[axis] == s.numel() and (axis == 0 or s.shape[0] == 1) else None
        if channels is not None:
            module = torch.nn.PReLU(channels)
            return [cv.call_module(_load(module, weight=s), x)]
    return [cv.emit(onnx_prelu, x, cv.param(slope, "slope"))]


@_handles("LayerNormalization", "InstanceNormalization")
def _norm(cv: _Converter, node, ins: list, attrs: dict) -> list:
    if any(cv.uses[name] for name in node.output[1:] if name):
        raise cv.unsupported(f"{node.op_type}'s mean and deviation outputs")
    x, scale, bias = ins[0], ins[1], (ins[2] if len(ins) > 2 else None)
    eps = attrs.get("epsilon", 1e-5)
    rank = cv.ranks.get(node.input[0])
    consts = isinstance(scale, _Const) and (bias is None or isinstance(bias, _Const))
    if node.op_type == "InstanceNormalization":
        cls = {3: torch.nn.InstanceNorm1d, 4: torch.nn.InstanceNorm2d, 5: torch.nn.InstanceNorm3d}.get(rank or 0)
        if consts and cls is not None and bias is not None:
            module = cls(scale.value.numel(), eps=eps, affine=True)
            return [cv.call_module(_load(module, weight=scale.value, bias=bias.value), x)]
        return [cv.emit(onnx_instance_norm, x, cv.param(scale, "weight"), cv.param(bias, "bias"), eps)]
    axis = attrs.get("axis", -1)
    if consts:
        shape = tuple(scale.value.shape)
        same_bias = bias is None or tuple(bias.value.shape) == shape
        if same_bias and (axis == -len(shape) or (rank is not None and axis == rank - len(shape))):
            module = torch.nn.LayerNorm(shape, eps=eps, bias=bias is not None)
            return [cv.call_module(_load(module, weight=scale.value, bias=getattr(bias, "value", None)), x)]
    return [cv.emit(onnx_layer_norm, x, cv.param(scale, "weight"), cv.param(bias, "bias"), axis, eps)]


class GraphFunctionTracer(torch.fx.Tracer):
    """The tracer an unpickled converted module is traced again with (torch.fx re-traces a GraphModule's
    code on load): the functions above stay calls in the graph instead of being traced through."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("autowrap_functions", _GRAPH_FUNCTIONS)
        super().__init__(*args, **kwargs)


_GRAPH_FUNCTIONS = tuple(
    f
    for name, f in list(globals().items())
    if isinstance(f, types.FunctionType) and f.__module__ == __name__ and not name.startswith("_")
)


# ---------------------------------------------------------------------------------------------------
# Entry point


def convert_onnx(model: onnx.ModelProto) -> torch.fx.GraphModule:
    """The ONNX ``model`` as a GraphModule in eval mode: forward takes the graph's inputs (not its
    initializers) in ONNX order and returns its one output, or a tuple of them in ONNX order.
    ``module.meta["onnx_module_names"]`` maps each ONNX node that became a submodule to its name."""
    missing = unsupported_onnx_ops((node.domain, node.op_type) for node in model.graph.node)
    if missing:
        raise PassError(
            f"the ONNX graph has operators the service cannot turn into a trainable torch graph: {', '.join(missing)}",
            code="unsupported_operators",
            details={"operators": missing},
        )
    return _Converter(model).convert()


assert set(_HANDLERS) == TRAINABLE_ONNX_OPS, sorted(set(_HANDLERS) ^ TRAINABLE_ONNX_OPS)
