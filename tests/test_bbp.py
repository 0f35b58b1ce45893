"""BBP-MAP matching of one layer across clients (fedmerge.matching.bbp), on planted layers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from fedmerge.matching.bbp import bbp_map


def _planted(
    clients: int = 3, units: int = 8, dim: int = 16, specific: int = 2, noise: float = 0.05
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """A global layer, and per client: a permuted noisy copy of it plus ``specific`` units of
    its own (rows ``units ..`` before permuting), and the permutation applied."""
    rng = np.random.default_rng(0)
    layer = rng.normal(size=(units, dim))
    rows, perms = [], []
    for _ in range(clients):
        own = rng.normal(size=(specific, dim))
        copy = np.vstack((layer + rng.normal(scale=noise, size=layer.shape), own))
        perm = rng.permutation(units + specific)
        rows.append(copy[perm])
        perms.append(perm)
    return layer, rows, perms


def _global_ids(result, perms: list[np.ndarray], units: int) -> np.ndarray:
    """``ids[j, u]``: the global unit that client ``j``'s copy of planted unit ``u`` joined."""
    return np.array([result.assignments[j][np.argsort(p)[:units]] for j, p in enumerate(perms)])


@pytest.mark.parametrize("clients", [2, 3, 5])
def test_planted_permutations_are_recovered_and_the_layer_grows_by_the_specific_units(
    clients: int,
) -> None:
    """With the reference's hyperparameters (sigma = sigma0 = 1, gamma = 7)."""
    layer, rows, perms = _planted(clients)
    result = bbp_map(rows, sigma=1.0, sigma0=1.0, gamma=7.0)
    ids = _global_ids(result, perms, len(layer))
    assert (ids == ids[0]).all(), "the copies of one planted unit joined different global units"
    assert len(set(ids[0].tolist())) == len(layer)
    assert result.width == len(layer) + 2 * clients
    assert sorted(result.counts.tolist()) == [1] * (2 * clients) + [clients] * len(layer)
    # each global unit of a planted unit is the mean of its noisy copies, shrunk by the prior
    expected = layer * clients / (clients + 1)  # sum of copies / (sigma0^-1 + J sigma^-1)
    assert np.abs(result.global_units[ids[0]] - expected).max() < 0.1


def test_every_client_unit_goes_to_a_distinct_global_unit() -> None:
    _, rows, _ = _planted(4, specific=3)
    result = bbp_map(rows, iterations=3, seed=2)
    for j, assignment in enumerate(result.assignments):
        assert len(assignment) == len(rows[j]) == len(set(assignment.tolist()))
        assert assignment.max() < result.width
    counts = np.bincount(np.concatenate(result.assignments), minlength=result.width)
    assert counts.tolist() == result.counts.tolist()


def test_fixed_width_is_hungarian_matching() -> None:
    """Without new atoms, two clients of equal width are matched as the Hungarian algorithm
    matches them on the inner products of their rows (PFNM's cost with equal variances
    differs from it by per-row and per-column constants only)."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 6)), rng.normal(size=(10, 6))  # unrelated: a hard case
    result = bbp_map([a, b], grow=False)
    assert result.width == 10
    _, hungarian = linear_sum_assignment(b @ a.T, maximize=True)
    assert (result.assignments[1] == result.assignments[0][hungarian]).all()
    grown = bbp_map([a, b])  # unrelated units: growing opens new global units instead
    assert grown.width > 10


def test_growth_is_capped() -> None:
    _, rows, _ = _planted(3, specific=2)
    assert bbp_map(rows, max_width=11).width == 11
    with pytest.raises(ValueError, match="max_width 5 is below the widest client's 10"):
        bbp_map(rows, max_width=5)


def test_more_gamma_opens_more_global_units() -> None:
    rng = np.random.default_rng(3)
    rows = [rng.normal(size=(6, 4)) for _ in range(3)]  # nothing shared
    widths = [bbp_map(rows, gamma=g).width for g in (0.01, 7.0, 1e6)]
    assert widths[0] <= widths[1] <= widths[2] == 18
    assert widths[0] < widths[2]


def test_deterministic_for_a_seed_and_refusals_name_the_problem() -> None:
    _, rows, _ = _planted(3)
    one, two = bbp_map(rows, seed=4), bbp_map(rows, seed=4)
    assert all((x == y).all() for x, y in zip(one.assignments, two.assignments, strict=True))
    with pytest.raises(ValueError, match="at least one"):
        bbp_map([])
    with pytest.raises(ValueError, match="one D"):
        bbp_map([rows[0], rows[1][:, :3]])
    with pytest.raises(ValueError, match="equal width"):
        bbp_map([rows[0], rows[1][:4]], grow=False)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        bbp_map(rows, sigma=0.0)


def test_the_cost_is_pfnms_formula() -> None:
    # The cost as PFNM writes it, one (unit, atom) pair at a time, against the vectorised one.
    from fedmerge.matching.bbp import _Atoms

    rng = np.random.default_rng(0)
    d, clients, gamma = 7, 3, 7.0
    prec, prior_prec = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    mean = rng.normal(size=d)
    atoms = _Atoms(mean, prior_prec, clients)
    atoms.add(rng.normal(size=(5, d)) * prec, prec, np.arange(5))
    atoms.add(rng.normal(size=(4, d)) * prec, prec, np.array([0, 2, 5, 6]))
    rows = rng.normal(size=(4, d)) * prec
    got = atoms.cost(rows, prec, gamma, new=4)
    m = mean * prior_prec
    for unit in range(4):
        w = rows[unit]
        for i in range(len(atoms.c)):
            g, s = atoms.g[i], atoms.s[i]
            c = min(atoms.c[i], 10)
            want = ((w + g) ** 2 / (prec + s)).sum() - (g**2 / s).sum()
            want += np.log(c / (clients - c))
            assert got[unit, i] == pytest.approx(want, rel=1e-10, abs=1e-10)
        for k in range(4):
            want = ((w + m) ** 2 / (prior_prec + prec)).sum() - (m**2 / prior_prec).sum()
            want += -2 * np.log(k + 1) + 2 * np.log(gamma / clients)
            assert got[unit, len(atoms.c) + k] == pytest.approx(want, rel=1e-10, abs=1e-10)
