"""The activation similarities of a round's models, one forward pass per model.

:func:`fedmerge.matching.activation_similarities` streams the inputs in batches and needs the
models' BatchNorm statistics recomputed beforehand (one more pass per model). When the
reference model's activations over all the inputs fit in memory, this module reads each model
in *one* eval-mode pass over all the inputs at once, and recomputes the BatchNorm statistics
inside that same pass: every BatchNorm layer takes the mean and (unbiased) variance of the
input it receives as its running statistics just before it normalises that input. The
statistics are then exactly those of the inputs each layer sees when the model runs in eval
mode on the proxy (the state :func:`fedmerge.merging.repair_batchnorm` aims at, without its
per-batch averaging or its train-mode normalisation during the pass).

The correlations are accumulated in float32 matrix products: the reference's side is
standardised once (centred, scaled to unit variance) and shared by every model; each model's
side enters raw, its mean is taken out of the product afterwards, and its variance comes from
``torch.var_mean`` (exactly 0 for a constant, e.g. dead, unit, whose correlations are then 0).
The results differ from the float64 streamed sums by float32 rounding (about 1e-6 here, far
below the sampling noise of a correlation on hundreds of inputs); the assignments they give are
tested equal on the registry models.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..permutations import PermutationSpec, Site, State
from ..spec_inference.check import python_attention
from ..spread import SharePool, shares
from .activations import _TIE_BREAK, _loaded, _record, _sites_read, _unit_samples, _zeros
from .correlation import _EPS

#: Bytes of the reference's standardised activations that the one-pass reading may hold;
#: beyond it the inputs are streamed in batches
#: (:func:`fedmerge.merging.activation_similarities_of`).
ONE_PASS_BYTES = 2**30


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@contextmanager
def _statistics_from_inputs(model: nn.Module) -> Iterator[None]:
    """Inside, every BatchNorm layer of ``model`` (in eval mode) first sets its running
    statistics to the mean and unbiased variance of the input it is called on."""

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        assert module.running_mean is not None and module.running_var is not None
        # torch's own statistics kernel, with weight 1 on the new statistics: the running
        # mean and unbiased variance a training-mode pass over these inputs would set.
        torch.batch_norm_update_stats(args[0], module.running_mean, module.running_var, 1.0)
        if module.num_batches_tracked is not None:
            module.num_batches_tracked.fill_(1)

    handles = [m.register_forward_pre_hook(hook) for m in _batchnorms(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _read(
    template: nn.Module, state: State, inputs: Tensor, sites: list[Site], reset: bool
) -> list[Tensor]:
    """The outputs at ``sites`` of ``template`` holding ``state``, in eval mode, on all
    ``inputs`` in one pass; with ``reset``, BatchNorm statistics taken from the inputs."""
    model = _loaded(template, state)
    if inputs.dim() == 4:
        # Image models run channels-last: their convolutions are faster on the CPU, and a
        # site's (units, samples) view of an (N, C, H, W) output is then no copy.
        model = model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    statistics = _statistics_from_inputs(model) if reset else nullcontext()
    with torch.no_grad(), python_attention(), statistics:
        return _record(model, inputs, sites)


@dataclass
class _Centred:
    """One permutation's samples on one model, centred in place: per site ``(units,
    samples)``; each unit's mean and (biased) variance over all its sites' samples, float64."""

    parts: list[Tensor]
    mean: Tensor
    var: Tensor
    count: int

    @property
    def live(self) -> Tensor:
        """Units whose variance is not zero or float32 rounding (constant, e.g. dead, units:
        their shifted samples are exactly 0, so their variance is exactly 0)."""
        return self.var > _EPS * (self.var + self.mean.square())


def _centre(parts: Sequence[Tensor]) -> _Centred:
    """Centre ``parts`` (fresh tensors, overwritten) on their units' mean over all samples.

    The samples are first shifted by each unit's first sample (a constant unit becomes
    exactly 0), then centred; every operation is float32 and in place (a new large tensor
    costs more in page faults than the arithmetic), the per-unit sums are combined in
    float64."""
    shift = parts[0][:, :1].clone()
    count = sum(p.shape[1] for p in parts)
    for p in parts:
        p.sub_(shift)
    total = sum(p.mean(1).double() * p.shape[1] for p in parts)
    assert isinstance(total, Tensor)
    mean = total / count
    centre = mean.to(parts[0].dtype)[:, None]
    square = torch.zeros_like(mean)
    for p in parts:
        p.sub_(centre)
        square += _squares(p)
    # The mean of the shifted samples, and the variance about the (rounded) centre used.
    var = square / count - (mean - centre[:, 0].double()).square()
    return _Centred(list(parts), mean + shift[:, 0].double(), var.clamp_min(0), count)


#: Samples per float32 matrix product; the products are added in float64. A float32 product
#: over all the samples at once adds hundreds of thousands of mostly positive terms in one
#: accumulator and loses about 1e-4 relative (a variance of ResNet-20's first stage); in
#: chunks of 1024 the error stays near float32's rounding.
_CHUNK = 1024


def _products(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` (rows of units, columns of samples) in float64, from float32 products of
    :data:`_CHUNK` samples each."""
    samples = a.shape[1]
    whole = samples // _CHUNK * _CHUNK
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    if whole:
        # (units, chunks, chunk) views, batched over the chunks: no copy for the strided
        # (units, samples) views of channels-last outputs.
        ca = a[:, :whole].reshape(a.shape[0], -1, _CHUNK).transpose(0, 1)
        cb = b[:, :whole].reshape(b.shape[0], -1, _CHUNK).transpose(0, 1)
        out += torch.bmm(ca, cb.transpose(1, 2)).double().sum(0)
    if whole < samples:
        out += (a[:, whole:] @ b[:, whole:].T).double()
    return out


def _squares(p: Tensor) -> Tensor:
    """Each row's sum of squares in float64: the diagonal of the chunked row Gram matrix for
    a few rows (matrix products, fast on any layout), a float64 norm otherwise."""
    if p.shape[0] <= 128:
        return torch.diagonal(_products(p, p)).clone()
    return torch.linalg.vector_norm(p, dim=1, dtype=torch.float64).square()


@dataclass
class _Reference:
    """One permutation's reference side: per site, its standardised samples (dead units 0)."""

    z: list[Tensor]
    count: int


def _standardise(parts: Sequence[Tensor]) -> _Reference:
    c = _centre(parts)
    scale = torch.where(c.live, c.var.rsqrt(), 0.0).to(c.parts[0].dtype)[:, None]
    return _Reference([p.mul_(scale) for p in c.parts], c.count)


def _correlate(ref: _Reference, parts: Sequence[Tensor]) -> Tensor:
    """Pearson correlation of the reference's units (rows) with those of ``parts`` (fresh
    tensors, overwritten): float32 products of the standardised reference and the centred
    samples, summed in float64."""
    c = _centre(parts)
    if c.count != ref.count:
        raise ValueError(f"{c.count} samples of a model but {ref.count} of the reference")
    cross = sum(_products(z, p) for z, p in zip(ref.z, c.parts, strict=True))
    assert isinstance(cross, Tensor)
    live = c.live
    sd = torch.where(live, c.var, 1.0).sqrt() * c.count
    corr = torch.where(live[None, :], cross / sd[None, :], 0.0)
    return corr.clamp(-1.0, 1.0)


def _sides(
    spec: PermutationSpec, chosen: Mapping[str, tuple[Site, ...]], outputs: Sequence[Tensor]
) -> tuple[dict[str, list[Tensor]], dict[str, list[Tensor]]]:
    """Per permutation, its sites' samples as ``(units, samples)``, post-ReLU where the site
    says so, and for the permutations with a ReLU site every site's pre-ReLU samples too (for
    the tie-break among dead units); each a tensor of its own (they are centred in place)."""
    post: dict[str, list[Tensor]] = {}
    pre: dict[str, list[Tensor]] = {}
    taken: set[int] = set()

    def own(t: Tensor) -> Tensor:
        # A storage another site already took (two sites on one module, a module whose
        # output is a view of another's) is copied first.
        key = t.untyped_storage().data_ptr()
        if key in taken:
            return t.clone()
        taken.add(key)
        return t

    k = 0
    for name, group in spec.perms.items():
        sites = chosen[name]
        raws = [own(_unit_samples(outputs[k + i], s, group.size)) for i, s in enumerate(sites)]
        k += len(sites)
        if any(site.relu for site in sites):
            post[name] = [
                F.relu(r) if s.relu else r.clone() for r, s in zip(raws, sites, strict=True)
            ]
            pre[name] = raws
        else:
            post[name] = raws
    return post, pre


def one_pass_bytes(spec: PermutationSpec, model: nn.Module, inputs: Tensor, sites: str) -> int:
    """Bytes the reference's standardised activations take in the one-pass reading (from a
    forward pass on one input)."""
    _, read = _sites_read(spec, sites)
    if not read or len(inputs) == 0:
        return 0
    outputs = _read(model, model.state_dict(), inputs[:1], read, reset=False)
    per_input = sum(
        o.numel() * o.element_size() * (2 if s.relu else 1)
        for o, s in zip(outputs, read, strict=True)
    )
    return per_input * len(inputs)


def similarities_in_one_pass(
    spec: PermutationSpec,
    model: nn.Module,
    target: State,
    states: Sequence[State],
    inputs: Tensor,
    *,
    sites: str,
    reset_target: bool,
    reset_states: bool,
    pool: SharePool | None = None,
) -> list[dict[str, Tensor]]:
    """The activation similarities of every state against ``target`` (the values of
    :func:`fedmerge.matching.activation_similarities`, float32-rounded), each model read in
    one pass over all ``inputs``; ``reset_*``: BatchNorm statistics taken from the inputs
    (module docstring). With ``pool`` (inputs on the CPU), the states are read in its
    workers when it can run them (:func:`similarities_in_shares`), otherwise here."""
    if pool is not None and inputs.device.type == "cpu":
        spread = similarities_in_shares(
            spec,
            model,
            target,
            states,
            inputs,
            sites=sites,
            reset_target=reset_target,
            reset_states=reset_states,
            pool=pool,
        )
        if spread is not None:
            return spread
    chosen, read = _sites_read(spec, sites)
    post_ref, pre_ref = _sides(spec, chosen, _read(model, target, inputs, read, reset_target))
    ref_post = {name: _standardise(parts) for name, parts in post_ref.items() if parts}
    ref_pre = {name: _standardise(parts) for name, parts in pre_ref.items()}
    del post_ref, pre_ref
    out = []
    for state in states:
        post, pre = _sides(spec, chosen, _read(model, state, inputs, read, reset_states))
        scores = {
            name: _correlate(ref_post[name], post[name])
            if name in ref_post
            else _zeros(spec.perms[name].size)
            for name in spec.perms
        }
        for name, ref in ref_pre.items():
            scores[name] += _TIE_BREAK * _correlate(ref, pre[name])
        out.append(scores)
    return out


def similarities_in_shares(
    spec: PermutationSpec,
    model: nn.Module,
    target: State,
    states: Sequence[State],
    inputs: Tensor,
    *,
    sites: str,
    reset_target: bool,
    reset_states: bool,
    pool: SharePool,
) -> list[dict[str, Tensor]] | None:
    """:func:`similarities_in_one_pass` with ``states`` cut into contiguous shares, one per
    worker of ``pool`` (:mod:`fedmerge.spread`), each share read in its worker beside its own
    reading of ``target``; the shares' results put back in order. The same values as in this
    process on one thread (each model's pass and products are the same computation). None
    when there are fewer than two states or the pool could not run the shares."""
    parts = shares(len(states), pool.size)
    if len(parts) < 2:
        return None
    args = [
        (spec, model, target, [states[i] for i in part], inputs, sites, reset_target, reset_states)
        for part in parts
    ]
    out = pool.map(_share, args)
    if out is None:
        return None
    return [scores for part in out for scores in part]


def _share(
    spec: PermutationSpec,
    model: nn.Module,
    target: State,
    states: list[State],
    inputs: Tensor,
    sites: str,
    reset_target: bool,
    reset_states: bool,
) -> list[dict[str, Tensor]]:
    """One worker's share of :func:`similarities_in_shares` (a top-level function: pickled)."""
    return similarities_in_one_pass(
        spec,
        model,
        target,
        states,
        inputs,
        sites=sites,
        reset_target=reset_target,
        reset_states=reset_states,
    )
