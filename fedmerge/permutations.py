"""Permutation specs: which axis of which tensor is indexed by which hidden-unit permutation.

Hidden units of a network can be reordered without changing the function it computes, as long
as every tensor that produces a unit and every tensor that consumes it is reordered the same
way. A :class:`PermutationSpec` declares that structure once per architecture (Git Re-Basin,
Ainsworth et al., ICLR 2023, arXiv 2209.04836); every matcher (:mod:`fedmerge.matching`)
returns permutations for a spec, and only :func:`apply_permutations` applies them.

Conventions
-----------
A permutation of ``n`` units is a ``torch.long`` tensor ``perm`` of shape ``(n,)``. Applying
it to a model puts old unit ``perm[i]`` at position ``i`` (``W'[i] = W[perm[i]]`` along every
axis the permutation indexes). Applying ``p`` then ``q`` equals applying ``p[q]``; the inverse
of ``p`` is ``argsort(p)``.

Grouped units (attention heads, GroupNorm groups) are declared with ``num_groups > 1``: the
``n`` units form ``num_groups`` consecutive blocks of ``n // num_groups``; a valid permutation
moves whole blocks to block positions and may reorder units only inside a block. Two grouped
permutations can share their block order (``tied_to``): in multi-head attention, q/k and v/out
have their own within-head orders but must move heads together.

An axis that holds every unit several times in a row (the first linear layer after flattening
a ``(C, H, W)`` feature map holds channel ``c`` at columns ``c*H*W .. (c+1)*H*W - 1``) is
declared as :class:`Axis` with ``repeat = H*W``.

An axis that holds several unit spaces side by side (the input channels of a layer after
``torch.cat`` of two feature maps, the gate rows of an LSTM's weights, the packed q/k/v rows
of ``nn.MultiheadAttention``'s ``in_proj_weight``) is declared as :class:`Concat`: its parts are
laid end to end, each an :class:`Axis` or a run of entries that no permutation moves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "Axis",
    "AxisEntry",
    "Concat",
    "PermGroup",
    "PermutationSpec",
    "Site",
    "Slot",
    "apply_permutations",
    "axis_index",
    "block_order",
    "check_permutations",
    "check_spec",
    "compose",
    "entry_index",
    "entry_parts",
    "identity_permutations",
    "invert",
    "is_valid_permutation",
    "layer_axes",
    "random_permutations",
    "spec_from_axes",
]

State = Mapping[str, Tensor]
#: A state dict a function builds and hands over (its caller may change it).
StateDict = dict[str, Tensor]
Permutations = dict[str, Tensor]


@dataclass(frozen=True)
class Axis:
    """One tensor axis indexed by permutation ``perm``, each unit ``repeat`` times in a row."""

    perm: str
    repeat: int = 1


@dataclass(frozen=True)
class Concat:
    """An axis that holds several runs of entries side by side (a direct sum of unit spaces).

    Each part is an :class:`Axis` (every unit of a permutation, each ``repeat`` times in a
    row) or an ``int`` (that many entries that no permutation moves). A permutation may stand
    in several parts: an LSTM's ``weight_ih`` rows are ``Concat((Axis("P"),) * 4)``, its four
    gates over the same hidden units.
    """

    parts: tuple[Axis | int, ...]


#: What a spec says of one tensor axis: one permutation, several side by side, or none.
AxisEntry = Axis | Concat | None


@dataclass(frozen=True)
class Slot:
    """One place a permutation indexes: ``size * repeat`` entries of ``tensor``'s axis ``dim``
    starting at ``offset``."""

    tensor: str
    dim: int
    offset: int
    repeat: int


@dataclass(frozen=True)
class Site:
    """Where the activations of a permutation's units are read (activation matching).

    Attributes
    ----------
    module : str
        Name (as in ``model.named_modules()``) of the module whose *output* holds the units.
    axis : int
        Unit axis of that output: 1 for ``(N, C, ...)`` conv/linear outputs, -1 for token
        sequences ``(N, T, D)``. All other axes are samples (each spatial position or token is
        one sample).
    relu : bool
        Apply ReLU to the output first (when the model applies it functionally in ``forward``,
        so that no module outputs the post-activation values).
    """

    module: str
    axis: int = 1
    relu: bool = False


@dataclass(frozen=True)
class PermGroup:
    """One permutation: its size, its group structure and where its activations are read.

    Attributes
    ----------
    size : int
        Number of units.
    num_groups : int
        1 for free units; ``g > 1`` when units form ``g`` blocks that move as wholes (heads,
        GroupNorm groups). Must divide ``size``.
    tied_to : str or None
        Name of another grouped permutation whose block order this one shares.
    sites : tuple of Site
        Activation sites; activations from several sites (e.g. every block output of a
        residual stream) are stacked as more samples of the same units.
    """

    size: int
    num_groups: int = 1
    tied_to: str | None = None
    sites: tuple[Site, ...] = ()

    @property
    def group_size(self) -> int:
        """Units per block."""
        return self.size // self.num_groups


@dataclass(frozen=True)
class PermutationSpec:
    """The permutation structure of one architecture.

    Attributes
    ----------
    perms : dict of str to PermGroup
        Every permutation by name.
    axes : dict of str to tuple of (Axis or None)
        For every entry of the model's state dict (parameters *and* buffers), one entry per
        tensor dimension: the :class:`Axis` that indexes it, or ``None``. Scalars map to ``()``.
    """

    perms: dict[str, PermGroup]
    axes: dict[str, tuple[AxisEntry, ...]]
    _slots: dict[str, tuple[Slot, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        slots: dict[str, list[Slot]] = {name: [] for name in self.perms}
        for tensor, axes in self.axes.items():
            for dim, entry in enumerate(axes):
                parts = entry.parts if isinstance(entry, Concat) else (entry,)
                for part in parts:
                    if isinstance(part, Axis) and part.perm not in self.perms:
                        raise ValueError(
                            f"{tensor} axis {dim} names unknown permutation {part.perm}"
                        )
                for axis, offset, _ in entry_parts(self, entry):
                    if axis is not None:
                        slots[axis.perm].append(Slot(tensor, dim, offset, axis.repeat))
        for name, group in self.perms.items():
            if group.size < 1 or group.num_groups < 1 or group.size % group.num_groups:
                raise ValueError(f"permutation {name}: {group.num_groups} groups of {group.size}")
            if group.tied_to is not None:
                other = self.perms.get(group.tied_to)
                if other is None or other.num_groups != group.num_groups:
                    raise ValueError(
                        f"permutation {name} is tied to {group.tied_to}, which must exist and "
                        f"have the same number of groups ({group.num_groups})"
                    )
            if not slots[name]:
                raise ValueError(f"permutation {name} indexes no tensor axis")
        object.__setattr__(self, "_slots", {k: tuple(v) for k, v in slots.items()})

    def touching(self, perm: str) -> tuple[tuple[str, int], ...]:
        """Every ``(tensor, dim)`` indexed by ``perm`` (once each, in spec order)."""
        return tuple(dict.fromkeys((s.tensor, s.dim) for s in self._slots[perm]))

    def slots(self, perm: str) -> tuple[Slot, ...]:
        """Every place ``perm`` indexes, one per part of a :class:`Concat` axis."""
        return self._slots[perm]

    def block_order_root(self, perm: str) -> str:
        """The permutation whose block order ``perm`` follows (itself when not tied)."""
        seen = {perm}
        while (tied := self.perms[perm].tied_to) is not None:
            if tied in seen:
                raise ValueError(f"tied_to forms a cycle through {perm}")
            seen.add(tied)
            perm = tied
        return perm

    def families(self) -> list[tuple[str, ...]]:
        """Permutations grouped by the block order they share (singletons when untied), in
        spec order."""
        families: dict[str, list[str]] = {}
        for name in self.perms:
            families.setdefault(self.block_order_root(name), []).append(name)
        return [tuple(names) for names in families.values()]


def entry_parts(
    spec: PermutationSpec, entry: AxisEntry
) -> list[tuple[Axis | None, int, int | None]]:
    """``(axis or None, offset, length)`` of every part of one axis entry, in order.

    A plain :class:`Axis` is one part at offset 0; ``None`` is one part of unknown length
    (``None``) that no permutation moves; an ``int`` part of a :class:`Concat` is ``None``
    with that length.
    """
    if entry is None:
        return [(None, 0, None)]
    parts = entry.parts if isinstance(entry, Concat) else (entry,)
    out: list[tuple[Axis | None, int, int | None]] = []
    offset = 0
    for part in parts:
        if isinstance(part, Axis):
            length = spec.perms[part.perm].size * part.repeat if part.perm in spec.perms else 0
            out.append((part, offset, length))
        else:
            length = part
            out.append((None, offset, length))
        offset += length
    return out


def entry_index(
    spec: PermutationSpec,
    entry: AxisEntry,
    perms: Mapping[str, Tensor],
    device: torch.device | None = None,
) -> Tensor | None:
    """The gather index that applies ``perms`` along one axis, or None when none moves it."""
    parts = entry_parts(spec, entry)
    if all(axis is None or axis.perm not in perms for axis, _, _ in parts):
        return None
    pieces = []
    for axis, offset, length in parts:
        assert length is not None  # a part of unknown length has no permutation (above)
        if axis is not None and axis.perm in perms:
            pieces.append(axis_index(perms[axis.perm].to(device), axis.repeat) + offset)
        else:
            pieces.append(torch.arange(offset, offset + length, device=device))
    return torch.cat(pieces)


def spec_from_axes(
    axes: Mapping[str, Iterable[str | AxisEntry]], perms: Mapping[str, PermGroup]
) -> PermutationSpec:
    """Build a spec, accepting a bare permutation name for ``Axis(name)``."""
    norm = {
        tensor: tuple(Axis(a) if isinstance(a, str) else a for a in dims)
        for tensor, dims in axes.items()
    }
    return PermutationSpec(perms=dict(perms), axes=norm)


def check_spec(spec: PermutationSpec, state: State) -> None:
    """Check that ``spec`` describes ``state`` exactly.

    Raises
    ------
    ValueError
        Naming the tensor: a state entry missing from the spec or the reverse, a wrong number
        of axes, or an axis whose length is not ``size * repeat`` of its permutation.
    """
    missing = sorted(set(state) - set(spec.axes))
    extra = sorted(set(spec.axes) - set(state))
    if missing or extra:
        raise ValueError(f"spec and state differ: not in spec {missing}, not in state {extra}")
    for tensor, axes in spec.axes.items():
        shape = tuple(state[tensor].shape)
        if len(axes) != len(shape):
            raise ValueError(f"{tensor}: spec has {len(axes)} axes, tensor has shape {shape}")
        for dim, entry in enumerate(axes):
            if isinstance(entry, Axis) and shape[dim] != spec.perms[entry.perm].size * entry.repeat:
                raise ValueError(
                    f"{tensor} axis {dim} has {shape[dim]} entries; permutation {entry.perm} "
                    f"has {spec.perms[entry.perm].size} units x repeat {entry.repeat}"
                )
            if isinstance(entry, Concat):
                parts = entry_parts(spec, entry)
                total = sum(length or 0 for _, _, length in parts)
                if total != shape[dim]:
                    raise ValueError(
                        f"{tensor} axis {dim} has {shape[dim]} entries; its concatenated parts "
                        f"{entry.parts} have {total}"
                    )


def axis_index(perm: Tensor, repeat: int) -> Tensor:
    """The index along an axis holding every unit ``repeat`` times in a row."""
    if repeat == 1:
        return perm
    offsets = torch.arange(repeat, device=perm.device)
    return (perm[:, None] * repeat + offsets).reshape(-1)


def apply_permutations(spec: PermutationSpec, perms: Mapping[str, Tensor], state: State) -> dict:
    """Return a permuted copy of ``state`` (``state`` itself is never modified).

    Parameters
    ----------
    spec : PermutationSpec
        The architecture's spec.
    perms : dict of str to Tensor
        A permutation for every name in ``spec.perms`` (missing names mean identity).
    state : mapping of str to Tensor
        A state dict described by ``spec``.

    Returns
    -------
    dict of str to Tensor
        New tensors (on the devices of the inputs); tensors no permutation touches are cloned.
    """
    out = {}
    for tensor, value in state.items():
        for dim, entry in enumerate(spec.axes[tensor]):
            index = entry_index(spec, entry, perms, value.device)
            if index is not None:
                value = value.index_select(dim, index)
        out[tensor] = value.clone() if value is state[tensor] else value
    return out


def identity_permutations(
    spec: PermutationSpec, device: torch.device | None = None
) -> Permutations:
    """The identity for every permutation of ``spec``."""
    return {name: torch.arange(g.size, device=device) for name, g in spec.perms.items()}


def invert(perm: Tensor) -> Tensor:
    """The inverse permutation."""
    return torch.argsort(perm)


def compose(first: Tensor, then: Tensor) -> Tensor:
    """The permutation equal to applying ``first`` and then ``then``."""
    return first[then]


def random_permutations(spec: PermutationSpec, generator: torch.Generator) -> Permutations:
    """A random valid permutation for every name of ``spec`` (blocks and ties respected)."""
    block_orders: dict[str, Tensor] = {}
    out: Permutations = {}
    for name in spec.perms:  # dict order: deterministic for a generator state
        group = spec.perms[name]
        root = spec.block_order_root(name)
        if root not in block_orders:
            block_orders[root] = torch.randperm(group.num_groups, generator=generator)
        blocks = block_orders[root]
        size = group.group_size
        parts = [
            blocks[b] * size + torch.randperm(size, generator=generator) for b in range(len(blocks))
        ]
        out[name] = torch.cat(parts)
    return out


def is_valid_permutation(spec: PermutationSpec, name: str, perm: Tensor) -> bool:
    """True when ``perm`` is a permutation of ``name``'s units that respects its blocks."""
    group = spec.perms[name]
    if perm.shape != (group.size,) or perm.dtype != torch.long:
        return False
    if not torch.equal(torch.sort(perm).values, torch.arange(group.size, device=perm.device)):
        return False
    blocks = perm.view(group.num_groups, group.group_size) // group.group_size
    return bool((blocks == blocks[:, :1]).all())


# ---------------------------------------------------------------------------------------------
# Helpers for declaring specs and checking matcher output
# ---------------------------------------------------------------------------------------------

# Layers whose state entries layer_axes knows: a weight whose first two axes are (out, in) and
# normalisations whose every 1-D entry (affine, running statistics) follows the channels.
_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def layer_axes(
    name: str, module: nn.Module, out: str | Axis | None, inp: str | Axis | None = None
) -> dict[str, tuple[AxisEntry, ...]]:
    """The spec axes of every state entry of one layer (a shortcut for declaring specs).

    Parameters
    ----------
    name : str
        The layer's name in the model (prefix of its state-dict keys).
    module : torch.nn.Module
        ``Linear`` or ``Conv1d/2d/3d`` (``groups=1``): ``weight`` is ``(out, inp, None...)``
        and ``bias`` is ``(out,)``. ``BatchNorm*``, ``GroupNorm`` or ``LayerNorm`` over one
        feature axis: ``weight``, ``bias``, ``running_mean`` and ``running_var`` are
        ``(out,)``; ``num_batches_tracked`` is ``()``. Only entries the module has are listed.
    out : str or Axis or None
        Permutation of the output units (channels of a norm); a name means ``Axis(name)``.
    inp : str or Axis or None
        Permutation of the input units of a ``Linear``/``Conv``; must be ``None`` for norms.

    Returns
    -------
    dict of str to tuple of (Axis or None)
        ``{f"{name}.{entry}": axes}`` for the module's own state entries.

    Raises
    ------
    TypeError
        For any other module type, or a grouped convolution.
    """
    out_axis = Axis(out) if isinstance(out, str) else out
    in_axis = Axis(inp) if isinstance(inp, str) else inp
    if isinstance(module, _PRODUCERS):
        if getattr(module, "groups", 1) != 1:
            raise TypeError(f"{name}: grouped convolutions are not supported")
    elif isinstance(module, _CHANNEL_NORMS):
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
            raise TypeError(f"{name}: LayerNorm over more than one axis is not supported")
        if in_axis is not None:
            raise TypeError(f"{name}: a normalisation layer has no input permutation")
    else:
        raise TypeError(f"{name}: no permutation axes known for {type(module).__name__}")
    axes: dict[str, tuple[AxisEntry, ...]] = {}
    for entry, value in module.state_dict(keep_vars=True).items():
        if value.ndim == 0:
            axes[f"{name}.{entry}"] = ()
        elif entry == "weight" and isinstance(module, _PRODUCERS):
            axes[f"{name}.{entry}"] = (out_axis, in_axis) + (None,) * (value.ndim - 2)
        else:
            axes[f"{name}.{entry}"] = (out_axis,)
    return axes


def block_order(spec: PermutationSpec, name: str, perm: Tensor) -> Tensor:
    """The block order of a grouped permutation: ``b[j]`` = old block moved to block ``j``."""
    size = spec.perms[name].group_size
    return perm.view(spec.perms[name].num_groups, size)[:, 0] // size


def check_permutations(
    spec: PermutationSpec, perms: Mapping[str, Tensor], *, complete: bool = True
) -> None:
    """Check matcher output: valid permutations that respect blocks and ties.

    Parameters
    ----------
    spec : PermutationSpec
        The architecture's spec.
    perms : dict of str to Tensor
        Permutations by name.
    complete : bool, default True
        Require a permutation for every name of ``spec`` (otherwise missing names are
        identities, as in :func:`apply_permutations`, and are not checked).

    Raises
    ------
    ValueError
        Naming the permutation: unknown or missing name, not a ``torch.long`` permutation of
        the right size, units moved across blocks, or a block order that differs from that of
        the permutation it is tied to.
    """
    unknown = sorted(set(perms) - set(spec.perms))
    if unknown:
        raise ValueError(f"permutations not in the spec: {unknown}")
    missing = sorted(set(spec.perms) - set(perms))
    if complete and missing:
        raise ValueError(f"permutations missing: {missing}")
    for name, perm in perms.items():
        group = spec.perms[name]
        if not is_valid_permutation(spec, name, perm):
            raise ValueError(
                f"permutation {name} is not a valid permutation of {group.size} units in "
                f"{group.num_groups} blocks (got {perm.dtype} of shape {tuple(perm.shape)}, or "
                "units moved across blocks)"
            )
        root = spec.block_order_root(name)
        if root != name and root in perms:
            if not torch.equal(block_order(spec, name, perm), block_order(spec, root, perms[root])):
                raise ValueError(
                    f"permutation {name} moves its blocks differently from {root}, whose block "
                    "order it is tied to"
                )
