"""Dual-space matching (MuDSC, Xu et al., CVPR 2024, arXiv 2403.01753)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from torch import Tensor, nn

from ..errors import ConfigError
from ..options import DEFAULT_MATCH_BETA, DEFAULT_MATCH_MAX_SWEEPS, DEFAULT_MATCH_SITES
from ..permutations import (
    Permutations,
    PermutationSpec,
    State,
    identity_permutations,
)
from .activations import _activation_correlations, _check_sites, _solve_independently
from .assignment import _TOL, _families, _Memo, _sweep, _value
from .weights import _check_sweeps, _Weights

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Dual space (MuDSC)
# ---------------------------------------------------------------------------------------------


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0.0 <= beta <= 1.0:
        raise ConfigError("match-beta", beta, "a number in [0, 1]")
    return float(beta)


def _dual(
    spec: PermutationSpec,
    reference: State,
    other: State,
    s_act: Mapping[str, Tensor] | None,
    *,
    beta: float,
    max_sweeps: int,
    patience: int,
    seed: int,
) -> Permutations:
    """MuDSC coordinate descent on states; ``s_act`` is None only when ``beta == 1``."""
    weights = _Weights(spec, reference, other)
    perms = identity_permutations(spec) if s_act is None else _solve_independently(spec, s_act)

    def similarity(name: str, current: Permutations) -> Tensor:
        s = beta * weights.correlation(name, current)
        if s_act is not None:
            s = s + (1.0 - beta) * s_act[name].to(s.device)
        return s

    score = _Memo(spec, similarity)

    def total(current: Permutations) -> float:
        return sum(_value(score(n, current), current[n]) for n in spec.perms)

    families, rng = _families(spec), np.random.default_rng(seed)
    best, best_perms, stale = total(perms), dict(perms), 0
    for sweep in range(max_sweeps):
        if not _sweep(spec, perms, families, score, rng, hubs_first=sweep == 0):
            break  # every family is optimal given the others: a fixed point
        value = total(perms)
        logger.debug("dual matching sweep %d: objective %.6g", sweep + 1, value)
        if value > best + _TOL * max(1.0, abs(best)):
            best, best_perms, stale = value, dict(perms), 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best_perms


def dual_matching(
    spec: PermutationSpec,
    reference: nn.Module,
    other: nn.Module,
    inputs: Tensor | None,
    *,
    beta: float = DEFAULT_MATCH_BETA,
    max_sweeps: int = DEFAULT_MATCH_MAX_SWEEPS,
    patience: int = 5,
    seed: int = 0,
    batch_size: int = 256,
    sites: str = DEFAULT_MATCH_SITES,
) -> Permutations:
    """MuDSC dual-space matching: align ``other``'s units to ``reference``'s.

    Similarity of reference unit i and other unit j is
    ``beta * S_weight[i, j] + (1 - beta) * S_act[i, j]``: ``S_act`` is the activation
    correlation of :func:`activation_matching` (computed once, at the ``sites`` it reads),
    ``S_weight`` the Pearson correlation of the units' weight vectors (each unit's slice of
    every tensor that touches its permutation, the other permutations' current values applied
    to ``other``; recomputed at every step). Coordinate descent over permutation families in
    random order, started from the activation-only solution; the best permutations by total
    similarity are returned.

    Parameters
    ----------
    spec : PermutationSpec
        The architecture's spec.
    reference, other : torch.nn.Module
        Two models of the spec's architecture (not modified).
    inputs : Tensor or None
        ``(N, *input_shape)``; may be None when ``beta == 1`` (data-free).
    beta : float, default 0.5
        Weight-space share in [0, 1]; 0 is exactly :func:`activation_matching`.
    max_sweeps : int, default 100
        Upper bound on sweeps.
    patience : int, default 5
        Stop after this many sweeps without improving the total similarity.
    seed : int, default 0
        Seed of the visiting order.
    batch_size : int, default 256
        Inputs per forward pass.
    sites : {"all", "last"}, default "all"
        ``match-sites``: the activation sites ``S_act`` reads, every site of a permutation or
        only its last (:func:`~fedmerge.matching.activations.selected_sites`); not read when
        ``beta == 1``.

    Returns
    -------
    dict of str to Tensor
        A ``torch.long`` CPU permutation for every name of ``spec.perms``.

    Raises
    ------
    ConfigError
        (key ``match-beta``) when ``beta`` is not in [0, 1]; (key ``match-sites``) for an
        unknown ``sites``.
    ValueError
        When ``inputs`` is None and ``beta < 1``.
    """
    beta = _check_beta(beta)
    _check_sweeps(max_sweeps)
    _check_sites(sites)
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
    if beta < 1.0 and inputs is None:
        raise ValueError("dual matching with beta < 1 needs inputs (activations on data)")
    s_act = None
    if beta < 1.0:
        assert inputs is not None  # checked above
        s_act = _activation_correlations(spec, reference, other, inputs, batch_size, sites)
        if beta == 0.0:
            return _solve_independently(spec, s_act)
    return _dual(
        spec,
        reference.state_dict(),
        other.state_dict(),
        s_act,
        beta=beta,
        max_sweeps=max_sweeps,
        patience=patience,
        seed=seed,
    )
