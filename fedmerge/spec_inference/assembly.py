"""From a finished walk to a :class:`~fedmerge.permutations.PermutationSpec`: the activation
sites of every unit space, the permutations (their names, sizes, group structures and ties)
and every state entry's axes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..permutations import Axis, AxisEntry, Concat, PermGroup, PermutationSpec, Site
from .errors import HAND_WRITTEN_HINT, SpecInferenceError
from .walker import _qualname, _Walk

_RELUS = ({F.relu, torch.relu}, {"relu", "relu_"}, nn.ReLU)


def assemble(walk: _Walk) -> PermutationSpec:
    """The spec of the spaces ``walk`` collected (after :meth:`_Walk.run`)."""
    return _Assembly(walk).spec()


class _Assembly:
    """Reads a finished walk's spaces, slots, labels and sites; builds the spec."""

    def __init__(self, walk: _Walk) -> None:
        self.walk = walk

    def module_outputs(self) -> dict[fx.Node, str]:
        """Last node of every non-leaf module called once (its output), innermost module."""
        nodes = list(self.walk.gm.graph.nodes)
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
        sites = self.resolve_sites(self.walk.sites)
        paths = self.module_outputs()
        fallback = [
            found for node in paths for found in self.walk.unit_axes(node, self.walk.values[node])
        ]
        for root, found in self.resolve_sites(fallback, paths).items():
            sites.setdefault(root, found)
        return sites

    def resolve_sites(
        self, candidates: list[tuple[fx.Node, int, int]], paths: dict[fx.Node, str] | None = None
    ) -> dict[int, list[Site]]:
        """Sites by root space (named by module ``paths`` when given, else the node target)."""
        by_node: dict[fx.Node, set[int]] = {}
        resolved = []
        inner = self.walk.inner_sites if paths is None else {}
        for index, (node, axis, space) in enumerate(candidates):
            root, factor = self.walk.spaces.find(space)
            if factor == 1:
                resolved.append((index, node, axis, root))
                if index not in inner:
                    by_node.setdefault(node, set()).add(root)
        out: dict[int, list[Site]] = {}
        for index, node, axis, root in resolved:
            if index in inner:
                name, axis, relu = inner[index]
                out.setdefault(root, []).append(Site(name, axis, relu))
                continue
            users = list(node.users)
            if len(users) == 1 and root in by_node.get(users[0], ()):
                continue
            relu = len(users) == 1 and _is_relu(self.walk.gm, users[0])
            name = paths[node] if paths else str(node.target)
            out.setdefault(root, []).append(Site(name, axis, relu))
        return out

    def spec(self) -> PermutationSpec:
        sp = self.walk.spaces
        roots = sorted({leaf for s in self.walk.slots.values() for leaf in sp.leaves(s)})
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
                    f"cannot infer the permutation spec of {type(self.walk.model).__name__}: "
                    f"{names[root]} and {tied} share a head order but have "
                    f"{groups[root]} and {groups[members[0]]} groups. {HAND_WRITTEN_HINT}"
                )
            perms[names[root]] = PermGroup(
                sp.size[root], groups[root], tied, tuple(sites.get(root, ()))
            )
        axes: dict[str, tuple[AxisEntry, ...]] = {}
        for name, tensor in self.walk.state.items():
            dims: list[AxisEntry] = []
            for dim in range(tensor.ndim):
                space = self.walk.slots.get((self.walk.canonical[name], dim))
                dims.append(None if space is None else self.entry(space, names))
            axes[name] = tuple(dims)
        return PermutationSpec(perms, axes)

    def entry(self, space: int, names: dict[int, str]) -> AxisEntry:
        """The spec entry of an axis of ``space``: one permutation, a concatenation, or None."""
        parts: list[Axis | int] = []
        for root, repeat, length in self.walk.spaces.layout(space):
            if root in names:
                parts.append(Axis(names[root], repeat))
            elif parts and isinstance(parts[-1], int):
                parts[-1] += length  # runs that no permutation moves merge
            else:
                parts.append(length)
        if all(isinstance(p, int) for p in parts):
            return None
        if len(parts) == 1 and isinstance(parts[0], Axis):
            return parts[0]
        return Concat(tuple(parts))

    def num_groups(self, free: list[int]) -> dict[int, int]:
        """Block count of every free root space (1 unless GroupNorm or heads)."""
        found: dict[int, dict[int, fx.Node]] = {r: {} for r in free}
        for space, count, node in self.walk.spaces.groups:
            root = self.walk.spaces.find(space)[0]
            if count > 1 and self.walk.spaces.composite(root):
                raise self.walk.error(
                    node, "a space split into heads is also concatenated or split"
                )
            if root not in found or count == 1:
                continue
            if self.walk.spaces.size[root] % count:
                raise self.walk.error(node, f"{count} groups do not divide the units of a space")
            found[root].setdefault(count, node)
        for counts in found.values():
            if len(counts) > 1:
                nodes = ", ".join(f"{n.name!r} ({c} groups)" for c, n in counts.items())
                raise self.walk.error(
                    next(iter(counts.values())),
                    f"one permutation would need several group structures: {nodes}",
                )
        return {r: next(iter(c), 1) for r, c in found.items()}

    def names(self, free: list[int]) -> dict[int, str]:
        """``P_<first producing layer>`` for every free root space, unique.

        A piece cut from a space (by a concatenation or split boundary) without a label of
        its own is named after the space it was cut from.
        """
        sp = self.walk.spaces
        by_root: dict[int, list[int]] = {}
        for space in range(len(sp.parent)):
            by_root.setdefault(sp.find(space)[0], []).append(space)
        names: dict[int, str] = {}
        taken: set[str] = set()
        for root in free:
            base = f"P_{self.label(root, by_root)}"
            name, k = base, 2
            while name in taken:
                name, k = f"{base}_{k}", k + 1
            taken.add(name)
            names[root] = name
        return names

    def label(self, root: int, by_root: dict[int, list[int]]) -> str:
        """The layer a root space is named after: its first producer; for a piece cut from
        a space, that space's producer; else the first layer that reads it."""
        readers: list[int] = []
        seen: set[int] = set()
        queue = [root]
        while queue:
            current = queue.pop(0)
            if current in seen:
                continue
            seen.add(current)
            members = by_root.get(current, [])
            labelled = [s for s in members if s in self.walk.labels]
            producers = [s for s in labelled if self.walk.labels[s][1]]
            if producers:
                return self.walk.labels[producers[0]][0]
            readers = readers or labelled
            origin = self.walk.spaces.origin
            queue.extend(self.walk.spaces.find(origin[s])[0] for s in members if s in origin)
        return self.walk.labels[readers[0]][0] if readers else "units"


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    functions, methods, module_type = _RELUS
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return node.op == "call_module" and isinstance(gm.get_submodule(_qualname(node)), module_type)
