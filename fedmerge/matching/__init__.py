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
- Correlations: :func:`activation_similarities` (pairs of modules, and large proxies)
  accumulates float64 shifted sums over batches (shift = first sample), so a constant (dead)
  unit has exactly zero variance; its correlation with every unit is 0. A round's merge reads
  each model in one pass over all the inputs instead (:mod:`.reading`, via
  :func:`fedmerge.merging.activation_similarities_of`): float32 products over chunks of
  samples added in float64, BatchNorm statistics taken inside that pass.
- Activation sites (``sites``, run-config key ``match-sites``): ``"all"`` stacks the samples
  of every site of a permutation into one correlation (e.g. the stem and every block output
  of a residual stream); ``"last"`` reads only the last declared site, which is the last in
  forward order in every registry and inferred spec, as MuDSC's code reads one site per unit
  space (its last consumer's input). On resnet20 this is MuDSC's site for every permutation;
  on vit the residual stream reads the last block's output (all tokens, before the final
  LayerNorm; MuDSC: the head's input, the normalised cls token) and the value space reads
  ``attn.v``'s output (MuDSC: ``attn.proj``'s input, the attention-weighted values).
- Activation similarity at a ReLU site (``Site.relu``) is the post-ReLU correlation plus
  ``1e-6`` times the pre-ReLU correlation. Neither paper does this: it only breaks the ties
  among units that are dead on every input (post-ReLU correlation 0 with everything), which
  would otherwise be paired arbitrarily; it moves an assignment's total by at most ``1e-6``
  per unit.

Everything is pure PyTorch/NumPy/SciPy: no Flower. Permutations are returned on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn

from ..options import MatchOptions
from ..permutations import Permutations, PermutationSpec, State
from .activations import (
    _loaded,
    _solve_independently,
    activation_matching,
    activation_permutations,
    activation_similarities,
    selected_sites,
)
from .correlation import pearson_correlation
from .dual import _dual, dual_matching
from .weights import weight_matching, weight_objective

__all__ = [
    "MATCHERS",
    "activation_matching",
    "activation_permutations",
    "activation_similarities",
    "dual_matching",
    "match",
    "pearson_correlation",
    "selected_sites",
    "weight_matching",
    "weight_objective",
]


# ---------------------------------------------------------------------------------------------
# Registry and uniform entry point
# ---------------------------------------------------------------------------------------------


#: Matchers by name (run-config key ``match-method``).
MATCHERS: dict[str, Callable[..., Permutations]] = {
    "weight": weight_matching,
    "activation": activation_matching,
    "dual": dual_matching,
}


def match(
    spec: PermutationSpec,
    reference_state: State,
    other_state: State,
    options: MatchOptions = MatchOptions(),
    *,
    model: nn.Module | None = None,
    inputs: Tensor | None = None,
    seed: int = 0,
    similarities: Mapping[str, Tensor] | None = None,
) -> Permutations:
    """Align ``other_state`` to ``reference_state`` with the matcher ``options.method``.

    Parameters
    ----------
    spec : PermutationSpec
        The architecture's spec.
    reference_state, other_state : mapping of str to Tensor
        State dicts (not modified).
    options : MatchOptions
        The ``match-*`` options read here: ``method`` (a key of :data:`MATCHERS`), ``beta``
        (the weight-space share of ``dual``, a number: ``auto`` is chosen on labelled data by
        :func:`fedmerge.merging.select_beta`), ``max_sweeps`` (sweeps of the coordinate
        descent of ``weight`` and ``dual``) and ``sites`` (activation sites read by
        ``activation`` and by ``dual`` with ``beta < 1``: every site of a permutation, or
        only its last, :func:`selected_sites`). Default: weight matching.
    model : torch.nn.Module, optional
        Template of the architecture (not modified): the data-based matchers load each state
        into a deep copy of it. Needed by ``activation`` and by ``dual`` with ``beta < 1``.
    inputs : Tensor, optional
        ``(N, *input_shape)`` inputs at the merge site; needed when ``model`` is.
    seed : int, default 0
        Seed of the visiting order (``weight``, ``dual``).
    similarities : mapping of str to Tensor, optional
        The activation similarities of ``other_state`` against ``reference_state``, already
        computed (:func:`activation_similarities`, e.g. for many models in one pass over the
        inputs): ``activation`` and ``dual`` use them instead of running the models, and then
        need neither ``model`` nor ``inputs``.

    Returns
    -------
    dict of str to Tensor
        A ``torch.long`` CPU permutation for every name of ``spec.perms``: apply them to
        ``other_state`` with :func:`~fedmerge.permutations.apply_permutations`.

    Raises
    ------
    ConfigError
        ``beta = "auto"`` for the dual matcher (key ``match-beta``); a bad value is refused
        when the :class:`~fedmerge.options.MatchOptions` is built.
    ValueError
        A data-based matcher without ``model`` or ``inputs``.
    """
    name, beta = options.method, options.fixed_beta
    max_sweeps, sites = options.max_sweeps, options.sites
    if name == "weight":
        return weight_matching(spec, reference_state, other_state, max_sweeps=max_sweeps, seed=seed)
    if name == "dual" and beta == 1.0:  # data-free: no model or inputs needed
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
    if similarities is not None:
        if name == "activation":
            return activation_permutations(spec, similarities)
        if beta == 0.0:
            return _solve_independently(spec, similarities)
        return _dual(
            spec,
            reference_state,
            other_state,
            similarities,
            beta=beta,
            max_sweeps=max_sweeps,
            patience=5,
            seed=seed,
        )
    missing = [what for what, value in (("model", model), ("inputs", inputs)) if value is None]
    if missing:
        raise ValueError(
            f"matcher {name!r} (beta={beta}) reads activations and needs " + " and ".join(missing)
        )
    assert model is not None and inputs is not None  # checked just above
    reference, other = _loaded(model, reference_state), _loaded(model, other_state)
    if name == "activation":
        return activation_matching(spec, reference, other, inputs, sites=sites)
    return dual_matching(
        spec, reference, other, inputs, beta=beta, max_sweeps=max_sweeps, seed=seed, sites=sites
    )
