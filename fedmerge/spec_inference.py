"""Infer a model's permutation spec from its code, by tracing it with :mod:`torch.fx`.

:func:`infer_spec` traces ``forward`` symbolically (:func:`torch.fx.symbolic_trace`; the
built-in ``torch.nn`` layers stay leaves), runs the graph once on an example input to learn
every intermediate shape (:class:`torch.fx.passes.shape_prop.ShapeProp`), and then follows how
hidden units flow through the graph. The result is a
:class:`~fedmerge.permutations.PermutationSpec` such as a hand-written ``permutation_spec()``
method would return.

How it works
------------
Every axis of every floating-point state entry (parameters and buffers) that a traced
operation reads starts as its own *unit space*. Every intermediate tensor records, per axis,
which space indexes it (possibly with each unit repeated ``r`` times in a row, after a flatten),
or nothing. Operations join spaces (union-find):

- ``Linear`` / ``Conv1d-3d`` (``groups=1``) / ``F.linear`` / ``F.conv*d``: the weight's input
  axis joins the input's feature axis; the output's feature axis is the weight's output axis
  (and the bias). ``Embedding``: the output's last axis is the weight's embedding axis.
- ``BatchNorm*`` (weight, bias *and* running statistics), ``GroupNorm`` (the space becomes
  grouped, ``num_groups`` blocks), ``LayerNorm`` (weight and bias broadcast over the
  normalised axes), element-wise activations and dropout (modules, functions and tensor
  methods), softmax, pooling over spatial axes, ``Identity``: the feature axis keeps its space.
- Element-wise ``+ - * /`` (and other broadcasting element-wise ops) join the spaces of the
  aligned axes: a residual add puts the shortcut and the branch on one stream. A parameter read
  with ``get_attr`` (a cls token, a position embedding) joins the stream on the axis it is
  added on; an axis that meets an axis no permutation may touch becomes *fixed*.
- ``flatten`` / ``view`` / ``reshape`` of ``(N, C, H, W)`` to ``(N, C*H*W)`` give the merged
  axis the channel space with ``repeat = H*W``; ``unflatten(-1, (heads, d))`` splits a space
  into head blocks and units within a head, which makes it grouped (``num_groups = heads``).
- ``matmul`` joins the contracted axes (``q @ k.transpose(-2, -1)``: q and k share one
  permutation); batch axes that index the heads of two different spaces (``weights @ v``) tie
  their block orders (``tied_to``).
- ``cat`` along an axis without units joins the other axes; reductions (``sum``, ``mean``...)
  drop their axes (they are invariant to any reordering).
- The model's inputs are never permuted, and every space that reaches the model's output is
  fixed. Fixed spaces (and everything joined with them) are not permutations of the spec.

Multi-head attention as the ``torch.nn.MultiheadAttention`` leaf: only the embedding axes are
permuted (the input columns of ``in_proj_weight`` or ``q/k/v_proj_weight`` with the inputs'
spaces, the rows of ``out_proj`` as a new space, usually joined with the residual stream).
The heads' own q/k and v units stay fixed: ``in_proj_weight`` packs q, k and v in one
``(3E, E)`` tensor, whose row axis would need three permutations side by side, which the
:class:`~fedmerge.permutations.Axis` format cannot express. Write attention with separate
``q``, ``k``, ``v`` linear layers (as the registry's ``vit``) to have its heads permuted.

Anything the inference cannot prove correct raises :class:`SpecInferenceError` naming the fx
node: an operation it does not know applied to a tensor with permuted axes, ``cat`` along a
unit axis, slicing or indexing a unit axis, grouped convolutions, reshapes that interleave
units with other axes, and models ``torch.fx`` cannot trace (data-dependent control flow).
Such models need a hand-written spec: a ``permutation_spec()`` method returning a
:class:`~fedmerge.permutations.PermutationSpec` (see :mod:`fedmerge.permutations` and the
registry models in :mod:`fedmerge.models`).

Permutations are named ``P_<name>`` after the first layer (in graph order) that produces their
units, e.g. ``P_conv1``, ``P_blocks.0.attn.q``; a parameter read directly (``P_cls``) when no
layer produces them. Activation sites are the outputs of the leaf layers that hold the units
on axis 1 (``(N, C, ...)``) or -1 (``(N, T, D)``), the last one of a chain such as conv ->
norm -> activation module, with ``relu=True`` when the only user of the output is a ReLU;
modules called more than once are never sites. A permutation without such a layer gets the
outputs of once-called non-leaf modules that hold its units (an ``nn.Linear`` subclass that
fx traces down to ``F.linear``); one with neither has no site (weight matching still works,
activation matching refuses it).
"""

from __future__ import annotations

import builtins
import math
import operator
import os
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.fx.proxy import TraceError

from .permutations import Axis, PermGroup, PermutationSpec, Site, check_spec

__all__ = ["SpecInferenceError", "infer_spec"]

#: How to get a spec when inference refuses (the end of every SpecInferenceError message).
HAND_WRITTEN_HINT = (
    "Write the spec by hand instead: give the model a permutation_spec() method that returns "
    "a fedmerge.permutations.PermutationSpec (see the fedmerge.permutations docstring, "
    "docs/methods.md 'Permutation specs' and the registry models in fedmerge/models)"
)


class SpecInferenceError(TypeError):
    """The permutation spec of a model cannot be inferred; the message names the fx node."""


class _Refusal(Exception):
    """Raised inside a node's handler; the caller adds the node to the message."""


# ---------------------------------------------------------------------------------------------
# Axis annotations and unit spaces
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Full:
    """The axis holds every unit of ``space``, each ``repeat`` times in a row."""

    space: int
    repeat: int = 1


@dataclass(frozen=True)
class _Block:
    """The axis indexes the blocks (heads) of a grouped ``space``."""

    space: int


@dataclass(frozen=True)
class _Within:
    """The axis indexes the units inside one block of a grouped ``space``."""

    space: int


_Ann = _Full | _Block | _Within | None


@dataclass(frozen=True)
class _T:
    """A traced tensor: its shape and, per axis, the space that indexes it (or None)."""

    ann: tuple[_Ann, ...]
    shape: tuple[int, ...]

    @property
    def spaced(self) -> bool:
        """Whether some axis is indexed by a unit space."""
        return any(a is not None for a in self.ann)


class _Spaces:
    """Union-find over unit spaces; a space may be another one with every unit repeated."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.factor: list[int] = []  # units of a space = units of its parent x factor
        self.size: list[int] = []
        self.fixed: list[bool] = []
        self.tie: list[int] = []  # union-find of block orders (joined spaces and ties)
        self.groups: list[tuple[int, int, fx.Node]] = []  # (space, num_groups, node)

    def new(self, size: int) -> int:
        """A fresh space of ``size`` units."""
        index = len(self.parent)
        self.parent.append(index)
        self.factor.append(1)
        self.size.append(size)
        self.fixed.append(False)
        self.tie.append(index)
        return index

    def find(self, space: int) -> tuple[int, int]:
        """``(root, f)``: ``space`` is ``root`` with every unit repeated ``f`` times."""
        path = []
        while self.parent[space] != space:
            path.append(space)
            space = self.parent[space]
        total = 1
        for node in reversed(path):  # nearest to the root first
            total *= self.factor[node]
            self.factor[node], self.parent[node] = total, space
        return space, (self.factor[path[0]] if path else 1)

    def tie_find(self, space: int) -> int:
        """Representative of the block-order family of ``space``."""
        while self.tie[space] != space:
            self.tie[space] = self.tie[self.tie[space]]
            space = self.tie[space]
        return space

    def tie_union(self, a: int, b: int) -> None:
        """Make two spaces share their block order."""
        a, b = self.tie_find(a), self.tie_find(b)
        if a != b:
            self.tie[max(a, b)] = min(a, b)

    def attach(self, child: int, root: int, factor: int) -> None:
        """Make root ``child`` equal to root ``root`` with every unit repeated ``factor``."""
        self.parent[child], self.factor[child] = root, factor
        self.fixed[root] = self.fixed[root] or self.fixed[child]
        self.tie_union(child, root)

    def norm(self, ann: _Ann) -> _Ann:
        """``ann`` expressed on the root of its space."""
        if ann is None:
            return None
        root, factor = self.find(ann.space)
        if isinstance(ann, _Full):
            return _Full(root, ann.repeat * factor)
        if factor != 1:
            raise _Refusal("a head-grouped unit axis is also repeated; its layout is unknown")
        return type(ann)(root)

    def fix(self, ann: _Ann) -> None:
        """Mark the space of ``ann`` as not permutable."""
        if ann is not None:
            self.fixed[self.find(ann.space)[0]] = True

    def join(self, a: _Full, b: _Full) -> _Full:
        """Two normalised full axes of equal length hold the same units in the same order."""
        if a.space == b.space:
            if a.repeat != b.repeat:
                raise _Refusal("one space meets itself with two different repeat factors")
            return a
        if a.repeat == b.repeat:
            root, child = sorted((a.space, b.space))
            self.attach(child, root, 1)
            return _Full(root, a.repeat)
        big, small = (a, b) if a.repeat > b.repeat else (b, a)
        if big.repeat % small.repeat:
            raise _Refusal(f"repeat factors {a.repeat} and {b.repeat} are incompatible")
        self.attach(small.space, big.space, big.repeat // small.repeat)
        return big

    def union(self, a: int, b: int) -> int:
        """Join two root spaces of equal size."""
        if a == b:
            return a
        if self.size[a] != self.size[b]:
            raise _Refusal(f"head-grouped spaces of {self.size[a]} and {self.size[b]} units meet")
        root, child = sorted((a, b))
        self.attach(child, root, 1)
        return root

    def meet(self, a: _Ann, b: _Ann) -> _Ann:
        """Two axes that must be reordered alike (aligned in an element-wise op or contracted)."""
        a, b = self.norm(a), self.norm(b)
        if a is None or b is None:
            self.fix(a)
            self.fix(b)
            return None
        if isinstance(a, _Full) and isinstance(b, _Full):
            return self.join(a, b)
        if isinstance(a, _Within) and isinstance(b, _Within):
            return _Within(self.union(a.space, b.space))
        if isinstance(a, _Block) and isinstance(b, _Block):
            self.tie_union(a.space, b.space)
            return a
        self.fix(a)  # e.g. a per-head parameter added to head-grouped scores
        self.fix(b)
        return None


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
        _TORCH_UNARY + " contiguous clone detach float double half to type type_as cpu cuda "
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
_RELUS = ({F.relu, torch.relu}, {"relu", "relu_"}, nn.ReLU)


# ---------------------------------------------------------------------------------------------
# The inference proper
# ---------------------------------------------------------------------------------------------


class _Inference:
    """Walks a traced, shape-propagated graph and collects the unit spaces."""

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

    def op_call_function(self, node: fx.Node) -> Any:
        target = node.target
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
        if name in _EXPAND_METHODS:
            return self.expand(node)
        if name in _NON_TENSOR_METHODS:
            return self.plain(node)
        return self.unknown(node)

    def op_call_module(self, node: fx.Node) -> Any:
        prefix = _qualname(node)
        module = self.gm.get_submodule(prefix)
        if isinstance(module, nn.Linear):
            weight = self.required_param(prefix, "weight", (0,))
            bias = self.module_param(prefix, "bias")
            out = self.linear(node, self.tensor(node.args[0]), weight, bias)
        elif isinstance(module, nn.modules.conv._ConvNd) and type(module) in _CONV_MODULES:
            out = self.module_conv(node, module, prefix)
        elif isinstance(module, nn.Embedding):
            out = self.embedding(node, prefix)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            out = self.batch_norm(node, prefix)
        elif isinstance(module, nn.GroupNorm):
            out = self.group_norm(node, module, prefix)
        elif isinstance(module, nn.LayerNorm):
            scale, shift = self.module_param(prefix, "weight"), self.module_param(prefix, "bias")
            x = self.tensor(node.args[0])
            out = self.layer_norm(x, len(module.normalized_shape), scale, shift)
        elif isinstance(module, _KEEP_MODULES):
            out = self.keep(node)
        elif type(module) in _POOL_MODULES:
            out = self.pool(node, self.tensor(node.args[0]), _POOL_MODULES[type(module)])
        elif isinstance(module, nn.Flatten | nn.Unflatten):
            out = self.reshape(node)
        elif isinstance(module, nn.MultiheadAttention):
            out = self.attention(node, module, prefix)
        else:
            out = self.unknown(node)
        self.note_site(node, module, out)
        return out

    # ---- generic handlers -----------------------------------------------------------------

    def unknown(self, node: fx.Node) -> Any:
        """An operation without rules: allowed only when no input has a unit axis."""
        inputs = self.value((node.args, node.kwargs))
        if any(t.spaced for t in _tensors(inputs)):
            what = "layer type" if node.op == "call_module" else "operation"
            raise _Refusal(
                f"unsupported {what} applied to a tensor whose axes may hold permutable units "
                "(or to a parameter), so its effect on a permutation cannot be proved"
            )
        return self.plain(node)

    def keep(self, node: fx.Node) -> _T:
        """Element-wise ops on one tensor (activations, dropout, softmax, casts)."""
        x = self.tensor(node.args[0])
        shape = self.out_shape(node)
        if shape != x.shape:
            raise _Refusal(f"expected a shape-preserving op, got {x.shape} -> {shape}")
        return _T(tuple(self.spaces.norm(a) for a in x.ann), shape)

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
        parts = [self.tensor(t) for t in _arg(node, 0, "tensors")]
        shape = self.out_shape(node)
        dim = _dim(_arg(node, 1, "dim", 0), len(shape))
        if any(self.spaces.norm(p.ann[dim]) is not None for p in parts):
            raise _Refusal(
                f"concatenation along axis {dim}, which holds permutable units: the units of "
                "the parts would need permutations at offsets, which is not supported"
            )
        ann: list[_Ann] = []
        for d in range(len(shape)):
            found = [p.ann[d] for p in parts] if d != dim else [None]
            result = self.spaces.norm(found[0])
            for other in found[1:]:
                result = self.spaces.meet(result, other)
            ann.append(result)
        return _T(tuple(ann), shape)

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
            if a is not None and not whole:
                raise _Refusal(f"indexing or slicing axis {d}, which holds permutable units")
            if isinstance(i, slice):
                ann.append(a if whole else None)
            d += 1
        ann.extend(x.ann[d:])
        if len(ann) != len(shape):
            raise _Refusal("cannot follow this indexing")
        return _T(tuple(ann), shape)

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

    def linear(self, node: fx.Node, x: _T, weight: _T, bias: _T | None) -> _T:
        """``x @ weight.T + bias`` over the last axis."""
        if len(weight.shape) != 2:
            raise _Refusal("linear weight must be 2-D")
        self.spaces.meet(weight.ann[1], x.ann[-1])
        out = self.spaces.norm(weight.ann[0])
        if bias is not None:
            out = self.spaces.meet(out, bias.ann[0])
        return _T((*x.ann[:-1], out), self.out_shape(node))

    def conv(self, node: fx.Node, x: _T, weight: _T, bias: _T | None, k: int, groups: int) -> _T:
        """Convolution: channels like a linear layer, spatial axes mixed (never permuted)."""
        if groups != 1:
            raise _Refusal(f"grouped convolution (groups={groups}) is not supported")
        channel = len(x.shape) - k - 1
        if channel < 0 or any(a is not None for a in x.ann[channel + 1 :]):
            raise _Refusal("a convolution over axes that hold permutable units")
        for ann in weight.ann[2:]:
            self.spaces.fix(ann)  # kernel positions
        self.spaces.meet(weight.ann[1], x.ann[channel])
        out = self.spaces.norm(weight.ann[0])
        if bias is not None:
            out = self.spaces.meet(out, bias.ann[0])
        return _T((*x.ann[:channel], out) + (None,) * k, self.out_shape(node))

    def module_conv(self, node: fx.Node, module: nn.modules.conv._ConvNd, prefix: str) -> _T:
        weight = self.required_param(prefix, "weight", (0,))
        bias = self.module_param(prefix, "bias")
        k = _CONV_MODULES[type(module)]
        return self.conv(node, self.tensor(node.args[0]), weight, bias, k, module.groups)

    def f_conv(self, node: fx.Node, k: int) -> _T:
        x, weight = self.tensor(node.args[0]), self.tensor(_arg(node, 1, "weight"))
        bias = self.optional(_arg(node, 2, "bias", None))
        groups = _arg(node, 6, "groups", 1)
        return self.conv(node, x, weight, bias, k, groups)

    def embedding(self, node: fx.Node, prefix: str) -> _T:
        x, weight = self.tensor(node.args[0]), self.required_param(prefix, "weight", (1,))
        if x.spaced:
            raise _Refusal("embedding indices have permutable axes")
        self.spaces.fix(weight.ann[0])  # rows are looked up by index
        return _T((*x.ann, self.spaces.norm(weight.ann[1])), self.out_shape(node))

    def channel_params(self, x: _T, dim: int, params: list[_T]) -> _T:
        """Per-channel vectors on axis ``dim`` of ``x`` (norm affines, running statistics)."""
        ann = self.spaces.norm(x.ann[dim])
        for p in params:
            ann = self.spaces.meet(ann, p.ann[0])
        return _T((*x.ann[:dim], ann, *x.ann[dim + 1 :]), x.shape)

    def batch_norm(self, node: fx.Node, prefix: str) -> _T:
        entries = ("weight", "bias", "running_mean", "running_var")
        params = [p for e in entries if (p := self.module_param(prefix, e)) is not None]
        return self.channel_params(self.tensor(node.args[0]), 1, params)

    def group_norm(self, node: fx.Node, module: nn.GroupNorm, prefix: str) -> _T:
        x = self.tensor(node.args[0])
        ann = self.spaces.norm(x.ann[1])
        if module.num_groups > 1 and ann is not None:
            if not isinstance(ann, _Full) or self.spaces.size[ann.space] % module.num_groups:
                raise _Refusal("GroupNorm groups do not align with the permutable channels")
            self.spaces.groups.append((ann.space, module.num_groups, node))
        params = [p for e in ("weight", "bias") if (p := self.module_param(prefix, e))]
        return self.channel_params(x, 1, params)

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

    def attention(self, node: fx.Node, module: nn.MultiheadAttention, prefix: str) -> Any:
        """``nn.MultiheadAttention``: only the embedding axes (see the module docstring)."""
        inputs = [self.tensor(_arg(node, i, n)) for i, n in enumerate(("query", "key", "value"))]
        masks = [v for k, v in node.kwargs.items() if k.endswith("mask")] + list(node.args[3:])
        if any(t.spaced for t in _tensors(self.value(masks))):
            raise _Refusal("attention masks with permutable axes")
        projections = ("in_proj_weight",) * 3 if module._qkv_same_embed_dim else ("q", "k", "v")
        for x, entry in zip(inputs, projections, strict=True):
            name = entry if entry == "in_proj_weight" else f"{entry}_proj_weight"
            self.spaces.meet(self.required_param(prefix, name).ann[1], x.ann[-1])
        for entry in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            if (weight := self.module_param(prefix, entry)) is not None:
                self.spaces.fix(weight.ann[0])  # the heads' q, k, v units: packed
        for entry in ("in_proj_bias", "bias_k", "bias_v"):
            for ann in getattr(self.module_param(prefix, entry), "ann", ()):
                self.spaces.fix(ann)
        out_proj = self.required_param(f"{prefix}.out_proj", "weight", (0,))
        out_bias = self.module_param(f"{prefix}.out_proj", "bias")
        out = self.spaces.norm(out_proj.ann[0])
        if out_bias is not None:
            out = self.spaces.meet(out, out_bias.ann[0])
        self.spaces.fix(out_proj.ann[1])  # the heads' v units: packed, not expressible
        meta = node.meta["tensor_meta"]  # ShapeProp's (output, weights) pair
        query = inputs[0]
        return (_T((*query.ann[:-1], out), tuple(meta[0].shape)), _plain(meta[1]))

    # ---- activation sites -----------------------------------------------------------------

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

    def module_outputs(self) -> dict[fx.Node, str]:
        """Last node of every non-leaf module called once (its output), innermost module."""
        nodes = list(self.gm.graph.nodes)
        runs: dict[str, list[int]] = {}
        for position, node in enumerate(nodes):
            for path, _ in node.meta.get("nn_module_stack", {}).values():
                runs.setdefault(path, []).append(position)
        outputs: dict[fx.Node, str] = {}
        for path, positions in runs.items():
            last = nodes[positions[-1]]
            inside = all(
                path in {p for p, _ in user.meta.get("nn_module_stack", {}).values()}
                for user in last.users
            )
            contiguous = positions == list(range(positions[0], positions[-1] + 1))
            if path and contiguous and not inside and last.op != "call_module":
                outputs[last] = path  # nested paths come later: the innermost wins
        return outputs

    def site_groups(self) -> dict[int, list[Site]]:
        """Sites by root space; a site whose only user is the next site of a chain is dropped.

        A space without a leaf-layer site gets the outputs of the (non-leaf) modules that
        hold its units, e.g. a ``nn.Linear`` subclass traced down to ``F.linear``.
        """
        sites = self.resolve_sites(self.sites)
        paths = self.module_outputs()
        fallback = [found for node in paths for found in self.unit_axes(node, self.values[node])]
        for root, found in self.resolve_sites(fallback, paths).items():
            sites.setdefault(root, found)
        return sites

    def resolve_sites(
        self, candidates: list[tuple[fx.Node, int, int]], paths: dict[fx.Node, str] | None = None
    ) -> dict[int, list[Site]]:
        """Sites by root space (named by module ``paths`` when given, else the node target)."""
        by_node: dict[fx.Node, set[int]] = {}
        resolved = []
        for node, axis, space in candidates:
            root, factor = self.spaces.find(space)
            if factor == 1:
                resolved.append((node, axis, root))
                by_node.setdefault(node, set()).add(root)
        out: dict[int, list[Site]] = {}
        for node, axis, root in resolved:
            users = list(node.users)
            if len(users) == 1 and root in by_node.get(users[0], ()):
                continue
            relu = len(users) == 1 and _is_relu(self.gm, users[0])
            name = paths[node] if paths else str(node.target)
            out.setdefault(root, []).append(Site(name, axis, relu))
        return out

    # ---- the spec -------------------------------------------------------------------------

    def spec(self) -> PermutationSpec:
        sp = self.spaces
        roots = sorted({sp.find(s)[0] for s in self.slots.values()})
        families: dict[int, list[int]] = {}
        for root in roots:
            families.setdefault(sp.tie_find(root), []).append(root)
        for members in families.values():
            if any(sp.fixed[m] for m in members):
                for m in members:
                    sp.fixed[m] = True
        free = [r for r in roots if not sp.fixed[r]]
        groups = self.num_groups(free)
        names = self.names(free)
        sites = self.site_groups()
        perms: dict[str, PermGroup] = {}
        for root in free:
            members = [m for m in families[sp.tie_find(root)] if not sp.fixed[m]]
            tied = None if members[0] == root or len(members) == 1 else names[members[0]]
            if tied is not None and groups[members[0]] != groups[root]:
                raise SpecInferenceError(
                    f"cannot infer the permutation spec of {type(self.model).__name__}: "
                    f"{names[root]} and {tied} share a head order but have "
                    f"{groups[root]} and {groups[members[0]]} groups. {HAND_WRITTEN_HINT}"
                )
            perms[names[root]] = PermGroup(
                sp.size[root], groups[root], tied, tuple(sites.get(root, ()))
            )
        axes: dict[str, tuple[Axis | None, ...]] = {}
        for name, tensor in self.state.items():
            dims: list[Axis | None] = []
            for dim in range(tensor.ndim):
                space = self.slots.get((self.canonical[name], dim))
                if space is None:
                    dims.append(None)
                    continue
                root, factor = sp.find(space)
                dims.append(Axis(names[root], factor) if root in names else None)
            axes[name] = tuple(dims)
        return PermutationSpec(perms, axes)

    def num_groups(self, free: list[int]) -> dict[int, int]:
        """Block count of every free root space (1 unless GroupNorm or heads)."""
        found: dict[int, dict[int, fx.Node]] = {r: {} for r in free}
        for space, count, node in self.spaces.groups:
            root = self.spaces.find(space)[0]
            if root not in found or count == 1:
                continue
            if self.spaces.size[root] % count:
                raise self.error(node, f"{count} groups do not divide the units of a space")
            found[root].setdefault(count, node)
        for counts in found.values():
            if len(counts) > 1:
                nodes = ", ".join(f"{n.name!r} ({c} groups)" for c, n in counts.items())
                raise self.error(
                    next(iter(counts.values())),
                    f"one permutation would need several group structures: {nodes}",
                )
        return {r: next(iter(c), 1) for r, c in found.items()}

    def names(self, free: list[int]) -> dict[int, str]:
        """``P_<first producing layer>`` for every free root space, unique."""
        members: dict[int, list[int]] = {r: [] for r in free}
        for space in sorted(self.labels):
            root = self.spaces.find(space)[0]
            if root in members:
                members[root].append(space)
        names: dict[int, str] = {}
        taken: set[str] = set()
        for root in free:
            producers = [s for s in members[root] if self.labels[s][1]] or members[root]
            base = f"P_{self.labels[producers[0]][0]}"
            name, k = base, 2
            while name in taken:
                name, k = f"{base}_{k}", k + 1
            taken.add(name)
            names[root] = name
        return names


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    functions, methods, module_type = _RELUS
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return node.op == "call_module" and isinstance(gm.get_submodule(_qualname(node)), module_type)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no BatchNorm statistics updated, no dropout) and no autograd; restored."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag


def _user_frame(exc: BaseException) -> str:
    """Where in the model's own code tracing failed (the last frame outside torch)."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)
    ]
    if not frames:
        return "in forward"
    frame = frames[-1]
    return f"at {frame.filename}:{frame.lineno} in {frame.name} ({(frame.line or '').strip()!r})"


def _trace(model: nn.Module) -> fx.GraphModule:
    name = type(model).__name__
    try:
        return fx.symbolic_trace(model)
    except TraceError as exc:
        raise SpecInferenceError(
            f"cannot infer the permutation spec of {name}: torch.fx cannot trace its forward "
            f"{_user_frame(exc)}: {exc}. This is usually data-dependent control flow (an "
            "`if`/`while` on tensor values) or iteration over a tensor, which a symbolic "
            f"trace cannot follow. {HAND_WRITTEN_HINT}"
        ) from exc
    except (RuntimeError, TypeError, NotImplementedError, AttributeError) as exc:
        raise SpecInferenceError(
            f"cannot infer the permutation spec of {name}: torch.fx cannot trace its forward "
            f"{_user_frame(exc)}: {type(exc).__name__}: {exc}. {HAND_WRITTEN_HINT}"
        ) from exc


def infer_spec(model: nn.Module, example_input: Tensor | tuple[Tensor, ...]) -> PermutationSpec:
    """Infer the permutation spec of ``model`` from its code (see the module docstring).

    Parameters
    ----------
    model : torch.nn.Module
        Any model that :func:`torch.fx.symbolic_trace` can trace. Not modified: it is run
        once on ``example_input`` in eval mode without gradients, and every module's
        train/eval mode is restored.
    example_input : Tensor or tuple of Tensor
        Positional inputs of ``forward`` (a batch, on the model's device and dtype), used only
        to learn every intermediate shape. Use a batch of at least 2 and images large enough
        that no spatial axis has the same length as a channel axis by accident.

    Returns
    -------
    PermutationSpec
        Checked against ``model.state_dict()`` (every entry, buffers included); permutations
        are named ``P_<first producing layer>`` in graph order and have activation sites when
        some once-called leaf layer outputs their units.

    Raises
    ------
    SpecInferenceError
        (a ``TypeError``) naming the fx node, its op and target, when the model cannot be
        traced or uses an operation whose effect on a permutation cannot be proved; the
        message says how to write the spec by hand.
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    graph_module = _trace(model)
    with _evaluating(model):
        ShapeProp(graph_module).propagate(*inputs)
    inference = _Inference(model, graph_module)
    inference.run()
    spec = inference.spec()
    check_spec(spec, model.state_dict())
    return spec
