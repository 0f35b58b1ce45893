"""The math of one local training step, shared by the per-client and the vectorised path.

A client's step is ``loss = cross-entropy + terms`` (FedProx's proximal term, the WSA term,
any other regularizer), one backward pass, then SGD with momentum and weight decay. This
module is the only definition of that math; both training paths call it:

- :func:`fedmerge.training.train` (one client): :func:`loss` on ``model(xb)`` with the
  regularizers' values (:func:`fedmerge.training.proximal_term` evaluates :func:`proximal`
  on the model's own parameters), and :func:`sgd_update` in :class:`fedmerge.training.SGD`.
- :func:`fedmerge.vectorised.train_many` (K clients at once): a per-client function of a
  params dict that calls :func:`loss`, :func:`proximal` and :func:`wsa`, mapped over the
  clients with :func:`torch.func.vmap` (the leading dimension of every tensor is the
  client); :func:`sgd_update` on the stacked tensors.

Everything is a plain function of tensors (no module state, no Python control flow on
tensor values), so it runs unchanged on one client's tensors and under ``vmap``. The
coefficients (``mu``, ``lam``) may be Python numbers or (batched) tensors.
``tests/test_training_step.py`` checks that the vectorised steps of two clients equal their
per-client steps, with both terms and momentum on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
import torch.nn.functional as F

__all__ = ["cross_entropy", "gaussian_kl", "layer_stats", "loss", "proximal", "sgd_update", "wsa"]

#: Floor of the standard deviations in the WSA term (a layer of equal weights has sigma 0).
EPS = 1e-12


def layer_stats(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable per-tensor mean and (population) standard deviation, stacked."""
    mus, variances = [], []
    for w in tensors:
        var, mu = torch.var_mean(w.reshape(-1), correction=0)  # one pass over the tensor
        mus.append(mu)
        variances.append(var)
    return torch.stack(mus), torch.stack(variances).sqrt()


def gaussian_kl(
    mu: torch.Tensor, sigma: torch.Tensor, mu_t: torch.Tensor, sigma_t: torch.Tensor
) -> torch.Tensor:
    """``sum_l KL(N(mu_l, sigma_l^2) || N(mu_t_l, sigma_t_l^2))``."""
    sigma = sigma.clamp_min(EPS)
    sigma_t = sigma_t.clamp_min(EPS)
    kl = torch.log(sigma_t / sigma) + (sigma**2 + (mu - mu_t) ** 2) / (2 * sigma_t**2) - 0.5
    return kl.sum()


def cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The task loss: mean cross-entropy of a batch.

    With ``mask`` (1.0 for real samples, 0.0 for padding, one per row) the mean is over the
    real samples only, ``sum(mask * CE) / sum(mask)``: padded rows get exactly zero gradient
    and the gradient is that of the unpadded batch (the vectorised path pads ragged batches).
    """
    if mask is None:
        return F.cross_entropy(logits, y)
    return (F.cross_entropy(logits, y, reduction="none") * mask).sum() / mask.sum()


def proximal(
    params: Iterable[torch.Tensor],
    reference: Iterable[torch.Tensor],
    mu: float | torch.Tensor,
) -> torch.Tensor:
    """FedProx's proximal term ``mu / 2 * sum ||w - w_ref||^2`` (Li et al., MLSys 2020).

    ``params`` and ``reference`` pair up in order; ``reference`` should carry no gradient.
    With ``mu = 0`` the term is exactly 0 (for finite weights) and passes zero gradient.
    """
    sq = [torch.sum((p - r) ** 2) for p, r in zip(params, reference, strict=True)]
    return 0.5 * mu * torch.stack(sq).sum()


def wsa(
    weights: Sequence[torch.Tensor],
    mu_t: torch.Tensor,
    sigma_t: torch.Tensor,
    lam: float | torch.Tensor,
    reverse: bool | torch.Tensor = False,
    include: torch.Tensor | None = None,
) -> torch.Tensor:
    """The WSA term ``lam * sum_l KL`` of :class:`fedmerge.scopes.WSARegularizer`.

    Parameters
    ----------
    weights : sequence of torch.Tensor
        The target's layers (one tensor each), in the order of ``mu_t`` and ``sigma_t``.
    mu_t, sigma_t : torch.Tensor
        The target scope, one entry per layer.
    lam : float or torch.Tensor
        ``wsa-lambda``.
    reverse : bool or torch.Tensor
        ``KL(target || current)`` instead of ``KL(current || target)``; a bool tensor (one
        client's flag under ``vmap``) computes both and selects.
    include : torch.Tensor, optional
        Bool per layer: a layer outside it counts as sitting exactly on its target (its KL is
        exactly 0 and passes no gradient). The vectorised path stacks the union of the
        clients' layer sets and gives each client its own ``include`` (all False, with
        ``lam = 0``, for a client without WSA).
    """
    mu, sigma = layer_stats(weights)
    if include is not None:
        mu = torch.where(include, mu, mu_t)
        sigma = torch.where(include, sigma, sigma_t)
    if isinstance(reverse, bool):
        if reverse:
            return lam * gaussian_kl(mu_t, sigma_t, mu, sigma)
        return lam * gaussian_kl(mu, sigma, mu_t, sigma_t)
    kl = torch.where(
        reverse, gaussian_kl(mu_t, sigma_t, mu, sigma), gaussian_kl(mu, sigma, mu_t, sigma_t)
    )
    return lam * kl


def loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    terms: Iterable[torch.Tensor] = (),
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one step: ``(CE + terms, CE)``.

    The first value is what the step differentiates, the second the task loss a
    ``TrainResult`` reports (regularizers excluded). ``terms`` are added in order after the
    cross-entropy; pass a generator to evaluate them after it (the per-client path does, so
    that its autograd graph, hence its gradients, are built in a fixed order).
    """
    task = cross_entropy(logits, y, mask)
    full = task
    for term in terms:
        full = full + term
    return full, task


@torch.no_grad()
def sgd_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor | None] | None,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> list[torch.Tensor] | None:
    """One SGD update of ``params`` in place: the rule of ``torch.optim.SGD`` (dampening 0,
    no Nesterov) with ``torch._foreach`` ops.

    ``g = grad + weight_decay * w``; momentum buffer ``buf = g`` on a parameter's first step
    (``buffers`` None, or None at its position), else ``buf = momentum * buf + g`` in place;
    ``w -= lr * buf`` (``lr * g`` without momentum). Works on stacked tensors (one row per
    client) as on one model's.

    Returns
    -------
    list of torch.Tensor or None
        The momentum buffers, one per parameter (new ones where none was given, else the
        given ones updated); None without momentum.
    """
    params, grads = list(params), list(grads)
    if weight_decay:
        grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
    out: list[torch.Tensor] | None = None
    if momentum:
        given = list(buffers) if buffers is not None else [None] * len(grads)
        known = [k for k, b in enumerate(given) if b is not None]
        if known:
            kept = [cast(torch.Tensor, given[k]) for k in known]
            torch._foreach_mul_(kept, momentum)
            torch._foreach_add_(kept, [grads[k] for k in known])
        out = [
            b if b is not None else g.detach().clone() for b, g in zip(given, grads, strict=True)
        ]
        grads = out
    torch._foreach_add_(params, grads, alpha=-lr)
    return out
