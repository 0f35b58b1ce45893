"""BBP-MAP matching of one layer's units across clients (FedMA: Wang et al., "Federated
Learning with Matched Averaging", ICLR 2020, arXiv 2002.06440; the cost is PFNM's, Yurochkin et
al., "Bayesian Nonparametric Federated Learning of Neural Networks", ICML 2019, arXiv
1905.12022).

Every client's units of one layer are rows of a matrix: a unit's incoming weights (with the
previous layer's matching already applied to them) and its bias. The global layer is a set of
Gaussian "atoms"; each client unit is a noisy copy of one atom, and a Beta-Bernoulli process
prior lets a client unit open a *new* atom when no existing one explains it well enough, so the
global layer may grow. The MAP assignment is found client by client with the Hungarian
algorithm on PFNM's cost, then refined by ``iterations`` sweeps that remove one client and
match it again (the reference's ``match_layer``).

What follows the reference code (IBM/FedMA, ``matching/pfnm.py``: ``compute_cost``,
``matching_upd_j``, ``match_layer``), written anew here:

- the cost of matching client unit ``l`` to atom ``i``, with rows scaled by the inverse
  variances (``w = x / sigma``, atoms keep the sum of their members and of their precisions
  ``S``): ``sum_d (w_l + G_i)^2 / (s + S_i) - sum_d G_i^2 / S_i + log(c_i / (J - c_i))``,
  ``c_i`` the atom's popularity (clients matched to it) capped at 10, ``J`` the clients;
- the cost of a new atom: ``sum_d (w_l + m)^2 / (s0 + s) - sum_d m^2 / s0 - 2 log(k) +
  2 log(gamma / J)`` for the ``k``-th new atom of that client (``m = mu0 / sigma0``);
- the first client matched is the widest; sweeps visit the clients in a random order;
- the global unit is the MAP estimate ``G_i / S_i`` (posterior mean of the atom).

Deviations: costs in float64 (the reference computes them in float32); the reference caps the
global layer at 700 units (``max(700 - L, 1)`` new atoms per client), here ``max_width``
(default None: no cap) caps it and the cap never leaves a client unit unassigned (clients are
never wider than the global layer they were sent); ``grow=False`` is a fixed-width mode (no
new atoms: plain Hungarian matching to the current atoms) that the reference does not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["BBPMatch", "bbp_map"]

#: Popularity counts above this do not raise an atom's prior weight further (the reference's).
_POPULARITY_CAP = 10


@dataclass(frozen=True)
class BBPMatch:
    """The result of :func:`bbp_map`.

    Attributes
    ----------
    global_units : ndarray
        ``(L, D)``: the MAP estimate of every global unit (rows as the clients' rows).
    assignments : list of ndarray
        For client ``j``, ``assignments[j][l]`` is the global unit its unit ``l`` is matched
        to (each client's units go to distinct global units).
    counts : ndarray
        ``(L,)``: how many clients have a unit matched to each global unit.
    """

    global_units: np.ndarray
    assignments: list[np.ndarray]
    counts: np.ndarray

    @property
    def width(self) -> int:
        """Number of global units."""
        return int(self.global_units.shape[0])


class _Atoms:
    """The global atoms: sums of scaled member rows ``G``, summed precisions ``S``, counts."""

    def __init__(self, prior_mean: np.ndarray, prior_prec: np.ndarray, clients: int) -> None:
        self.m, self.s0, self.clients = prior_mean * prior_prec, prior_prec, clients
        self.g = np.zeros((0, prior_mean.size))
        self.s = np.zeros((0, prior_mean.size))
        self.c: list[int] = []

    def cost(self, rows: np.ndarray, prec: np.ndarray, gamma: float, new: int) -> np.ndarray:
        """``(L_j, L + new)``: the log-posterior gain of each assignment (PFNM's cost)."""
        inv = 1.0 / (prec + self.s)  # (L, D)
        old = (self.g**2 / self.s).sum(axis=1) if len(self.c) else np.zeros(0)
        # sum_d (w_ld + G_id)^2 / B_id expanded into matrix products: three (L_j, D) x (D, L)
        # products instead of an (L_j, L, D) array (gigabytes for a VGG layer).
        param = (rows**2) @ inv.T + 2.0 * rows @ (self.g * inv).T
        param += ((self.g**2) * inv).sum(axis=1)[None] - old[None]
        counts = np.minimum(np.asarray(self.c, dtype=np.float64), _POPULARITY_CAP)
        if len(self.c):
            param += np.log(counts / np.maximum(self.clients - counts, 1e-12))
        if new == 0:
            return param
        fresh = ((rows + self.m) ** 2 / (self.s0 + prec)).sum(axis=1) - (self.m**2 / self.s0).sum()
        nonparam = fresh[:, None] - 2 * np.log(np.arange(1, new + 1))[None]
        nonparam += 2 * np.log(gamma / self.clients)
        return np.hstack((param, nonparam))

    def add(self, rows: np.ndarray, prec: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Add a client's rows to the atoms chosen (columns past the end are new atoms)."""
        out = np.empty(len(rows), dtype=np.int64)
        existing = len(self.c)
        old = columns < existing  # a client's units go to distinct atoms: no index repeats
        self.g[columns[old]] += rows[old]
        self.s[columns[old]] += prec
        for i in columns[old]:
            self.c[int(i)] += 1
        out[old] = columns[old]
        # New atoms in the order of their columns (the k-th new atom is column existing + k).
        fresh = np.flatnonzero(~old)
        fresh = fresh[np.argsort(columns[fresh], kind="stable")]
        out[fresh] = existing + np.arange(len(fresh))
        self.g = np.vstack((self.g, self.m + rows[fresh]))
        self.s = np.vstack((self.s, np.broadcast_to(self.s0 + prec, (len(fresh), prec.size))))
        self.c.extend([1] * len(fresh))
        return out

    def remove(self, rows: np.ndarray, prec: np.ndarray, assignment: np.ndarray) -> np.ndarray:
        """Take a client's rows out; atoms left empty disappear. Returns the old-to-new index."""
        for unit, i in enumerate(assignment):
            self.g[i] -= rows[unit]
            self.s[i] -= prec
            self.c[i] -= 1
        keep = np.array([c > 0 for c in self.c], dtype=bool)
        index = np.full(len(self.c), -1, dtype=np.int64)
        index[keep] = np.arange(int(keep.sum()))
        self.g, self.s = self.g[keep], self.s[keep]
        self.c = [c for c in self.c if c > 0]
        return index


def _match(atoms: _Atoms, rows: np.ndarray, prec: np.ndarray, gamma: float, new: int) -> np.ndarray:
    cost = atoms.cost(rows, prec, gamma, new)
    if cost.shape[1] < cost.shape[0]:
        raise ValueError(
            f"a client has {cost.shape[0]} units but only {cost.shape[1]} global units and "
            "new atoms are available: raise max_width or let the layer grow"
        )
    row_index, columns = linear_sum_assignment(cost, maximize=True)
    out = np.empty(len(rows), dtype=np.int64)
    out[row_index] = columns
    return atoms.add(rows, prec, out)


def _as_vector(value: float | np.ndarray, size: int, name: str) -> np.ndarray:
    vector = np.broadcast_to(np.asarray(value, dtype=np.float64), (size,)).copy()
    if not np.all(vector > 0) and name != "prior_mean":
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return vector


def bbp_map(
    layers: Sequence[np.ndarray],
    *,
    sigma: float | np.ndarray = 1.0,
    sigma0: float | np.ndarray = 1.0,
    prior_mean: float | np.ndarray = 0.0,
    gamma: float = 7.0,
    iterations: int = 5,
    grow: bool = True,
    max_width: int | None = None,
    seed: int = 0,
) -> BBPMatch:
    """Match one layer's units across clients by BBP-MAP (see the module docstring).

    Parameters
    ----------
    layers : sequence of ndarray
        One ``(L_j, D)`` matrix per client: its units as rows (incoming weights, already
        permuted by the previous layer's matching, and the bias; any row layout, the same for
        every client).
    sigma : float or ndarray of shape (D,), default 1.0
        Variance of a client unit around its atom (per column, or one for all).
    sigma0 : float or ndarray of shape (D,), default 1.0
        Prior variance of an atom around ``prior_mean``.
    prior_mean : float or ndarray of shape (D,), default 0.0
        Prior mean of an atom (the reference: 0 for weights, 0.1 for biases).
    gamma : float, default 7.0
        Beta-Bernoulli process mass: larger opens new atoms more easily (the reference's 7).
    iterations : int, default 5
        Sweeps that remove one client at a time and match it again (the reference's 5).
    grow : bool, default True
        Whether client units may open new atoms; False matches every client to the current
        atoms only (all clients must then have the first client's width).
    max_width : int, optional
        Cap on the number of global units (None: no cap).
    seed : int, default 0
        Seed of the sweeps' visiting orders.

    Returns
    -------
    BBPMatch
        Global units (MAP estimates), each client's assignment, the atoms' popularity.

    Raises
    ------
    ValueError
        No clients, rows of different lengths, non-positive variances, fixed width with
        clients of different widths, or a cap below the first client's width.
    """
    if not layers:
        raise ValueError("bbp_map needs at least one client's layer")
    mats = [np.asarray(layer, dtype=np.float64) for layer in layers]
    dims = {m.shape[1] for m in mats if m.ndim == 2}
    if len(dims) != 1 or any(m.ndim != 2 for m in mats):
        raise ValueError(f"every client's layer must be (units, D) with one D; got {dims}")
    (d,) = dims
    if not grow and len({m.shape[0] for m in mats}) != 1:
        raise ValueError("fixed-width matching (grow=False) needs clients of equal width")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    prec = 1.0 / _as_vector(sigma, d, "sigma")
    prior_prec = 1.0 / _as_vector(sigma0, d, "sigma0")
    mean = _as_vector(prior_mean, d, "prior_mean")
    clients = len(mats)
    rows = [m * prec for m in mats]
    order = sorted(range(clients), key=lambda j: -mats[j].shape[0])
    if max_width is not None and max_width < mats[order[0]].shape[0]:
        widest = mats[order[0]].shape[0]
        raise ValueError(f"max_width {max_width} is below the widest client's {widest} units")
    atoms = _Atoms(mean, prior_prec, clients)
    assignment: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * clients
    first = order[0]
    assignment[first] = atoms.add(rows[first], prec, np.arange(len(rows[first])))

    def new_atoms(j: int) -> int:
        if not grow:
            return 0
        room = len(rows[j]) if max_width is None else max_width - len(atoms.c)
        return max(0, min(len(rows[j]), room))

    for j in order[1:]:
        assignment[j] = _match(atoms, rows[j], prec, gamma, new_atoms(j))
    rng = np.random.default_rng(seed)
    for _ in range(iterations if clients > 1 else 0):
        for j in rng.permutation(clients):
            index = atoms.remove(rows[j], prec, assignment[j])
            for other in range(clients):
                if other != j:
                    assignment[other] = index[assignment[other]]
            assignment[j] = _match(atoms, rows[j], prec, gamma, new_atoms(j))
    return BBPMatch(atoms.g / atoms.s, [a.copy() for a in assignment], np.asarray(atoms.c))
