"""Linear assignment for permutation specs: plain, grouped (blocks), tied families, and the
coordinate-descent sweep the weight and dual matchers share."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..permutations import (
    Permutations,
    PermutationSpec,
    entry_parts,
)

# Relative improvement below which an assignment counts as no better (float64 rounding of sums
# of up to ~1e6 products is ~1e-13 relative).
_TOL = 1e-12

ScoreFn = Callable[[str, Permutations], Tensor]


# ---------------------------------------------------------------------------------------------
# Linear assignment, plain and grouped
# ---------------------------------------------------------------------------------------------


def _lap(score: np.ndarray) -> tuple[np.ndarray, float]:
    """Maximising assignment: ``cols[i]`` = unit of ``other`` matched to reference unit i."""
    rows, cols = linear_sum_assignment(score, maximize=True)
    return cols, float(score[rows, cols].sum())


def _block_solutions(score: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Within-block assignments of every (reference block, other block) pair and their totals."""
    size = score.shape[0] // groups
    blocks = score.reshape(groups, size, groups, size).transpose(0, 2, 1, 3)
    orders = np.empty((groups, groups, size), dtype=np.int64)
    totals = np.empty((groups, groups))
    for a in range(groups):  # loops over blocks (heads, norm groups), never over units
        for b in range(groups):
            orders[a, b], totals[a, b] = _lap(blocks[a, b])
    return orders, totals


def _solve_family(spec: PermutationSpec, scores: Mapping[str, np.ndarray]) -> Permutations:
    """Best permutations of a family (sharing one block order) for similarity ``scores``."""
    groups = spec.perms[next(iter(scores))].num_groups
    if groups == 1:
        return {name: torch.from_numpy(_lap(s)[0]) for name, s in scores.items()}
    solutions = {name: _block_solutions(s, groups) for name, s in scores.items()}
    block_cols, _ = _lap(np.sum([totals for _, totals in solutions.values()], axis=0))
    out: Permutations = {}
    for name, (orders, _) in solutions.items():
        size = spec.perms[name].group_size
        within = orders[np.arange(groups), block_cols]  # (groups, size)
        out[name] = torch.from_numpy(block_cols[:, None] * size + within).reshape(-1)
    return out


def _families(spec: PermutationSpec) -> list[tuple[str, ...]]:
    """Permutations grouped by the block order they share (singletons when untied)."""
    return spec.families()


class _Memo:
    """A score function that recomputes a permutation's similarity only when one of the
    permutations it reads (those sharing a tensor with it) has moved; returns NumPy arrays."""

    def __init__(self, spec: PermutationSpec, score_fn: ScoreFn) -> None:
        self.score_fn = score_fn
        self.reads: dict[str, tuple[str, ...]] = {}
        for name in spec.perms:
            reads = {
                axis.perm
                for tensor, dim in spec.touching(name)
                for other, entry in enumerate(spec.axes[tensor])
                if other != dim
                for axis, _, _ in entry_parts(spec, entry)
                if axis is not None
            }
            self.reads[name] = tuple(sorted(reads))
        self.memo: dict[str, tuple[list[Tensor], np.ndarray]] = {}

    def __call__(self, name: str, perms: Permutations) -> np.ndarray:
        key = [perms[read] for read in self.reads[name]]
        hit = self.memo.get(name)
        # Permutations are replaced, never modified in place: holding references is safe.
        if hit is not None and all(
            a is b or torch.equal(a, b) for a, b in zip(hit[0], key, strict=True)
        ):
            return hit[1]
        score = self.score_fn(name, perms).cpu().numpy()
        self.memo[name] = (key, score)
        return score


def _value(score: np.ndarray, perm: Tensor) -> float:
    """Total similarity of an assignment."""
    return float(score[np.arange(len(score)), perm.numpy()].sum())


def _sweep(
    spec: PermutationSpec,
    perms: Permutations,
    families: list[tuple[str, ...]],
    score_fn: _Memo,
    rng: np.random.Generator,
    *,
    hubs_first: bool = False,
) -> bool:
    """One coordinate-descent sweep over the families in random order; True if any moved.

    ``hubs_first`` (the first sweep) visits the families that touch the most tensors first,
    ties in random order: a residual stream fitted after all its neighbours were fitted to its
    wrong value tends to stay wrong.
    """
    order = rng.permutation(len(families)).tolist()
    if hubs_first:
        order.sort(key=lambda f: -sum(len(spec.touching(name)) for name in families[f]))
    changed = False
    for index in order:
        family = families[index]
        scores = {name: score_fn(name, perms) for name in family}
        proposal = _solve_family(spec, scores)
        old = sum(_value(scores[name], perms[name]) for name in family)
        new = sum(_value(scores[name], proposal[name]) for name in family)
        if new > old + _TOL * max(1.0, abs(old)):
            perms.update(proposal)
            changed = True
    return changed
