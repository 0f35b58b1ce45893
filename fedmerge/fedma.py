"""FedMA's layer-wise matching of client models (Wang et al., "Federated Learning with Matched
Averaging", ICLR 2020, arXiv 2002.06440): the pure building blocks.

FedMA builds the global model one layer at a time. The hidden units of layer ``n`` of every
client are matched by BBP-MAP (:func:`fedmerge.matching.bbp.bbp_map`, where a client unit may
open a new global unit, so the global layer may grow); each client's next layer then reads its
inputs at the global positions its units were matched to (zeros where it has no unit), and the
next layer is matched in turn. The last layer, whose rows are the classes, is averaged with
class-count weights. This module holds that sequence for models whose hidden layers form a
chain (MLPs, VGG-style CNNs: the registry's ``mlp``, ``cnn``, ``vgg9``), described by their
permutation spec; :func:`resized` builds a model at grown widths.

:func:`match_layer` matches one layer of the clients' models (their lower layers already
matched); :func:`average_last` finishes the global model; :func:`match_chain` matches every
layer in one pass with no retraining between layers (FedMA's one-shot use of BBP-MAP, as PFNM
does). The federated protocol, where the clients retrain the layers above the matched ones
between two layers, is the strategy :class:`fedmerge.strategies.FedMA`.

Choices where the paper and its code (IBM/FedMA) leave room, or that differ from them:

- A layer's unit is a row made of every state entry with that unit on axis 0 (a linear or
  convolution weight's row over its inputs and kernel, its bias, a norm's weight and bias),
  like the reference's weight-and-bias rows. BatchNorm running statistics (the reference's
  models have no BatchNorm) are not matched: a global unit's statistics are the mean of its
  members'.
- Prior means: 0 for weights, 0.1 for biases (the reference's ``mu0``, ``mu0_bias``), 1 for a
  norm's weight (1-D ``weight``; the reference has none).
- The last layer's rows are averaged per class, weighted by each client's count of that class
  (the reference's ``last_layer_const``); without counts, by the clients' weights. State entries
  that no permutation touches are averaged by the clients' weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from .matching.bbp import bbp_map
from .models import model_spec
from .options import FedMAOptions
from .permutations import Axis, PermutationSpec, State, axis_index, check_spec

__all__ = [
    "ChainLayer",
    "ChainMatch",
    "FedMAError",
    "LayerMatch",
    "average_last",
    "chain_layers",
    "fedma_widths",
    "fit_model",
    "layer_widths",
    "match_chain",
    "match_layer",
    "resized",
    "spec_at",
]

_STATISTICS = ("running_mean", "running_var")


class FedMAError(ValueError):
    """A model whose structure FedMA's layer-by-layer matching cannot follow."""


@dataclass(frozen=True)
class ChainLayer:
    """One matched layer: its permutation, the entries that produce its units (units on axis
    0) and the places where the next layer reads them ``(tensor, dim, repeat)``."""

    perm: str
    producers: tuple[str, ...]
    consumers: tuple[tuple[str, int, int], ...]


def chain_layers(spec: PermutationSpec) -> list[ChainLayer]:
    """The spec's permutations as FedMA's layers, in spec (forward) order.

    Raises
    ------
    FedMAError
        Naming the permutation: grouped or tied units (heads, GroupNorm), units on a
        concatenated axis, or units read by anything but the next layer (a residual stream).
    """
    layers = []
    for name, group in spec.perms.items():
        if group.num_groups > 1 or group.tied_to is not None:
            raise FedMAError(f"{name}: units that move in blocks (heads, GroupNorm groups)")
        producers, consumers = [], []
        for slot in spec.slots(name):
            entry = spec.axes[slot.tensor][slot.dim]
            if not isinstance(entry, Axis):
                raise FedMAError(f"{name}: its units share an axis of {slot.tensor} with others")
            if slot.dim == 0:
                producers.append(slot.tensor)
            else:
                consumers.append((slot.tensor, slot.dim, slot.repeat))
        layers.append(ChainLayer(name, tuple(producers), tuple(consumers)))
    for n, layer in enumerate(layers):
        following = set(layers[n + 1].producers) if n + 1 < len(layers) else None
        for tensor, _, _ in layer.consumers:
            first = spec.axes[tensor][0] if spec.axes[tensor] else None
            inside = following is not None and tensor in following
            last = following is None and first is None
            if not (inside or last):
                raise FedMAError(
                    f"{layer.perm} is read by {tensor}, which is not in the next layer: FedMA "
                    "matches layer by layer along a chain (a residual stream, as in ResNets, "
                    "is read by several layers and is not supported)"
                )
    return layers


@dataclass(frozen=True)
class ChainMatch:
    """The result of :func:`match_chain`.

    Attributes
    ----------
    state : dict of str to Tensor
        The global model at its matched widths.
    widths : dict of str to int
        Units of every matched layer (by permutation name).
    assignments : dict of str to list of ndarray
        Per layer, per client: the global unit each client unit was matched to.
    new_units : dict of str to int
        Per layer: global units more than the widest client had (units opened by BBP-MAP).
    matched : dict of str to int
        Per layer: client units that share their global unit with another client's.
    """

    state: dict[str, Tensor]
    widths: dict[str, int]
    assignments: dict[str, list[np.ndarray]]
    new_units: dict[str, int]
    matched: dict[str, int]


def _prior_mean(name: str, value: Tensor) -> float:
    if name.endswith(".bias"):
        return 0.1
    if name.endswith(".weight") and value.ndim == 1:
        return 1.0  # a norm's scale
    return 0.0


def _rows(state: State, layer: ChainLayer) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """A client's units of ``layer`` as rows, each column's prior mean, and how to split back."""
    parts, means, shapes = [], [], []
    for name in layer.producers:
        if name.rsplit(".", 1)[-1] in _STATISTICS:
            continue
        value = state[name].detach().to(torch.float64)
        flat = value.reshape(value.shape[0], -1)
        parts.append(flat.numpy())
        means.append(np.full(flat.shape[1], _prior_mean(name, value)))
        shapes.append((name, tuple(value.shape[1:]), flat.shape[1]))
    return np.hstack(parts), np.concatenate(means), shapes


def _place(value: Tensor, dim: int, index: Tensor, size: int) -> Tensor:
    """``value`` with axis ``dim`` spread to ``size`` entries at ``index`` (zeros elsewhere)."""
    shape = list(value.shape)
    shape[dim] = size
    out = torch.zeros(shape, dtype=value.dtype)
    return out.index_copy(dim, index, value)


def _weighted(values: Sequence[Tensor], weights: np.ndarray) -> Tensor:
    total = sum(w * v.to(torch.float64) for w, v in zip(weights, values, strict=True))
    return (total / weights.sum()).to(values[0].dtype)


@dataclass(frozen=True)
class LayerMatch:
    """One layer matched (:func:`match_layer`).

    Attributes
    ----------
    states : list of dict
        Every client's model with the matched layer replaced by the global one and its next
        layer reading its inputs at the global positions of its units.
    width : int
        Global units of the layer.
    assignments : list of ndarray
        Per client: the global unit each of its units was matched to.
    frozen : list of str
        The state entries of the matched layers so far (this one and those below).
    matched : int
        Client units that share their global unit with another client's.
    opened : int
        Global units beyond the widest client's (units BBP-MAP opened).
    """

    states: list[dict[str, Tensor]]
    width: int
    assignments: list[np.ndarray]
    frozen: list[str]
    matched: int
    opened: int


def match_layer(
    states: Sequence[State],
    spec: PermutationSpec,
    layers: Sequence[ChainLayer],
    index: int,
    options: FedMAOptions | None = None,
    *,
    seed: int = 0,
) -> LayerMatch:
    """Match layer ``index`` of the clients' models by BBP-MAP with the ``fedma-*`` options
    (:class:`fedmerge.options.FedMAOptions`; defaults: the reference's hyperparameters).

    The layers below ``index`` must already be the global ones (matched), so that the inputs
    of layer ``index`` are at the same global positions for every client.
    """
    o = FedMAOptions.build(options)
    layer = layers[index]
    clients = [{k: v.detach().cpu() for k, v in s.items()} for s in states]
    rows, means, shapes = zip(*(_rows(c, layer) for c in clients), strict=True)
    found = bbp_map(
        list(rows),
        sigma=o.sigma,
        sigma0=o.sigma0,
        prior_mean=means[0],
        gamma=o.gamma,
        iterations=o.iterations,
        grow=o.grow,
        max_width=o.max_width or None,
        seed=seed,
    )
    width = found.width
    global_entries: dict[str, Tensor] = {}
    start = 0
    for name, rest, columns in shapes[0]:
        block = found.global_units[:, start : start + columns].reshape(width, *rest)
        global_entries[name] = torch.from_numpy(block).to(clients[0][name].dtype)
        start += columns
    for name in layer.producers:
        if name.rsplit(".", 1)[-1] in _STATISTICS:  # mean of the members' statistics
            placed = [
                _place(c[name], 0, torch.from_numpy(a), width)
                for c, a in zip(clients, found.assignments, strict=True)
            ]
            members = torch.from_numpy(found.counts).to(placed[0].dtype).clamp(min=1)
            global_entries[name] = torch.stack(placed).sum(0) / members
    for client, assignment in zip(clients, found.assignments, strict=True):
        client.update({k: v.clone() for k, v in global_entries.items()})
        for tensor, dim, repeat in layer.consumers:
            place = axis_index(torch.from_numpy(assignment), repeat)
            client[tensor] = _place(client[tensor], dim, place, width * repeat)
    frozen = [name for done in layers[: index + 1] for name in done.producers]
    shared = int(found.counts[found.counts > 1].sum())
    opened = width - max(len(r) for r in rows)
    return LayerMatch(clients, width, found.assignments, frozen, shared, opened)


def average_last(
    states: Sequence[State],
    spec: PermutationSpec,
    layers: Sequence[ChainLayer],
    weights: Sequence[float],
    class_counts: Sequence[Sequence[float]] | None = None,
) -> dict[str, Tensor]:
    """The global model from clients whose hidden layers are all matched: the matched entries
    (equal in every client) kept, the output layer averaged per class with ``class_counts``
    (or by ``weights``), anything else averaged by ``weights``."""
    w = np.asarray(weights, dtype=np.float64)
    matched = {name for layer in layers for name in layer.producers}
    out: dict[str, Tensor] = {}
    for name in states[0]:
        values = [s[name].detach().cpu() for s in states]
        if name in matched or not values[0].is_floating_point():
            out[name] = values[0].clone()  # matched entries (equal) and integer buffers
        elif class_counts is not None and _is_classifier(name, spec, list(layers)):
            table = np.asarray(class_counts, dtype=np.float64)  # (clients, classes)
            per_class = table / np.maximum(table.sum(axis=0, keepdims=True), 1e-12)
            rows_out = values[0].shape[0]
            if per_class.shape[1] != rows_out:
                raise ValueError(f"{name}: {rows_out} rows but {per_class.shape[1]} class counts")
            shape = (len(values), rows_out) + (1,) * (values[0].ndim - 1)
            factors = torch.from_numpy(per_class).reshape(shape)
            stacked = torch.stack([v.to(torch.float64) for v in values])
            out[name] = (stacked * factors).sum(0).to(values[0].dtype)
        else:
            out[name] = _weighted(values, w)
    return out


def match_chain(
    states: Sequence[State],
    spec: PermutationSpec,
    weights: Sequence[float],
    *,
    class_counts: Sequence[Sequence[float]] | None = None,
    options: FedMAOptions | None = None,
    seed: int = 0,
) -> ChainMatch:
    """Match the clients' hidden layers one after another by BBP-MAP (no retraining between
    layers) and average the last layer; see the module docstring.

    Parameters
    ----------
    states : sequence of mapping of str to Tensor
        The clients' models, all described by ``spec`` (the same widths).
    spec : PermutationSpec
        A chain (:func:`chain_layers`).
    weights : sequence of float
        The clients' weights (e.g. their sample counts) for what is averaged.
    class_counts : sequence of sequence of float, optional
        Per client, its number of samples of each class: the last layer's rows are averaged
        per class with these weights.
    options : FedMAOptions, optional
        BBP-MAP's hyperparameters (``fedma-*``), the same for every layer.
    seed : int
        Plus the layer's index, seeds each layer's sweeps.

    Returns
    -------
    ChainMatch
    """
    layers = chain_layers(spec)
    # The clients may hold a grown model (an earlier FedMA round): check them at its widths.
    at = spec_at(spec, fedma_widths(spec, states[0]))
    for state in states:
        check_spec(at, state)
    clients: list[dict[str, Tensor]] = [dict(s) for s in states]
    widths: dict[str, int] = {}
    assignments: dict[str, list[np.ndarray]] = {}
    new_units: dict[str, int] = {}
    matched: dict[str, int] = {}
    for n, layer in enumerate(layers):
        found = match_layer(clients, spec, layers, n, options, seed=seed + n)
        clients = found.states
        widths[layer.perm], assignments[layer.perm] = found.width, found.assignments
        new_units[layer.perm], matched[layer.perm] = found.opened, found.matched
    out = average_last(clients, spec, layers, weights, class_counts)
    return ChainMatch(out, widths, assignments, new_units, matched)


def fedma_widths(spec: PermutationSpec, state: State) -> dict[str, int]:
    """Units of every permutation in ``state`` (read from the first place each indexes)."""
    out = {}
    for perm in spec.perms:
        slot = spec.slots(perm)[0]
        out[perm] = int(state[slot.tensor].shape[slot.dim]) // slot.repeat
    return out


def spec_at(spec: PermutationSpec, widths: Mapping[str, int]) -> PermutationSpec:
    """``spec`` with its permutations resized to ``widths`` (a grown model's spec)."""
    perms = {p: replace(g, size=widths.get(p, g.size)) for p, g in spec.perms.items()}
    return PermutationSpec(perms, dict(spec.axes))


def layer_widths(state: State) -> dict[str, int]:
    """Output units of every layer with a weight matrix or kernel: ``{"fc1": 120, ...}``."""
    return {
        name.rsplit(".", 1)[0]: int(value.shape[0])
        for name, value in state.items()
        if name.endswith("weight") and value.ndim >= 2
    }


def fit_model(
    model: nn.Module,
    state: State,
    *,
    example_input: Tensor | None = None,
    build: Callable[[dict[str, int]], nn.Module] | None = None,
) -> nn.Module:
    """``model`` with ``state`` loaded, rebuilt first when the widths differ (FedMA's global
    model grew): by ``build(widths)`` when given (``widths``: :func:`layer_widths`, every
    layer's output units), else as a resized copy (:func:`resized`) of ``model``, its spec its
    own ``permutation_spec()`` or inferred from ``example_input`` (its forward must not
    hard-code a width).

    Raises
    ------
    ValueError
        The widths differ and neither ``build`` nor a spec (own or from ``example_input``)
        says how to rebuild the model.
    """
    own = model.state_dict()
    if any(k in own and own[k].shape != v.shape for k, v in state.items()):
        if build is not None:
            model = build(layer_widths(state))
        elif example_input is not None or callable(getattr(model, "permutation_spec", None)):
            spec = model_spec(model, example_input)
            model = resized(model, spec, fedma_widths(spec, state))
        else:
            raise ValueError(
                f"the received model has other widths than {type(model).__name__} "
                f"({layer_widths(state)}): FedMA's global model grew; pass build=... or "
                "example_input=..., or run with fedma-grow=false"
            )
    model.load_state_dict(state)
    return model


def _is_classifier(name: str, spec: PermutationSpec, layers: list[ChainLayer]) -> bool:
    """An entry of the last layer: it reads the last matched units, its rows are fixed."""
    if not layers:
        return False
    last = {tensor for tensor, _, _ in layers[-1].consumers}
    prefix = name.rsplit(".", 1)[0]
    return name in last or any(t.rsplit(".", 1)[0] == prefix for t in last)


def resized(model: nn.Module, spec: PermutationSpec, widths: Mapping[str, int]) -> nn.Module:
    """A copy of ``model`` whose matched layers have ``widths`` units (entries zeroed).

    Linear, convolution and batch-norm layers are resized by their state entries (and their
    size attributes updated); the model's forward must not hard-code a width (the registry's
    ``mlp``, ``cnn`` and ``vgg9`` flatten with ``torch.flatten``). Load a state of those widths
    into it (e.g. :attr:`ChainMatch.state`).
    """
    out = copy.deepcopy(model)
    shapes = {name: list(value.shape) for name, value in out.state_dict().items()}
    for perm, width in widths.items():
        for slot in spec.slots(perm):
            shapes[slot.tensor][slot.dim] = width * slot.repeat
    modules = dict(out.named_modules())
    for name, shape in shapes.items():
        owner, _, entry = name.rpartition(".")
        module = modules[owner]
        old = getattr(module, entry)
        if list(old.shape) == shape:
            continue
        fresh = torch.zeros(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(module, entry, nn.Parameter(fresh, requires_grad=old.requires_grad))
        else:
            module.register_buffer(entry, fresh)
    for module in out.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and weight is not None:
            module.out_features, module.in_features = weight.shape
        elif isinstance(module, nn.modules.conv._ConvNd) and weight is not None:
            module.out_channels = weight.shape[0]
            module.in_channels = weight.shape[1] * module.groups
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            source = module.running_mean if module.running_mean is not None else weight
            if source is not None:
                module.num_features = source.shape[0]
    return out
