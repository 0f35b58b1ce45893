"""The graph walk of :func:`~fedmerge.spec_inference.infer_spec`: one handler per kind of
operation, each joining, fixing or composing the unit spaces of its inputs and output."""

from __future__ import annotations

import builtins
import math
import operator
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .errors import HAND_WRITTEN_HINT, SpecInferenceError
from .spaces import _T, _Ann, _Block, _Full, _Refusal, _Spaces, _Within

# ---------------------------------------------------------------------------------------------
# Small helpers on values, arguments and shapes
# ---------------------------------------------------------------------------------------------

_MISSING = object()


def _arg(node: fx.Node, index: int, name: str, default: Any = _MISSING) -> Any:
    """Argument ``index`` (positional) or ``name`` (keyword) of a node."""
    if len(node.args) > index:
        return node.args[index]
    if name in node.kwargs:
        return node.kwargs[name]
    if default is _MISSING:
        raise _Refusal(f"argument {name!r} not found")
    return default


def _qualname(node: fx.Node) -> str:
    """The target of a ``call_module``, ``get_attr`` or ``call_method`` node (fx: a ``str``)."""
    return cast(str, node.target)


def _plain(meta: Any) -> Any:
    """A value without any unit axis, shaped like ShapeProp's ``meta``."""
    if isinstance(meta, TensorMetadata):
        return _T((None,) * len(meta.shape), tuple(meta.shape))
    if isinstance(meta, list | tuple):
        return tuple(_plain(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _plain(v) for k, v in meta.items()}
    return None


def _tensors(value: Any) -> Iterator[_T]:
    """Every traced tensor inside a (nested) value."""
    if isinstance(value, _T):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _dim(dim: object, ndim: int) -> int:
    if not isinstance(dim, int) or not -max(ndim, 1) <= dim < max(ndim, 1):
        raise _Refusal(f"cannot read the axis argument {dim!r}")
    return dim % max(ndim, 1)


def _shape_groups(old: tuple[int, ...], new: tuple[int, ...]) -> list[tuple[list, list]]:
    """Pair runs of axes with equal products: ``(2, 6, 4) -> (2, 24)`` gives [0]-[0], [1,2]-[1]."""
    if 0 in old or 0 in new:
        raise _Refusal("reshapes of empty tensors cannot be followed; use a non-empty input")
    groups: list[tuple[list, list]] = []
    i = j = 0
    while i < len(old) and j < len(new):
        gi, gj, pi, pj = [i], [j], old[i], new[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(old):
                gi.append(i)
                pi, i = pi * old[i], i + 1
            elif pj < pi and j < len(new):
                gj.append(j)
                pj, j = pj * new[j], j + 1
            else:
                raise _Refusal(f"cannot follow the reshape {old} -> {new}")
        groups.append((gi, gj))
    rest = (list(range(i, len(old))), list(range(j, len(new))))  # size-1 axes only
    if groups:
        groups[-1] = (groups[-1][0] + rest[0], groups[-1][1] + rest[1])
    elif rest[0] or rest[1]:
        groups.append(rest)
    return groups


def _order(node: fx.Node, name: str, ndim: int) -> list[int]:
    """Output axis ``i`` is input axis ``order[i]`` for transpose, permute, movedim and t."""
    order = list(range(ndim))
    if name in ("transpose", "swapaxes", "swapdims"):
        a = _dim(_arg(node, 1, "dim0"), ndim)
        b = _dim(_arg(node, 2, "dim1"), ndim)
        order[a], order[b] = order[b], order[a]
    elif name == "permute":
        dims: Sequence[object] = node.args[1:] if len(node.args) > 1 else (node.kwargs["dims"],)
        if len(dims) == 1 and isinstance(dims[0], list | tuple):
            dims = dims[0]
        order = [_dim(d, ndim) for d in dims]
    elif name in ("movedim", "moveaxis"):
        src, dst = _arg(node, 1, "source"), _arg(node, 2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src, dst = [_dim(d, ndim) for d in src], [_dim(d, ndim) for d in dst]
        rest = iter(d for d in range(ndim) if d not in src)
        placed = dict(zip(dst, src, strict=True))
        order = [placed[i] if i in placed else next(rest) for i in range(ndim)]
    elif name == "t":
        order = order[::-1]
    return order


def _whole(index: slice, size: int) -> bool:
    """Whether a slice keeps a whole axis of ``size`` in order."""
    if index == slice(None):
        return True
    bounds = (index.start, index.stop, index.step)
    return all(isinstance(v, int | None) for v in bounds) and index.indices(size) == (0, size, 1)


def _target_name(node: fx.Node, module: nn.Module | None) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(module).__name__})"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        try:
            return fx.node._get_qualified_name(cast(Callable[..., Any], node.target))
        except (AttributeError, RuntimeError):  # pragma: no cover - exotic callables
            return repr(node.target)
    return str(node.target)


# Element-wise (per position) functions and methods that keep every axis as it is.
_UNARY_NAMES = (
    "relu relu6 gelu silu elu selu celu leaky_relu hardtanh hardswish hardsigmoid mish "
    "softplus sigmoid tanh dropout dropout1d dropout2d dropout3d alpha_dropout "
    "softmax log_softmax normalize"
).split()
_TORCH_UNARY = "relu tanh sigmoid exp sqrt rsqrt abs neg square erf clamp clip softmax log_softmax"
_UNARY_FUNCTIONS: set[Callable] = {getattr(F, n) for n in _UNARY_NAMES if hasattr(F, n)}
_UNARY_FUNCTIONS |= {getattr(torch, n) for n in _TORCH_UNARY.split()}
_UNARY_FUNCTIONS |= {operator.neg, operator.pos}
_UNARY_METHODS = set(
    (
        _TORCH_UNARY
        + " clamp_min clamp_max contiguous clone detach float double half to type type_as cpu cuda "
        "relu_ sigmoid_ tanh_ clamp_ exp_"
    ).split()
)
_BROADCAST_FUNCTIONS: set[Callable] = {
    getattr(operator, n) for n in ("add", "sub", "mul", "truediv", "pow")
}
_BROADCAST_FUNCTIONS |= {
    getattr(torch, n) for n in "add sub mul div true_divide pow maximum minimum where".split()
}
_BROADCAST_METHODS = set(
    "add sub mul div pow add_ sub_ mul_ div_ masked_fill maximum minimum".split()
)
_RESHAPE_FUNCTIONS = {
    getattr(torch, n) for n in "flatten reshape unflatten squeeze unsqueeze".split()
}
_RESHAPE_METHODS = set(
    "flatten view reshape unflatten squeeze unsqueeze view_as reshape_as".split()
)
_ORDER_NAMES = ("transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t")
_ORDER_FUNCTIONS = {getattr(torch, n): n for n in _ORDER_NAMES}
_REDUCE_NAMES = ("sum", "mean", "amax", "amin", "var", "std", "logsumexp")
_REDUCE_FUNCTIONS = {getattr(torch, n) for n in _REDUCE_NAMES}
_EXPAND_METHODS = {"expand", "expand_as", "broadcast_to"}
_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_POOL_FUNCTIONS = {
    getattr(F, f"{kind}_pool{k}d"): k
    for kind in ("max", "avg", "adaptive_avg", "adaptive_max")
    for k in (1, 2, 3)
}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_NON_TENSOR_METHODS = {"size", "dim", "numel", "nelement", "ndimension"}
_SPLIT_FUNCTIONS = {torch.chunk: "chunk", torch.split: "split", torch.tensor_split: "tensor_split"}
_SPLIT_METHODS = {"chunk", "split", "tensor_split"}
#: Functions (wrapped as fx leaves by their libraries) that scale whole samples and keep
#: every axis: torchvision's stochastic depth (the identity in eval mode).
_PER_SAMPLE_FUNCTIONS = {"torchvision.ops.stochastic_depth.stochastic_depth"}


def _qualified(target: object) -> str:
    """``module.name`` of a function target (empty for anything else)."""
    module, name = getattr(target, "__module__", None), getattr(target, "__name__", None)
    return f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else ""


# Element-wise ops along one axis (``dim``): equivariant to reordering that axis, but not to
# head blocks reordered differently inside (see ``_Walk.across_blocks``).
_BLOCK_SENSITIVE_FUNCTIONS: set[Callable] = {
    F.softmax,
    F.log_softmax,
    F.normalize,
    torch.softmax,
    torch.log_softmax,
}

_ACTIVATION_MODULES = tuple(
    getattr(nn, n)
    for n in (
        "ReLU ReLU6 GELU SiLU ELU SELU CELU LeakyReLU Hardtanh Hardswish Hardsigmoid Mish "
        "Softplus Sigmoid Tanh"
    ).split()
)
_KEEP_MODULES = _ACTIVATION_MODULES + tuple(
    getattr(nn, n)
    for n in (
        "Identity Dropout Dropout1d Dropout2d Dropout3d AlphaDropout Softmax LogSoftmax"
    ).split()
)
_POOL_MODULES = {
    getattr(nn, f"{kind}Pool{k}d"): k
    for kind in ("Max", "Avg", "AdaptiveAvg", "AdaptiveMax")
    for k in (1, 2, 3)
}
_CONV_MODULES: dict[type[nn.modules.conv._ConvNd], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_NORM_MODULES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
#: Leaf modules whose output can be an activation site.
_SITE_MODULES = (nn.Linear, *_CONV_MODULES, nn.Embedding, *_NORM_MODULES, *_ACTIVATION_MODULES)


# ---------------------------------------------------------------------------------------------
# The inference proper
# ---------------------------------------------------------------------------------------------


class _Walk:
    """Walks a traced, shape-propagated graph and collects the unit spaces (the generic
    operations; the layer rules are in :mod:`.layers`)."""

    def __init__(self, model: nn.Module, graph_module: fx.GraphModule) -> None:
        self.model, self.gm = model, graph_module
        self.state = model.state_dict(keep_vars=True)
        first: dict[int, str] = {}
        self.canonical = {name: first.setdefault(id(t), name) for name, t in self.state.items()}
        self.spaces = _Spaces()
        self.slots: dict[tuple[str, int], int] = {}
        self.labels: dict[int, tuple[str, bool]] = {}  # space -> (layer name, is producer)
        self.values: dict[fx.Node, Any] = {}
        self.sites: list[tuple[fx.Node, int, int]] = []  # (node, axis, space)
        # Sites inside a leaf layer the rules model: module name, axis, relu, by sites index.
        self.inner_sites: dict[int, tuple[str, int, bool]] = {}
        self.calls = Counter(n.target for n in graph_module.graph.nodes if n.op == "call_module")
        self.current: fx.Node | None = None  # the node being walked (for group constraints)

    # ---- errors ---------------------------------------------------------------------------

    def error(self, node: fx.Node, reason: str) -> SpecInferenceError:
        module = self.gm.get_submodule(_qualname(node)) if node.op == "call_module" else None
        return SpecInferenceError(
            f"cannot infer the permutation spec of {type(self.model).__name__}: fx node "
            f"{node.name!r} ({node.op} {_target_name(node, module)}): {reason}. "
            f"{HAND_WRITTEN_HINT}"
        )

    # ---- values ---------------------------------------------------------------------------

    def value(self, arg: Any) -> Any:
        """The traced value of an argument (nodes replaced by their values)."""
        if isinstance(arg, fx.Node):
            return self.values[arg]
        if isinstance(arg, list | tuple):
            return tuple(self.value(a) for a in arg)
        if isinstance(arg, dict):
            return {k: self.value(v) for k, v in arg.items()}
        return None

    def tensor(self, arg: Any) -> _T:
        value = self.value(arg)
        if not isinstance(value, _T):
            raise _Refusal("expected a tensor argument")
        return value

    def optional(self, arg: Any) -> _T | None:
        return None if arg is None else self.tensor(arg)

    def out_shape(self, node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        if not isinstance(meta, TensorMetadata):
            raise _Refusal("the output is not a tensor")
        return tuple(meta.shape)

    def plain(self, node: fx.Node) -> Any:
        return _plain(node.meta.get("tensor_meta"))

    def param(self, name: str, label: str, producer_dims: tuple[int, ...] = ()) -> _T:
        """A state entry, every axis (longer than 1) its own space until joined."""
        tensor = self.state[name]
        ann: list[_Ann] = []
        for dim, size in enumerate(tensor.shape):
            if size == 1 or not tensor.is_floating_point():
                ann.append(None)
                continue
            key = (self.canonical[name], dim)
            if key not in self.slots:
                self.slots[key] = self.spaces.new(size)
                self.labels[self.slots[key]] = (label, dim in producer_dims)
            ann.append(_Full(self.slots[key]))
        return _T(tuple(ann), tuple(tensor.shape))

    def module_param(
        self, prefix: str, entry: str, producer_dims: tuple[int, ...] = ()
    ) -> _T | None:
        name = f"{prefix}.{entry}"
        return self.param(name, prefix, producer_dims) if name in self.state else None

    def required_param(self, prefix: str, entry: str, producer_dims: tuple[int, ...] = ()) -> _T:
        """A layer's state entry that must be there (a weight), refused when it is not."""
        param = self.module_param(prefix, entry, producer_dims)
        if param is None:
            raise _Refusal(
                f"{prefix}.{entry} is not a state entry (a reparametrised weight, such as "
                "weight_norm's, cannot be followed)"
            )
        return param

    def broadcast(self, values: list[_T], shape: tuple[int, ...]) -> _T:
        """Element-wise op: axes aligned from the right hold the same units."""
        ann: list[_Ann] = []
        for i in range(len(shape)):
            found: list[_Ann] = []
            for v in values:
                j = i - (len(shape) - len(v.shape))
                if j >= 0 and v.shape[j] != 1:
                    found.append(v.ann[j])
            result = self.spaces.norm(found[0]) if found else None
            for other in found[1:]:
                result = self.spaces.meet(result, other)
            ann.append(result if shape[i] != 1 else None)
        return _T(tuple(ann), shape)

    # ---- graph walk -----------------------------------------------------------------------

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.current = node
            try:
                self.values[node] = getattr(self, f"op_{node.op}")(node)
            except _Refusal as exc:
                raise self.error(node, str(exc)) from None

    def op_placeholder(self, node: fx.Node) -> Any:
        return self.plain(node)  # model inputs are never permuted

    def op_output(self, node: fx.Node) -> None:
        for value in _tensors(self.value(node.args[0])):
            for ann in value.ann:
                self.spaces.fix(ann)  # the model's outputs are never permuted

    def op_get_attr(self, node: fx.Node) -> Any:
        target = _qualname(node)
        name = self.canonical.get(target)
        if name is None:  # a constant or non-persistent buffer: not permuted
            return self.plain(node)
        ndim = self.state[name].ndim
        owner = target.rpartition(".")[0] or target  # "l.weight" -> "l"
        return self.param(name, owner, tuple(range(ndim)))

    def non_tensor(self, node: fx.Node) -> bool:
        """Python values (shape arithmetic such as ``n_h * n_w``, ``torch._assert``) made
        from no permuted tensor: they hold no units."""
        if node.meta.get("tensor_meta") is not None:
            return False
        return not any(t.spaced for t in _tensors(self.value((node.args, node.kwargs))))

    def op_call_function(self, node: fx.Node) -> Any:
        target = node.target
        if self.non_tensor(node) and target is not operator.getitem:
            return None
        if target in (torch.clamp, torch.clip) or target in _BLOCK_SENSITIVE_FUNCTIONS:
            return self.keep(node)
        if _qualified(target) in _PER_SAMPLE_FUNCTIONS:
            return self.keep(node)
        if target in _UNARY_FUNCTIONS:
            return self.keep(node)
        if target in _BROADCAST_FUNCTIONS:
            return self.elementwise(node)
        if target in _RESHAPE_FUNCTIONS:
            return self.reshape(node)
        if target in _ORDER_FUNCTIONS:
            return self.reorder(node, _ORDER_FUNCTIONS[target])
        if target in _REDUCE_FUNCTIONS:
            return self.reduce(node)
        if target in _MATMUL_FUNCTIONS:
            return self.matmul(node)
        if target in _CAT_FUNCTIONS:
            return self.cat(node)
        if target is torch.stack:
            return self.stack(node)
        if target in _SPLIT_FUNCTIONS:
            return self.split_op(node, _SPLIT_FUNCTIONS[target])
        if target in _POOL_FUNCTIONS:
            return self.pool(node, self.tensor(node.args[0]), _POOL_FUNCTIONS[target])
        if target in _CONV_FUNCTIONS:
            return self.f_conv(node, _CONV_FUNCTIONS[target])
        if target is operator.getitem:
            return self.getitem(node)
        if target is builtins.getattr:
            return self.attribute(node)
        if target is F.linear:
            weight, bias = self.tensor(node.args[1]), self.optional(_arg(node, 2, "bias", None))
            return self.linear(node, self.tensor(node.args[0]), weight, bias)
        if target is F.layer_norm:
            return self.f_layer_norm(node)
        return self.unknown(node)

    def op_call_method(self, node: fx.Node) -> Any:
        name = node.target
        if name in _NON_TENSOR_METHODS:
            return self.plain(node)
        if self.non_tensor(node):
            return None
        if name in _UNARY_METHODS:
            return self.keep(node)
        if name in _BROADCAST_METHODS:
            return self.elementwise(node)
        if name in _RESHAPE_METHODS:
            return self.reshape(node)
        if name in _ORDER_NAMES:
            return self.reorder(node, name)
        if name in _REDUCE_NAMES:
            return self.reduce(node)
        if name in ("matmul", "bmm"):
            return self.matmul(node)
        if name in _SPLIT_METHODS:
            return self.split_op(node, name)
        if name in _EXPAND_METHODS:
            return self.expand(node)
        return self.unknown(node)

    # ---- generic handlers -----------------------------------------------------------------

    def unknown(self, node: fx.Node) -> Any:
        """An operation without rules: allowed only when no input has a unit axis.

        A layer without rules keeps every axis of its own state entries fixed: when one of
        them is tied to a layer that is followed (an ``EmbeddingBag`` sharing its weight with
        the output ``Linear``), the tie must not let that layer's units move.
        """
        inputs = self.value((node.args, node.kwargs))
        if any(t.spaced for t in _tensors(inputs)):
            what = "layer type" if node.op == "call_module" else "operation"
            raise _Refusal(
                f"unsupported {what} applied to a tensor whose axes may hold permutable units "
                "(or to a parameter), so its effect on a permutation cannot be proved"
            )
        if node.op == "call_module":
            self.fix_state(_qualname(node))
        return self.plain(node)

    def fix_state(self, prefix: str) -> None:
        """Fix every axis of every state entry below module ``prefix``."""
        for name in self.state:
            if name.startswith(f"{prefix}.") and self.state[name].is_floating_point():
                for ann in self.param(name, prefix).ann:
                    self.spaces.fix(ann)

    def keep(self, node: fx.Node) -> _T:
        """Element-wise ops on one tensor (activations, dropout, softmax, casts, clamp).

        Tensor arguments besides the input (``clamp``'s ``min``/``max`` given as tensors, a
        per-unit bound in a buffer) broadcast against it: their unit axes join the input's.
        An op along one axis (``softmax(dim)``, ``normalize(dim)``) over the heads of a
        grouped space whose within-head axis stays is :meth:`across_blocks`.
        """
        x = self.tensor(node.args[0])
        shape = self.out_shape(node)
        if shape != x.shape:
            raise _Refusal(f"expected a shape-preserving op, got {x.shape} -> {shape}")
        others = list(_tensors(self.value((node.args[1:], node.kwargs))))
        if others:
            return self.broadcast([x, *others], shape)
        dim = _arg(node, 1, "dim", None)
        if node.target in _BLOCK_SENSITIVE_FUNCTIONS or node.target in ("softmax", "log_softmax"):
            dim = _arg(node, 2, "dim", None) if node.target is F.normalize else dim
            if isinstance(dim, int):
                self.across_blocks(x, {_dim(dim, len(x.shape))})
        return _T(tuple(self.spaces.norm(a) for a in x.ann), shape)

    def across_blocks(self, x: _T, dims: set[int]) -> None:
        """An op that mixes the head blocks of a grouped space along axes ``dims`` while the
        within-head axis stays: the heads may order their units differently (every grouped
        permutation may), so entry ``j`` of one head no longer meets entry ``j`` of another.
        The space is fixed (no permutation of it is a symmetry the spec could express)."""
        kept = {
            self.spaces.find(a.space)[0]
            for d, a in enumerate(x.ann)
            if d not in dims and isinstance(a, _Within)
        }
        for d in dims:
            a = x.ann[d]
            if isinstance(a, _Block) and self.spaces.find(a.space)[0] in kept:
                self.spaces.fix(a)

    def elementwise(self, node: fx.Node) -> _T:
        values = list(_tensors(self.value((node.args, node.kwargs))))
        return self.broadcast(values, self.out_shape(node))

    def reshape(self, node: fx.Node) -> _T:
        x, shape = self.tensor(node.args[0]), self.out_shape(node)
        ann: list[_Ann] = [None] * len(shape)
        for old, new in _shape_groups(x.shape, shape):
            items = [(self.spaces.norm(x.ann[d]), x.shape[d]) for d in old if x.shape[d] != 1]
            sizes = [shape[d] for d in new if shape[d] != 1]
            split = iter(self.split(self.merge(items), sizes))
            for d in new:
                if shape[d] != 1:
                    ann[d] = next(split)
        return _T(tuple(ann), shape)

    def merge(self, items: list[tuple[_Ann, int]]) -> _Ann:
        """One annotation for axes flattened together (all longer than 1)."""
        if all(a is None for a, _ in items):
            return None
        if len(items) == 1:
            return items[0][0]
        first, rest = items[0][0], items[1:]
        if isinstance(first, _Full) and all(a is None for a, _ in rest):
            return _Full(first.space, first.repeat * math.prod(s for _, s in rest))
        if (
            isinstance(first, _Block)
            and isinstance(rest[0][0], _Within)
            and self.spaces.tie_find(first.space) == self.spaces.tie_find(rest[0][0].space)
            and all(a is None for a, _ in rest[1:])
        ):
            return _Full(rest[0][0].space, math.prod(s for _, s in rest[1:]))
        raise _Refusal(
            "a reshape merges a unit axis with axes before it (or splits heads in another "
            "order), which interleaves units in a layout the Axis format cannot express"
        )

    def split(self, flat: _Ann, sizes: list[int]) -> list[_Ann]:
        """Annotations of the axes (all longer than 1) that one axis is unflattened into."""
        if flat is None or len(sizes) <= 1:
            return [flat] * len(sizes) if flat is None or sizes else []
        if isinstance(flat, _Full):
            units = self.spaces.size[flat.space]
            if sizes[0] % units == 0:
                return [_Full(flat.space, sizes[0] // units)] + [None] * (len(sizes) - 1)
            if units % sizes[0] == 0 and sizes[1] == units // sizes[0]:
                if flat.repeat == math.prod(sizes[2:]):
                    assert self.current is not None  # split runs inside run(), on a node
                    self.spaces.groups.append((flat.space, sizes[0], self.current))
                    head: list[_Ann] = [_Block(flat.space), _Within(flat.space)]
                    return head + [None] * (len(sizes) - 2)
        raise _Refusal(f"cannot split a unit axis into shape {tuple(sizes)}")

    def reorder(self, node: fx.Node, name: str) -> _T:
        x = self.tensor(node.args[0])
        order = _order(node, name, len(x.shape))
        return _T(tuple(x.ann[k] for k in order), self.out_shape(node))

    def expand(self, node: fx.Node) -> _T:
        x, shape = self.tensor(node.args[0]), self.out_shape(node)
        return _T((None,) * (len(shape) - len(x.shape)) + x.ann, shape)

    def reduce(self, node: fx.Node) -> _T:
        """sum/mean/amax/... over some axes: any order of the reduced units gives the same."""
        x, shape = self.tensor(node.args[0]), self.out_shape(node)
        dims = _arg(node, 1, "dim", None)
        if dims is None:
            reduced = set(range(len(x.shape)))
        else:
            dims = [dims] if isinstance(dims, int) else list(dims)
            reduced = {_dim(d, len(x.shape)) for d in dims}
        self.across_blocks(x, reduced)
        if len(shape) == len(x.shape):  # keepdim
            ann = tuple(None if d in reduced else a for d, a in enumerate(x.ann))
        else:
            ann = tuple(a for d, a in enumerate(x.ann) if d not in reduced)
        if len(ann) != len(shape):
            raise _Refusal("cannot tell which axes this reduction removes")
        return _T(ann, shape)

    def matmul(self, node: fx.Node) -> _T:
        """Contracted axes hold the same units; batch axes broadcast."""
        a, b = self.tensor(node.args[0]), self.tensor(node.args[1])
        shape, meet = self.out_shape(node), self.spaces.meet
        if len(a.shape) == 1 or len(b.shape) == 1:
            meet(a.ann[-1], b.ann[0] if len(b.shape) == 1 else b.ann[-2])
            kept = a.ann[:-1] if len(b.shape) == 1 else b.ann[:-2] + b.ann[-1:]
            return _T(tuple(self.spaces.norm(k) for k in kept), shape)
        meet(a.ann[-1], b.ann[-2])
        batch = self.broadcast(
            [_T(a.ann[:-2], a.shape[:-2]), _T(b.ann[:-2], b.shape[:-2])], shape[:-2]
        )
        ann = (*batch.ann, self.spaces.norm(a.ann[-2]), self.spaces.norm(b.ann[-1]))
        return _T(ann, shape)

    def cat(self, node: fx.Node) -> _T:
        """``torch.cat``: the other axes join; along ``dim``, a part that holds units makes the
        axis their direct sum (a composite space: each part keeps its own permutation, at
        its offset), and a part without units is a run no permutation moves."""
        parts = [self.tensor(t) for t in _arg(node, 0, "tensors")]
        shape = self.out_shape(node)
        dim = _dim(_arg(node, 1, "dim", 0), len(shape))
        parts = [p for p in parts if len(p.shape) == len(shape) and p.shape[dim] != 0]
        ann = self.join_axes(parts, len(shape), skip=dim)
        along = [self.spaces.norm(p.ann[dim]) for p in parts]
        if all(a is None for a in along):
            return _T(tuple(ann), shape)
        pieces: list[tuple[int, int]] = []
        for part, a in zip(parts, along, strict=True):
            if isinstance(a, _Full):
                pieces.append((a.space, a.repeat))
            elif a is None:
                pieces.append((self.spaces.new(part.shape[dim], fixed=True), 1))
            else:
                raise _Refusal(f"concatenation along axis {dim}, which holds attention heads")
        ann[dim] = _Full(self.spaces.concat(pieces))
        return _T(tuple(ann), shape)

    def join_axes(self, parts: list[_T], ndim: int, skip: int | None = None) -> list[_Ann]:
        """Axis ``d`` of every part holds the same units (cat and stack), except ``skip``."""
        ann: list[_Ann] = []
        for d in range(ndim):
            found = [p.ann[d] for p in parts] if d != skip else [None]
            result = self.spaces.norm(found[0])
            for other in found[1:]:
                result = self.spaces.meet(result, other)
            ann.append(result)
        return ann

    def stack(self, node: fx.Node) -> _T:
        """``torch.stack``: the parts' axes join; the new axis holds no units."""
        parts = [self.tensor(t) for t in _arg(node, 0, "tensors")]
        shape = self.out_shape(node)
        dim = _dim(_arg(node, 1, "dim", 0), len(shape))
        ann = self.join_axes(parts, len(shape) - 1)
        return _T((*ann[:dim], None, *ann[dim:]), shape)

    def split_op(self, node: fx.Node, name: str) -> tuple[_T, ...]:
        """``chunk`` / ``split`` / ``tensor_split``: pieces of one axis; on a unit axis the
        space becomes the direct sum of the pieces (cut at their boundaries)."""
        x = self.tensor(node.args[0])
        metas = node.meta.get("tensor_meta")
        if not isinstance(metas, list | tuple) or not all(
            isinstance(m, TensorMetadata) for m in metas
        ):
            raise _Refusal(f"cannot read the pieces of {name}")
        shapes = [tuple(m.shape) for m in metas]
        changed = [d for d in range(len(x.shape)) if any(s[d] != x.shape[d] for s in shapes)]
        if len(changed) > 1:
            raise _Refusal(f"cannot tell which axis {name} splits")
        if not changed:
            return tuple(_T(tuple(self.spaces.norm(a) for a in x.ann), s) for s in shapes)
        dim = changed[0]
        a = self.spaces.norm(x.ann[dim])
        lengths = [s[dim] for s in shapes]
        pieces: list[_Ann] = [None] * len(shapes)
        if isinstance(a, _Full):
            nonzero = [n for n in lengths if n]
            split = iter(self.spaces.split(a, nonzero))
            pieces = [next(split) if n else None for n in lengths]
        elif a is not None:
            raise _Refusal(f"{name} along axis {dim}, which holds attention heads")
        return tuple(
            _T((*x.ann[:dim], piece, *x.ann[dim + 1 :]), s)
            for piece, s in zip(pieces, shapes, strict=True)
        )

    def getitem(self, node: fx.Node) -> Any:
        base, index = self.value(node.args[0]), node.args[1]
        if isinstance(base, tuple) and isinstance(index, int):
            return base[index]
        if not isinstance(base, _T):
            return self.plain(node)
        return self.index(node, base, index)

    def index(self, node: fx.Node, x: _T, index: Any) -> _T:
        """Basic indexing (ints, slices, None, ...) that leaves the unit axes whole."""
        items = index if isinstance(index, tuple) else (index,)
        shape = self.out_shape(node)
        if any(isinstance(self.value(i), _T) or isinstance(i, list) for i in items):
            if x.spaced:
                raise _Refusal("advanced (tensor) indexing of a tensor with unit axes")
            return self.plain(node)
        consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in items:
            expanded.extend([slice(None)] * (len(x.shape) - consumed) if i is Ellipsis else [i])
        ann: list[_Ann] = []
        d = 0
        for i in expanded:
            if i is None:
                ann.append(None)
                continue
            a = self.spaces.norm(x.ann[d])
            whole = isinstance(i, slice) and _whole(i, x.shape[d])
            if isinstance(a, _Full) and isinstance(i, slice) and not whole:
                a = self.slice_units(a, i, x.shape[d])
            elif a is not None and not whole:
                raise _Refusal(f"indexing or slicing axis {d}, which holds permutable units")
            if isinstance(i, slice):
                ann.append(a if isinstance(a, _Full) or whole else None)
            d += 1
        ann.extend(x.ann[d:])
        if len(ann) != len(shape):
            raise _Refusal("cannot follow this indexing")
        return _T(tuple(ann), shape)

    def slice_units(self, a: _Full, index: slice, size: int) -> _Full:
        """A contiguous slice of a unit axis: the space is cut there, the slice is a piece."""
        bounds = (index.start, index.stop, index.step)
        if not all(isinstance(v, int | None) for v in bounds):
            raise _Refusal("a slice of a unit axis with bounds that are not plain integers")
        start, stop, step = index.indices(size)
        if step != 1 or stop <= start:
            raise _Refusal("a strided, reversed or empty slice of an axis with permutable units")
        lengths = [n for n in (start, stop - start, size - stop) if n]
        pieces = self.spaces.split(a, lengths)
        return pieces[1 if start else 0]

    def attribute(self, node: fx.Node) -> Any:
        x, name = self.value(node.args[0]), node.args[1]
        if isinstance(x, _T) and name in ("T", "mT", "data"):
            if name == "data":
                return x
            order = list(range(len(x.shape)))
            order = order[::-1] if name == "T" else order[:-2] + order[-1:-3:-1]
            return _T(tuple(x.ann[k] for k in order), self.out_shape(node))
        if isinstance(self.plain(node), _T) and isinstance(x, _T) and x.spaced:
            raise _Refusal(f"attribute {name!r} of a tensor with unit axes")
        return self.plain(node)

    # ---- layers ---------------------------------------------------------------------------

    def linear(self, node: fx.Node | None, x: _T, weight: _T, bias: _T | None) -> _T:
        """``x @ weight.T + bias`` over the last axis (``node`` None: inside a layer rule)."""
        if len(weight.shape) != 2:
            raise _Refusal("linear weight must be 2-D")
        self.spaces.meet(weight.ann[1], x.ann[-1])
        out = self.spaces.norm(weight.ann[0])
        if bias is not None:
            out = self.spaces.meet(out, bias.ann[0])
        shape = (*x.shape[:-1], weight.shape[0]) if node is None else self.out_shape(node)
        return _T((*x.ann[:-1], out), shape)

    def conv(self, node: fx.Node, x: _T, weight: _T, bias: _T | None, k: int, groups: int) -> _T:
        """Convolution: channels like a linear layer, spatial axes mixed (never permuted).

        Grouped: a depthwise convolution (one input channel per group) computes output
        channel ``o`` from input channel ``o // m`` alone (``m`` outputs per input), so its
        outputs are the input's units, each ``m`` times. Groups of several input channels
        read entry ``j`` of their own group through column ``j`` of the weight, which no
        single permutation of that axis can follow when groups reorder their channels
        differently: the input channels stay in place and each output group is its own
        space (its channels may be reordered among themselves).
        """
        channel = len(x.shape) - k - 1
        if channel < 0 or any(a is not None for a in x.ann[channel + 1 :]):
            raise _Refusal("a convolution over axes that hold permutable units")
        for ann in weight.ann[2:]:
            self.spaces.fix(ann)  # kernel positions
        rows = weight.shape[0]
        if groups == 1:
            self.spaces.meet(weight.ann[1], x.ann[channel])
        elif weight.shape[1] == 1:  # depthwise (times a channel multiplier)
            source = self.spaces.norm(x.ann[channel])
            per_input = rows // groups
            if isinstance(source, _Full):
                source = _Full(source.space, source.repeat * per_input)
            self.spaces.meet(weight.ann[0], source)
        else:
            self.spaces.fix(x.ann[channel])
            self.spaces.fix(weight.ann[1])
            out_rows = self.spaces.norm(weight.ann[0])
            if isinstance(out_rows, _Full):
                self.spaces.split(out_rows, [rows // groups] * groups)
        out = self.spaces.norm(weight.ann[0])
        if bias is not None:
            out = self.spaces.meet(out, bias.ann[0])
        return _T((*x.ann[:channel], out) + (None,) * k, self.out_shape(node))

    def f_conv(self, node: fx.Node, k: int) -> _T:
        x, weight = self.tensor(node.args[0]), self.tensor(_arg(node, 1, "weight"))
        bias = self.optional(_arg(node, 2, "bias", None))
        groups = _arg(node, 6, "groups", 1)
        return self.conv(node, x, weight, bias, k, groups)

    def channel_params(self, x: _T, dim: int, params: list[_T]) -> _T:
        """Per-channel vectors on axis ``dim`` of ``x`` (norm affines, running statistics)."""
        ann = self.spaces.norm(x.ann[dim])
        for p in params:
            ann = self.spaces.meet(ann, p.ann[0])
        return _T((*x.ann[:dim], ann, *x.ann[dim + 1 :]), x.shape)

    def layer_norm(self, x: _T, k: int, weight: _T | None, bias: _T | None) -> _T:
        """Normalisation over the last ``k`` axes (commutes with reordering them)."""
        del k  # the statistics are invariant; the affine broadcasts over the leading axes
        params = [p for p in (weight, bias) if p is not None]
        return self.broadcast([x, *params], x.shape)

    def f_layer_norm(self, node: fx.Node) -> _T:
        x = self.tensor(node.args[0])
        weight = self.optional(_arg(node, 2, "weight", None))
        bias = self.optional(_arg(node, 3, "bias", None))
        return self.layer_norm(x, len(_arg(node, 1, "normalized_shape")), weight, bias)

    def pool(self, node: fx.Node, x: _T, k: int) -> _T:
        """Pooling over the last ``k`` (spatial) axes keeps the channels."""
        shape = self.out_shape(node)
        channel = len(x.shape) - k - 1
        if channel < 0 or len(shape) != len(x.shape):
            raise _Refusal("unexpected pooling input or output shape")
        if any(a is not None for a in x.ann[channel + 1 :]):
            raise _Refusal("pooling over axes that hold permutable units")
        return _T(x.ann[: channel + 1] + (None,) * k, shape)

    # ---- activation sites -----------------------------------------------------------------

    def inner_site(self, node: fx.Node, name: str, axis: int, relu: bool, ann: _Ann) -> None:
        """A site at the output of submodule ``name`` that the leaf at ``node`` calls."""
        ann = self.spaces.norm(ann)
        if isinstance(ann, _Full) and ann.repeat == 1:
            self.inner_sites[len(self.sites)] = (name, axis, relu)
            self.sites.append((node, axis, ann.space))

    def note_site(self, node: fx.Node, module: nn.Module, out: Any) -> None:
        """Remember leaf outputs whose axis 1 or -1 holds a space (once-called modules only)."""
        if isinstance(module, _SITE_MODULES) and self.calls[node.target] == 1:
            self.sites.extend(self.unit_axes(node, out))

    def unit_axes(self, node: fx.Node, out: Any) -> list[tuple[fx.Node, int, int]]:
        """``(node, site axis, space)`` for axis 1 and -1 of ``out`` when they hold units."""
        if not isinstance(out, _T) or len(out.shape) < 2:
            return []
        found = []
        for axis in sorted({1, len(out.shape) - 1}):
            ann = self.spaces.norm(out.ann[axis])
            if isinstance(ann, _Full) and ann.repeat == 1:
                site_axis = -1 if axis == len(out.shape) - 1 and axis > 1 else axis
                found.append((node, site_axis, ann.space))
        return found
