"""Unit spaces and axis annotations: the union-find the inference joins spaces in.

A *space* is a run of units that one permutation reorders. Spaces are joined when two axes
must be reordered alike; a space may be another one with every unit repeated (after a
flatten), grouped into blocks (heads, GroupNorm groups), *fixed* (no permutation may touch it),
or *composite*: several spaces laid end to end (after ``torch.cat`` along units, or the gate
blocks of a recurrent layer), whose permutation is the direct sum of its parts'.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx


class _Refusal(Exception):
    """Raised inside a node's handler; the caller adds the node to the message."""


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


#: A leaf of a space's layout: ``(root space, repeat, number of entries)``.
_Leaf = tuple[int, int, int]


class _Spaces:
    """Union-find over unit spaces; a space may be another one with every unit repeated, or
    the concatenation of other spaces (composite)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.factor: list[int] = []  # units of a space = units of its parent x factor
        self.size: list[int] = []
        self.fixed: list[bool] = []
        self.tie: list[int] = []  # union-find of block orders (joined spaces and ties)
        self.groups: list[tuple[int, int, fx.Node]] = []  # (space, num_groups, node)
        self.parts: dict[int, list[tuple[int, int]]] = {}  # composite root -> (space, repeat)
        self.origin: dict[int, int] = {}  # a piece cut from a space -> that space

    def new(self, size: int, *, fixed: bool = False) -> int:
        """A fresh space of ``size`` units."""
        index = len(self.parent)
        self.parent.append(index)
        self.factor.append(1)
        self.size.append(size)
        self.fixed.append(fixed)
        self.tie.append(index)
        return index

    def concat(self, parts: list[tuple[int, int]]) -> int:
        """A fresh composite space: ``parts`` (space, repeat) laid end to end."""
        size = sum(length for space, repeat in parts for _, _, length in self.layout(space, repeat))
        index = self.new(size)
        self.parts[index] = list(parts)
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

    def composite(self, space: int) -> bool:
        """Whether the root of ``space`` is a concatenation of other spaces."""
        return self.find(space)[0] in self.parts

    def layout(self, space: int, repeat: int = 1) -> list[_Leaf]:
        """The leaves ``space`` (each unit ``repeat`` times) is laid out as, in order."""
        root, factor = self.find(space)
        repeat *= factor
        if root not in self.parts:
            return [(root, repeat, self.size[root] * repeat)]
        out: list[_Leaf] = []
        for part, k in self.parts[root]:
            out.extend(self.layout(part, k * repeat))
        return out

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
        if root in self.parts:
            raise _Refusal(
                "a concatenation of unit spaces is reshaped into blocks, which interleaves the "
                "parts' units (a channel shuffle, as in ShuffleNet, does this); no permutation "
                "spec can express the result"
            )
        return type(ann)(root)

    def fix(self, ann: _Ann) -> None:
        """Mark the space of ``ann`` as not permutable (every part of a composite one)."""
        if ann is None:
            return
        for root, _, _ in self.layout(ann.space):
            self.fixed[root] = True

    def grouped(self, root: int) -> bool:
        """Whether some node asked for ``root`` to move in blocks."""
        return any(self.find(space)[0] == root for space, count, _ in self.groups if count > 1)

    def cut(self, root: int, sizes: list[int]) -> list[int]:
        """Make leaf ``root`` the concatenation of fresh pieces of ``sizes`` units."""
        if self.grouped(root):
            raise _Refusal(
                "a concatenation or split boundary falls inside a space whose units move in "
                "blocks (heads or GroupNorm groups)"
            )
        pieces = [self.new(n, fixed=self.fixed[root]) for n in sizes]
        for piece in pieces:
            self.origin[piece] = root
        self.parts[root] = [(piece, 1) for piece in pieces]
        return pieces

    def _refine(self, spaces: list[_Full]) -> list[list[_Leaf]]:
        """Cut leaves until the layouts of ``spaces`` share every boundary; the layouts."""
        while True:
            layouts = [self.layout(s.space, s.repeat) for s in spaces]
            cuts: set[int] = set()
            for layout in layouts:
                offset = 0
                for _, _, length in layout:
                    offset += length
                    cuts.add(offset)
            target = self._first_inner_cut(layouts, cuts)
            if target is None:
                return layouts
            root, repeat, inner = target
            if inner % repeat:
                raise _Refusal(
                    "a concatenation boundary falls inside a unit that is repeated (after a "
                    "flatten); the layout cannot be expressed"
                )
            units = inner // repeat
            self.cut(root, [units, self.size[root] - units])

    @staticmethod
    def _first_inner_cut(layouts: list[list[_Leaf]], cuts: set[int]) -> tuple[int, int, int] | None:
        """``(leaf, repeat, entries before the cut)`` of a leaf that a boundary falls inside."""
        for layout in layouts:
            offset = 0
            for root, repeat, length in layout:
                inside = sorted(c - offset for c in cuts if offset < c < offset + length)
                if inside:
                    return root, repeat, inside[0]
                offset += length
        return None

    def join(self, a: _Full, b: _Full) -> _Full:
        """Two normalised full axes of equal length hold the same units in the same order."""
        if a.space == b.space:
            if a.repeat != b.repeat:
                raise _Refusal("one space meets itself with two different repeat factors")
            return a
        if a.space in self.parts or b.space in self.parts:
            self.join_parts(a, b)
            na, nb = self.norm(a), self.norm(b)
            assert isinstance(na, _Full) and isinstance(nb, _Full)
            a, b = na, nb
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

    def join_parts(self, a: _Full, b: _Full) -> None:
        """Join the leaves of two layouts of equal length pairwise, cutting where needed."""
        left, right = self._refine([a, b])
        if sum(n for *_, n in left) != sum(n for *_, n in right):
            raise _Refusal("two concatenated axes of different lengths meet")
        for (ra, ka, _), (rb, kb, _) in zip(left, right, strict=True):
            first, second = self.norm(_Full(ra, ka)), self.norm(_Full(rb, kb))
            assert isinstance(first, _Full) and isinstance(second, _Full)
            self.join(first, second)

    def split(self, x: _Full, lengths: list[int]) -> list[_Full]:
        """Cut the axis ``x`` into consecutive pieces of ``lengths`` entries."""
        pieces = [self.new(n) for n in lengths]
        whole = self.concat([(p, 1) for p in pieces])
        self.join(x, _Full(whole))
        return [_Full(p) for p in pieces]

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

    def leaves(self, space: int) -> set[int]:
        """The leaf roots of ``space``'s layout."""
        return {root for root, _, _ in self.layout(space)}
