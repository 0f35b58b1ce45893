"""Activation matching (Git Re-Basin): streamed Pearson correlation of units on shared inputs."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import unknown_name
from ..options import DEFAULT_MATCH_SITES, MATCH_SITES
from ..permutations import (
    PermGroup,
    Permutations,
    PermutationSpec,
    Site,
    State,
)
from ..spec_inference.check import python_attention
from .assignment import _families, _solve_family
from .correlation import _PearsonMany

logger = logging.getLogger(__name__)

# Weight of the pre-ReLU correlation added to the post-ReLU one at ReLU sites. Dead units
# (zero on every input) correlate 0 with everything after the ReLU, so the assignment among them
# would be arbitrary; this lexicographic tie-break separates them by their pre-activations while
# changing a total of at most 1e-6 per unit (far below the sampling noise of a correlation).
_TIE_BREAK = 1e-6


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


def selected_sites(group: PermGroup, sites: str = DEFAULT_MATCH_SITES) -> tuple[Site, ...]:
    """The activation sites of one permutation that the matchers read (``match-sites``).

    ``"all"``: every site of ``group`` (their samples are stacked into one correlation).
    ``"last"``: only the *last declared* site, ``group.sites[-1]``, as MuDSC's code reads one
    site per unit space, its last consumer. Specs declare their sites in forward order
    (the registry's hand-written specs and :func:`~fedmerge.spec_inference.infer_spec`'s
    do: tested), so this is the site computed last in the forward pass: for a residual
    stream the last block's output, for attention q/k the key projection. A spec whose sites
    are not in forward order gets its last declared site, whatever its position.

    Raises
    ------
    ConfigError
        (key ``match-sites``) for a value other than ``"all"`` or ``"last"``.
    """
    _check_sites(sites)
    return group.sites if sites == "all" else group.sites[-1:]


def _check_sites(sites: str) -> str:
    if sites not in MATCH_SITES:
        raise unknown_name("match-sites", sites, MATCH_SITES)
    return sites


def _sites_read(
    spec: PermutationSpec, sites: str
) -> tuple[dict[str, tuple[Site, ...]], list[Site]]:
    """Per permutation, the sites :func:`selected_sites` picks; and all of them in spec order
    (the sites one forward pass records)."""
    chosen = {name: selected_sites(group, sites) for name, group in spec.perms.items()}
    return chosen, [site for name in spec.perms for site in chosen[name]]


def _loaded(model: nn.Module, state: State) -> nn.Module:
    """A deep copy of ``model`` holding ``state``, in eval mode."""
    copied = copy.deepcopy(model)
    copied.load_state_dict(state)
    return copied.eval()


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
            value = output[0] if isinstance(output, tuple) else output
            assert isinstance(value, Tensor), f"site {k}: a module output that is no tensor"
            outputs[k] = value.detach()

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


def activation_similarities(
    spec: PermutationSpec,
    reference: nn.Module,
    others: Sequence[nn.Module],
    inputs: Tensor,
    batch_size: int = 256,
    sites: str = DEFAULT_MATCH_SITES,
) -> list[dict[str, Tensor]]:
    """MuDSC ``S_act`` / Git Re-Basin's activation cost of every permutation (float64) of each
    model of ``others`` against ``reference``, read at the sites :func:`selected_sites` picks.

    One pass over ``inputs``: each batch runs through ``reference`` once and through every
    model of ``others``, so the reference's forward pass is shared by all of them (the result
    for each is the same, to the bit, as with ``others`` of one model).
    """
    chosen, read = _sites_read(spec, sites)
    no_sites = [name for name, group in spec.perms.items() if not group.sites]
    if no_sites and len(no_sites) == len(spec.perms):
        raise ValueError(f"permutations without activation sites: {no_sites}")
    if no_sites:
        logger.warning(
            "permutations without activation sites (%s): their activation similarity is 0, "
            "so activation matching leaves them in place and dual matching scores them by "
            "their weights alone",
            ", ".join(no_sites),
        )
    if len(inputs) == 0:
        raise ValueError("activation matching needs at least one input")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    owners = [(name, site) for name in spec.perms for site in chosen[name]]
    # Per permutation, the reference's side of every correlation is summed once for all the
    # models (_PearsonMany), and its activations are read once per batch.
    post = {name: _PearsonMany(len(others)) for name in spec.perms}
    # Pre-ReLU correlations, only to tell apart units that are dead on every input.
    relu = [n for n in spec.perms if any(s.relu for s in chosen[n])]
    pre = {n: _PearsonMany(len(others)) for n in relu}
    with torch.no_grad(), _evaluating(reference, *others), python_attention():
        for batch in inputs.split(batch_size):
            # One forward pass per model and batch records every site of every permutation.
            ref_out = [
                _unit_samples(a, site, spec.perms[name].size)
                for (name, site), a in zip(owners, _record(reference, batch, read), strict=True)
            ]
            ref_relu = [
                F.relu(a) if site.relu else a for (_, site), a in zip(owners, ref_out, strict=True)
            ]
            for sums in (*post.values(), *pre.values()):
                sums.next_batch()
            for k, other in enumerate(others):
                other_out = _record(other, batch, read)
                for i, ((name, site), b) in enumerate(zip(owners, other_out, strict=True)):
                    b = _unit_samples(b, site, spec.perms[name].size)
                    if name in pre:
                        pre[name].update(k, i, ref_out[i], b)
                    post[name].update(k, i, ref_relu[i], F.relu(b) if site.relu else b)
    out = []
    for k in range(len(others)):
        scores = {
            name: sums.correlation(k) if chosen[name] else _zeros(spec.perms[name].size)
            for name, sums in post.items()
        }
        for name, sums in pre.items():
            scores[name] += _TIE_BREAK * sums.correlation(k)
        out.append(scores)
    return out


def _activation_correlations(
    spec: PermutationSpec,
    reference: nn.Module,
    other: nn.Module,
    inputs: Tensor,
    batch_size: int,
    sites: str = DEFAULT_MATCH_SITES,
) -> dict[str, Tensor]:
    """:func:`activation_similarities` of one model."""
    return activation_similarities(spec, reference, [other], inputs, batch_size, sites)[0]


def _zeros(size: int) -> Tensor:
    return torch.zeros(size, size, dtype=torch.float64)


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
    sites: str = DEFAULT_MATCH_SITES,
) -> Permutations:
    """Git Re-Basin activation matching: align ``other``'s units to ``reference``'s.

    Both models run in eval mode without gradients on the same ``inputs``; at every
    :class:`~fedmerge.permutations.Site` of a permutation the outputs are read (ReLU applied
    when the site says so; every position or token is a sample; several sites stack samples,
    or only the last site is read with ``sites="last"``).
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
    sites : {"all", "last"}, default "all"
        ``match-sites``: every site of a permutation, or only its last (:func:`selected_sites`).

    Returns
    -------
    dict of str to Tensor
        A ``torch.long`` CPU permutation for every name of ``spec.perms``.

    Raises
    ------
    ConfigError
        (key ``match-sites``) for an unknown ``sites``.
    """
    return activation_permutations(
        spec, _activation_correlations(spec, reference, other, inputs, batch_size, sites)
    )


def activation_permutations(spec: PermutationSpec, scores: Mapping[str, Tensor]) -> Permutations:
    """Activation matching's permutations from its similarities (:func:`activation_similarities`):
    one assignment per family; families without activation sites stay in place."""
    perms = _solve_independently(spec, scores)
    for family in _families(spec):
        if not any(spec.perms[name].sites for name in family):
            perms.update({name: torch.arange(spec.perms[name].size) for name in family})
    return perms
