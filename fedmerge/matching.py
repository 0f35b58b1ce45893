"""Neuron matching: permutations that align a model's hidden units to a reference model's.

Three matchers, all returning :data:`~fedmerge.permutations.Permutations` for a
:class:`~fedmerge.permutations.PermutationSpec` (apply them to ``other`` with
:func:`~fedmerge.permutations.apply_permutations`):

- ``weight``: Git Re-Basin weight matching (Ainsworth, Hayase, Srinivasa, "Git Re-Basin: Merging
  Models modulo Permutation Symmetries", ICLR 2023, arXiv 2209.04836), data-free: coordinate
  descent on ``sum over tensors <W_ref, P(W_other)>``, one linear assignment per permutation.
- ``activation``: Git Re-Basin activation matching: Pearson correlation of the units'
  activations on the same inputs, one linear assignment per permutation, layers independent.
- ``dual``: MuDSC (Xu et al., "Training-Free Pretrained Model Merging", CVPR 2024,
  arXiv 2403.01753): coordinate descent on ``beta * S_weight + (1 - beta) * S_act``, where
  ``S_weight`` is the Pearson correlation of the units' weight vectors.

Grouped permutations (attention heads, GroupNorm groups, ``num_groups > 1``) are solved as in
MuDSC's group matching: a linear assignment inside every pair of blocks, then one over blocks.
Permutations tied to the same block order (``tied_to``) form a *family* that is always solved
and updated together, on the sum of the members' block scores.

Choices and deviations (the specification is ``docs/methods.md``, section neuron matching):

- Block score = the *sum* of the matched similarities in a block pair, not the mean MuDSC
  describes. For one permutation the two give the same assignment (all blocks have the same
  size); for a tied family whose members have different block sizes the sum is the exact
  maximiser of the family's objective, which keeps weight matching monotone.
- Visiting order: random (from ``seed``) as in Git Re-Basin, except that the first sweep visits
  the families touching the most tensors (residual streams) first. With a fully random order
  a residual stream visited last, after every neighbour was fitted to its wrong value, often
  stays wrong: weight matching recovered a planted permutation of the ViT for 26 of 36
  (model seed, order seed) pairs with a random first sweep, and for 36 of 36 with hubs first
  (hubs first: 50 of 50 runs per registered model, 5 model x 5 order seeds, weight matching
  and data-free dual).
- A family is only updated when its assignment improves its objective by more than a relative
  ``1e-12`` (float64 rounding); so weight matching never decreases its objective and stops at
  the first sweep that changes nothing.
- A tensor indexed twice by the same permutation (none in fedmerge's models) is handled as
  Git Re-Basin's code does: the other axis uses that permutation's current value. The weight
  objective is then no longer guaranteed to increase.
- MuDSC's coordinate descent is not monotone (moving one permutation changes the Pearson
  normalisation of its neighbours' weight vectors), so it returns the best permutations seen by
  the total objective, and stops after ``patience`` sweeps without improvement, or at once when a
  sweep changes nothing (a fixed point). ``beta = 1`` starts from the identity (no data).
- Correlations are accumulated in float64 with shifted sums (shift = first sample), so a
  constant (dead) unit has exactly zero variance; its correlation with every unit is 0.
- Activation similarity at a ReLU site (``Site.relu``) is the post-ReLU correlation plus
  ``1e-6`` times the pre-ReLU correlation. Neither paper does this: it only breaks the ties
  among units that are dead on every input (post-ReLU correlation 0 with everything), which
  would otherwise be paired arbitrarily; it moves an assignment's total by at most ``1e-6``
  per unit.

Everything is pure PyTorch/NumPy/SciPy: no Flower. Permutations are returned on the CPU.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .errors import ConfigError, unknown_name
from .permutations import (
    Permutations,
    PermutationSpec,
    Site,
    State,
    axis_index,
    check_spec,
    identity_permutations,
    is_valid_permutation,
)

__all__ = [
    "MATCHERS",
    "activation_matching",
    "dual_matching",
    "match",
    "pearson_correlation",
    "weight_matching",
    "weight_objective",
]

logger = logging.getLogger(__name__)

# Relative improvement below which an assignment counts as no better (float64 rounding of sums
# of up to ~1e6 products is ~1e-13 relative).
_TOL = 1e-12
# Variance, relative to the shifted second moment, below which a unit counts as constant
# (cancellation in E[x^2] - E[x]^2 leaves ~1e-16 relative in float64).
_EPS = 1e-12

# Weight of the pre-ReLU correlation added to the post-ReLU one at ReLU sites. Dead units
# (zero on every input) correlate 0 with everything after the ReLU, so the assignment among them
# would be arbitrary; this lexicographic tie-break separates them by their pre-activations while
# changing a total of at most 1e-6 per unit (far below the sampling noise of a correlation).
_TIE_BREAK = 1e-6

ScoreFn = Callable[[str, Permutations], Tensor]


# ---------------------------------------------------------------------------------------------
# Pearson correlation
# ---------------------------------------------------------------------------------------------


class _PearsonSums:
    """Streaming float64 sums for the Pearson correlation between two sets of units."""

    def __init__(self) -> None:
        self.count = 0

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add samples given as rows of units: ``x`` is ``(units_x, samples)``, ``y`` is
        ``(units_y, samples)`` (the layout in which conv outputs and weights copy cheapest)."""
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"{x.shape[1]} samples of x but {y.shape[1]} of y")
        x, y = x.detach(), y.detach().to(x.device)
        if self.count == 0:
            # Shifting by the first sample keeps E[x^2] - E[x]^2 from cancelling badly and
            # makes the variance of a constant unit exactly zero. It is subtracted in the
            # input's dtype (one float64 pass fewer); x - x0 is exact for a constant unit.
            self.shift_x, self.shift_y = x[:, :1].clone(), y[:, :1].clone()
            self.sx = x.new_zeros(x.shape[0], dtype=torch.float64)
            self.sy = x.new_zeros(y.shape[0], dtype=torch.float64)
            self.sxx, self.syy = torch.zeros_like(self.sx), torch.zeros_like(self.sy)
            self.sxy = x.new_zeros(x.shape[0], y.shape[0], dtype=torch.float64)
        x = (x - self.shift_x).to(torch.float64)
        y = (y - self.shift_y).to(torch.float64)
        self.count += x.shape[1]
        self.sx += x.sum(1)
        self.sy += y.sum(1)
        self.sxx += torch.linalg.vector_norm(x, dim=1).square()
        self.syy += torch.linalg.vector_norm(y, dim=1).square()
        self.sxy += x @ y.T

    def correlation(self) -> Tensor:
        """The ``(units_x, units_y)`` correlation matrix, 0 for constant units, in [-1, 1]."""
        if self.count == 0:
            raise ValueError("no samples to correlate")
        n = self.count
        mx, my = self.sx / n, self.sy / n
        cov = self.sxy / n - torch.outer(mx, my)
        varx, vary = self.sxx / n - mx * mx, self.syy / n - my * my
        # A unit is constant when its variance is 0 (exactly, thanks to the shift) or only
        # rounding left over from E[x^2] - E[x]^2; its correlations are 0.
        livex, livey = varx > _EPS * self.sxx / n, vary > _EPS * self.syy / n
        sd = torch.outer(varx.clamp_min(0).sqrt(), vary.clamp_min(0).sqrt())
        live = torch.outer(livex, livey)
        corr = torch.where(live, cov / torch.where(live, sd, 1.0), 0.0)
        return corr.clamp(-1.0, 1.0)


def pearson_correlation(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation between the columns of ``x`` and the columns of ``y``.

    Parameters
    ----------
    x : Tensor
        ``(samples, units_x)``.
    y : Tensor
        ``(samples, units_y)``, the same samples.

    Returns
    -------
    Tensor
        float64 ``(units_x, units_y)``; entries of a constant (e.g. dead ReLU) unit are 0,
        never NaN.
    """
    sums = _PearsonSums()
    sums.update(x.T, y.T)
    return sums.correlation()


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
    block_cols, _ = _lap(sum(totals for _, totals in solutions.values()))
    out: Permutations = {}
    for name, (orders, _) in solutions.items():
        size = spec.perms[name].group_size
        within = orders[np.arange(groups), block_cols]  # (groups, size)
        out[name] = torch.from_numpy(block_cols[:, None] * size + within).reshape(-1)
    return out


def _families(spec: PermutationSpec) -> list[tuple[str, ...]]:
    """Permutations grouped by the block order they share (singletons when untied)."""
    families: dict[str, list[str]] = {}
    for name in spec.perms:
        families.setdefault(spec.block_order_root(name), []).append(name)
    return [tuple(names) for names in families.values()]


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
                for other, axis in enumerate(spec.axes[tensor])
                if axis is not None and other != dim
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
    for dim, axis in enumerate(spec.axes[tensor]):
        if axis is not None and dim != skip and axis.perm in perms:
            index = axis_index(perms[axis.perm].to(value.device), axis.repeat)
            value = value.index_select(dim, index)
    return value


class _Weights:
    """float64 copies of the permuted tensors of two states, and unit similarities on them."""

    def __init__(self, spec: PermutationSpec, reference: State, other: State) -> None:
        check_spec(spec, reference)
        check_spec(spec, other)
        touched = {tensor for name in spec.perms for tensor, _ in spec.touching(name)}
        self.spec = spec
        self.ref = {t: reference[t].detach().to(torch.float64) for t in touched}
        self.other = {t: other[t].detach().to(self.ref[t].device, torch.float64) for t in touched}

    def _pairs(self, name: str, perms: Permutations) -> Iterator[tuple[Tensor, Tensor]]:
        """Unit rows ``(ref, other with the other axes permuted)`` of each tensor of ``name``."""
        size = self.spec.perms[name].size
        for tensor, dim in self.spec.touching(name):
            other = _permuted_except(self.spec, perms, tensor, self.other[tensor], dim)
            yield _unit_rows(self.ref[tensor], dim, size), _unit_rows(other, dim, size)

    def inner(self, name: str, perms: Permutations) -> Tensor:
        """Git Re-Basin cost: ``C[i, j] = <ref unit i, other unit j>`` over every tensor."""
        return sum(a @ b.T for a, b in self._pairs(name, perms))

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
    max_sweeps: int = 100,
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


# ---------------------------------------------------------------------------------------------
# Activation space
# ---------------------------------------------------------------------------------------------


@contextmanager
def _evaluating(*models: nn.Module) -> Iterator[None]:
    """Put the models in eval mode and restore every module's own mode afterwards."""
    flags = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.state_dict().values()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _unit_samples(output: Tensor, site: Site, size: int) -> Tensor:
    """A site's output as ``(units, samples)``: every axis but the unit axis holds samples."""
    if output.shape[site.axis] != size:
        raise ValueError(
            f"site {site.module}: axis {site.axis} of its output has {output.shape[site.axis]} "
            f"units, the permutation has {size}"
        )
    return output.movedim(site.axis, 0).reshape(size, -1)


def _record(model: nn.Module, batch: Tensor, sites: list[Site]) -> list[Tensor]:
    """Run ``model`` on ``batch`` and return the output of every site's module."""
    modules = dict(model.named_modules())
    outputs: dict[int, Tensor] = {}
    handles = []
    for k, site in enumerate(sites):
        if site.module not in modules:
            raise ValueError(f"activation site {site.module!r} is not a module of the model")

        def hook(_module: nn.Module, _args: object, output: object, k: int = k) -> None:
            outputs[k] = (output[0] if isinstance(output, tuple) else output).detach()

        handles.append(modules[site.module].register_forward_hook(hook))
    try:
        model(batch.to(_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    missing = [sites[k].module for k in range(len(sites)) if k not in outputs]
    if missing:
        raise ValueError(f"activation sites never called in forward: {missing}")
    return [outputs[k] for k in range(len(sites))]


def _activation_correlations(
    spec: PermutationSpec,
    reference: nn.Module,
    other: nn.Module,
    inputs: Tensor,
    batch_size: int,
) -> dict[str, Tensor]:
    """MuDSC ``S_act`` / Git Re-Basin's activation cost of every permutation (float64)."""
    no_sites = [name for name, group in spec.perms.items() if not group.sites]
    if no_sites:
        raise ValueError(f"permutations without activation sites: {no_sites}")
    if len(inputs) == 0:
        raise ValueError("activation matching needs at least one input")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    owners = [(name, site) for name, group in spec.perms.items() for site in group.sites]
    sites = [site for _, site in owners]
    post = {name: _PearsonSums() for name in spec.perms}
    # Pre-ReLU correlations, only to tell apart units that are dead on every input.
    pre = {n: _PearsonSums() for n, g in spec.perms.items() if any(s.relu for s in g.sites)}
    with torch.no_grad(), _evaluating(reference, other):
        for batch in inputs.split(batch_size):
            # One forward pass per model and batch records every site of every permutation.
            ref_out = _record(reference, batch, sites)
            other_out = _record(other, batch, sites)
            for (name, site), a, b in zip(owners, ref_out, other_out, strict=True):
                size = spec.perms[name].size
                a, b = _unit_samples(a, site, size), _unit_samples(b, site, size)
                if name in pre:
                    pre[name].update(a, b)
                if site.relu:
                    a, b = F.relu(a), F.relu(b)
                post[name].update(a, b)
    scores = {name: sums.correlation() for name, sums in post.items()}
    for name, sums in pre.items():
        scores[name] += _TIE_BREAK * sums.correlation()
    return scores


def _solve_independently(spec: PermutationSpec, scores: Mapping[str, Tensor]) -> Permutations:
    """One (grouped) assignment per family on fixed similarities."""
    perms: Permutations = {}
    for family in _families(spec):
        perms.update(_solve_family(spec, {n: scores[n].cpu().numpy() for n in family}))
    return perms


def activation_matching(
    spec: PermutationSpec,
    reference: nn.Module,
    other: nn.Module,
    inputs: Tensor,
    *,
    batch_size: int = 256,
) -> Permutations:
    """Git Re-Basin activation matching: align ``other``'s units to ``reference``'s.

    Both models run in eval mode without gradients on the same ``inputs``; at every
    :class:`~fedmerge.permutations.Site` of a permutation the outputs are read (ReLU applied
    when the site says so; every position or token is a sample; several sites stack samples).
    Each permutation (family, for tied groups) is the assignment maximising the Pearson
    correlation of matched units; layers are matched independently. At ReLU sites,
    ``1e-6`` times the pre-ReLU correlation breaks the ties among dead units.

    Parameters
    ----------
    spec : PermutationSpec
        The architecture's spec; every permutation needs at least one site.
    reference, other : torch.nn.Module
        Two models of the spec's architecture. Their train/eval modes are restored and their
        parameters are not modified.
    inputs : Tensor
        ``(N, *input_shape)``, moved batch by batch to each model's device.
    batch_size : int, default 256
        Inputs per forward pass.

    Returns
    -------
    dict of str to Tensor
        A ``torch.long`` CPU permutation for every name of ``spec.perms``.
    """
    return _solve_independently(
        spec, _activation_correlations(spec, reference, other, inputs, batch_size)
    )


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
    beta: float = 0.5,
    max_sweeps: int = 100,
    patience: int = 5,
    seed: int = 0,
    batch_size: int = 256,
) -> Permutations:
    """MuDSC dual-space matching: align ``other``'s units to ``reference``'s.

    Similarity of reference unit i and other unit j is
    ``beta * S_weight[i, j] + (1 - beta) * S_act[i, j]``: ``S_act`` is the activation
    correlation of :func:`activation_matching` (computed once), ``S_weight`` the Pearson
    correlation of the units' weight vectors (each unit's slice of every tensor that touches
    its permutation, the other permutations' current values applied to ``other``; recomputed
    at every step). Coordinate descent over permutation families in random order, started from
    the activation-only solution; the best permutations by total similarity are returned.

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

    Returns
    -------
    dict of str to Tensor
        A ``torch.long`` CPU permutation for every name of ``spec.perms``.

    Raises
    ------
    ConfigError
        (key ``match-beta``) when ``beta`` is not in [0, 1].
    ValueError
        When ``inputs`` is None and ``beta < 1``.
    """
    beta = _check_beta(beta)
    _check_sweeps(max_sweeps)
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
    if beta < 1.0 and inputs is None:
        raise ValueError("dual matching with beta < 1 needs inputs (activations on data)")
    s_act = None
    if beta < 1.0:
        s_act = _activation_correlations(spec, reference, other, inputs, batch_size)
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


# ---------------------------------------------------------------------------------------------
# Registry and uniform entry point
# ---------------------------------------------------------------------------------------------

#: Matchers by name (run-config key ``match-method``).
MATCHERS: dict[str, Callable[..., Permutations]] = {
    "weight": weight_matching,
    "activation": activation_matching,
    "dual": dual_matching,
}


def _loaded(model: nn.Module, state: State) -> nn.Module:
    """A deep copy of ``model`` holding ``state``, in eval mode."""
    copied = copy.deepcopy(model)
    copied.load_state_dict(state)
    return copied.eval()


def match(
    name: str,
    spec: PermutationSpec,
    reference_state: State,
    other_state: State,
    *,
    model: nn.Module | None = None,
    inputs: Tensor | None = None,
    beta: float = 0.5,
    seed: int = 0,
    max_sweeps: int = 100,
) -> Permutations:
    """Align ``other_state`` to ``reference_state`` with the matcher called ``name``.

    Parameters
    ----------
    name : {"weight", "activation", "dual"}
        A key of :data:`MATCHERS`.
    spec : PermutationSpec
        The architecture's spec.
    reference_state, other_state : mapping of str to Tensor
        State dicts (not modified).
    model : torch.nn.Module, optional
        Template of the architecture (not modified): the data-based matchers load each state
        into a deep copy of it. Needed by ``activation`` and by ``dual`` with ``beta < 1``.
    inputs : Tensor, optional
        ``(N, *input_shape)`` inputs at the merge site; needed when ``model`` is.
    beta : float, default 0.5
        Weight-space share of ``dual``; checked for every matcher.
    seed : int, default 0
        Seed of the visiting order (``weight``, ``dual``).
    max_sweeps : int, default 100
        Sweeps of the coordinate descent (``weight``, ``dual``).

    Returns
    -------
    dict of str to Tensor
        A ``torch.long`` CPU permutation for every name of ``spec.perms``: apply them to
        ``other_state`` with :func:`~fedmerge.permutations.apply_permutations`.

    Raises
    ------
    ConfigError
        Unknown ``name`` (key ``matcher``), or ``beta`` outside [0, 1] (key ``match-beta``).
    ValueError
        A data-based matcher without ``model`` or ``inputs``.
    """
    if name not in MATCHERS:
        raise unknown_name("matcher", name, MATCHERS)
    beta = _check_beta(beta)
    if name == "weight":
        return weight_matching(spec, reference_state, other_state, max_sweeps=max_sweeps, seed=seed)
    if name == "dual" and beta == 1.0:  # data-free: no model or inputs needed
        _check_sweeps(max_sweeps)
        return _dual(
            spec,
            reference_state,
            other_state,
            None,
            beta=1.0,
            max_sweeps=max_sweeps,
            patience=5,
            seed=seed,
        )
    missing = [what for what, value in (("model", model), ("inputs", inputs)) if value is None]
    if missing:
        raise ValueError(
            f"matcher {name!r} (beta={beta}) reads activations and needs " + " and ".join(missing)
        )
    reference, other = _loaded(model, reference_state), _loaded(model, other_state)
    if name == "activation":
        return activation_matching(spec, reference, other, inputs)
    return dual_matching(
        spec, reference, other, inputs, beta=beta, max_sweeps=max_sweeps, seed=seed
    )
