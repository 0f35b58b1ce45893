"""Weight matching (Git Re-Basin, Ainsworth et al., ICLR 2023, arXiv 2209.04836): data-free."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from ..options import DEFAULT_MATCH_MAX_SWEEPS
from ..permutations import (
    Permutations,
    PermutationSpec,
    State,
    check_spec,
    entry_index,
    identity_permutations,
    is_valid_permutation,
)
from .assignment import _families, _Memo, _sweep
from .correlation import _PearsonSums

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Weight space
# ---------------------------------------------------------------------------------------------


def _unit_rows(value: Tensor, dim: int, size: int) -> Tensor:
    """``value`` with axis ``dim`` first, as ``(size, -1)``: repeated units join the rest."""
    return value.movedim(dim, 0).reshape(size, -1)


def _permuted_except(
    spec: PermutationSpec, perms: Permutations, tensor: str, value: Tensor, skip: int
) -> Tensor:
    """``value`` with every permutation of ``perms`` applied except along axis ``skip``."""
    for dim, entry in enumerate(spec.axes[tensor]):
        index = None if dim == skip else entry_index(spec, entry, perms, value.device)
        if index is not None:
            value = value.index_select(dim, index)
    return value


#: State entries that are permuted but never scored: BatchNorm's running statistics. They
#: describe the data a model saw, not what it computes; Git Re-Basin's and MuDSC's reference
#: code leave them out of the similarity too (scoring them changed 84-100% of the
#: assignments of a digits ResNet-20 pair).
UNSCORED_ENTRIES = ("running_mean", "running_var")


def scored(tensor: str) -> bool:
    """Whether a state entry counts in weight-space similarities (see UNSCORED_ENTRIES)."""
    return tensor.rsplit(".", 1)[-1] not in UNSCORED_ENTRIES


class _Weights:
    """float64 copies of the scored permuted tensors of two states, and unit similarities."""

    def __init__(self, spec: PermutationSpec, reference: State, other: State) -> None:
        check_spec(spec, reference)
        check_spec(spec, other)
        touched = {
            tensor for name in spec.perms for tensor, _ in spec.touching(name) if scored(tensor)
        }
        self.spec = spec
        self.ref = {t: reference[t].detach().to(torch.float64) for t in touched}
        self.other = {t: other[t].detach().to(self.ref[t].device, torch.float64) for t in touched}

    def _pairs(self, name: str, perms: Permutations) -> Iterator[tuple[Tensor, Tensor]]:
        """Unit rows ``(ref, other with the other axes permuted)`` of each place of ``name``
        (one per part of a concatenated axis)."""
        size = self.spec.perms[name].size
        for slot in self.spec.slots(name):
            if slot.tensor not in self.ref:  # not scored
                continue
            tensor, dim, length = slot.tensor, slot.dim, size * slot.repeat
            other = _permuted_except(self.spec, perms, tensor, self.other[tensor], dim)
            ref = self.ref[tensor].narrow(dim, slot.offset, length)
            other = other.narrow(dim, slot.offset, length)
            yield _unit_rows(ref, dim, size), _unit_rows(other, dim, size)

    def inner(self, name: str, perms: Permutations) -> Tensor:
        """Git Re-Basin cost: ``C[i, j] = <ref unit i, other unit j>`` over every tensor."""
        costs = [a @ b.T for a, b in self._pairs(name, perms)]
        if not costs:  # every tensor of the space left out of the score
            size = self.spec.perms[name].size
            return torch.zeros(size, size, dtype=torch.float64)
        return torch.stack(costs).sum(0)

    def correlation(self, name: str, perms: Permutations) -> Tensor:
        """MuDSC ``S_weight``: Pearson correlation of the concatenated unit weight vectors."""
        sums = _PearsonSums()
        for a, b in self._pairs(name, perms):
            sums.update(a, b)  # coordinates of the unit vectors are the samples
        return sums.correlation()

    def objective(self, perms: Permutations) -> float:
        """``sum over permuted tensors <W_ref, P(W_other)>``."""
        total = 0.0
        for tensor, ref in self.ref.items():
            other = _permuted_except(self.spec, perms, tensor, self.other[tensor], skip=-1)
            total += float((ref * other).sum())
        return total


def _initial(spec: PermutationSpec, init: Mapping[str, Tensor] | None) -> Permutations:
    """Starting permutations: ``init`` where given (checked), identity elsewhere."""
    perms = identity_permutations(spec)
    for name, perm in (init or {}).items():
        if name not in spec.perms or not is_valid_permutation(spec, name, perm.cpu()):
            raise ValueError(f"init: {name} is not a valid permutation of the spec")
        perms[name] = perm.detach().cpu().clone()
    return perms


def _check_sweeps(max_sweeps: int) -> None:
    if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int) or max_sweeps < 0:
        raise ValueError(f"max_sweeps must be an integer >= 0, got {max_sweeps!r}")


def weight_objective(
    spec: PermutationSpec, reference: State, other: State, perms: Mapping[str, Tensor]
) -> float:
    """Git Re-Basin's weight-matching objective ``sum over tensors <W_ref, P(W_other)>``.

    Only tensors that some permutation touches are summed (the rest add a constant).
    """
    return _Weights(spec, reference, other).objective(_initial(spec, perms))


def weight_matching(
    spec: PermutationSpec,
    reference: State,
    other: State,
    *,
    max_sweeps: int = DEFAULT_MATCH_MAX_SWEEPS,
    seed: int = 0,
    init: Permutations | None = None,
) -> Permutations:
    """Git Re-Basin weight matching: permutations that align ``other`` to ``reference``.

    Coordinate descent on :func:`weight_objective`: each sweep visits the permutation families
    in a random order (from ``seed``) and replaces each by the best assignment for its cost
    matrix, the other permutations held fixed. Stops after the first sweep that changes
    nothing, or after ``max_sweeps``.

    Parameters
    ----------
    spec : PermutationSpec
        The architecture's spec; both states must match it (:func:`check_spec`).
    reference, other : mapping of str to Tensor
        State dicts; neither is modified.
    max_sweeps : int, default 100
        Upper bound on sweeps (0 returns the initial permutations).
    seed : int, default 0
        Seed of the visiting order.
    init : dict of str to Tensor, optional
        Starting permutations (identity for missing names), e.g. the previous round's.

    Returns
    -------
    dict of str to Tensor
        A ``torch.long`` CPU permutation for every name of ``spec.perms``; apply them to
        ``other``.
    """
    _check_sweeps(max_sweeps)
    weights = _Weights(spec, reference, other)
    perms = _initial(spec, init)
    families = _families(spec)
    rng, score = np.random.default_rng(seed), _Memo(spec, weights.inner)
    for sweep in range(max_sweeps):
        if not _sweep(spec, perms, families, score, rng, hubs_first=sweep == 0):
            logger.debug("weight matching converged after %d sweeps", sweep + 1)
            break
    return perms
