"""Weight Scope Alignment (WSA): scope statistics, the scope regularizer, and scope fusion.

"Weight Scope Alignment: A Frustratingly Easy Method for Model Merging", arXiv 2408.12237.
Only the abstract is available here; the specification is ``docs/methods.md`` (WSA section),
and every detail the abstract does not fix is a run-config key with a documented default:

- scope of a layer = (mean, standard deviation) of its weight tensor; the standard deviation
  is the population one (``correction=0``). Layer set: ``wsa-layers`` (default
  ``conv-linear``: the weight tensors of convolutions and linear layers, i.e. every float
  tensor named ``*weight`` with two or more dimensions; not biases, not norm parameters).
- regularizer ``R = sum_l KL(N(mu_l, s_l^2) || N(mu*_l, s*_l^2))`` scaled by ``wsa-lambda``
  (default 0.01, unknown in the paper); ``wsa-reverse`` swaps the KL's arguments.
- fusion (``wsa-fusion``): ``moment`` (default: the scope of the data-size weighted mixture of
  the clients' Gaussians), ``mean`` (weighted means of mu and s), ``global`` (the scope of the
  aggregated model), ``fixed`` (the initial model's scope, never updated; an ablation).
- diagnostics: the spread of the clients' scopes per layer (std over clients of ``s_l``).

Everything here is pure PyTorch on tensors and state dicts (no Flower).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from .errors import ConfigError
from .options import FUSION_RULES, LAYER_SETS  # the names live with WSAOptions
from .step import EPS as _EPS
from .step import layer_stats, wsa  # the math of the WSA term lives with the step's

# Keeps s > 0 in log/division when a layer collapses (e.g. an all-zero weight); far below any
# real layer's spread (1e-3..1 for the models here).


@dataclass(frozen=True)
class Scope:
    """Per-layer Gaussian scope of a model: names, means and standard deviations (float64)."""

    names: tuple[str, ...]
    mu: tuple[float, ...]
    sigma: tuple[float, ...]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.mu) == len(self.sigma):
            raise ValueError("Scope needs one mu and one sigma per layer name")

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)`` as float32 tensors on ``device``."""
        mu = torch.tensor(self.mu, dtype=torch.float32, device=device)
        sigma = torch.tensor(self.sigma, dtype=torch.float32, device=device)
        return mu, sigma


def scope_names(state: Mapping[str, torch.Tensor], layers: str = "conv-linear") -> tuple[str, ...]:
    """The tensors that count as layers for WSA, in state-dict order.

    ``conv-linear``: float tensors named ``*weight`` with >= 2 dimensions (convolution and
    linear weights; norm weights are 1-D). ``all``: every floating-point tensor except buffers
    of running statistics (biases and norm parameters included).
    """
    if layers == "conv-linear":
        names = [
            k
            for k, v in state.items()
            if k.endswith("weight") and v.ndim >= 2 and v.is_floating_point()
        ]
    elif layers == "all":
        names = [
            k
            for k, v in state.items()
            if v.is_floating_point() and v.numel() > 1 and "running_" not in k
        ]
    else:
        raise ConfigError("wsa-layers", layers, "one of: " + ", ".join(LAYER_SETS))
    if not names:
        raise ConfigError("wsa-layers", layers, "a layer set that selects some tensors")
    return tuple(names)


def scope_of(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> Scope:
    """The scope of the named tensors of a state dict (no gradients)."""
    with torch.no_grad():
        mu, sigma = layer_stats([state[n].detach().double() for n in names])
    return Scope(tuple(names), tuple(mu.tolist()), tuple(sigma.tolist()))


def target_to_config(
    target: Scope, lam: float, reverse: bool
) -> dict[str, list[str] | list[float] | float | bool]:
    """The config entries that carry a WSA target in a train instruction (Flower ConfigRecord
    values: lists of str / float, float, bool)."""
    return {
        "wsa-names": list(target.names),
        "wsa-mu": [float(v) for v in target.mu],
        "wsa-sigma": [float(v) for v in target.sigma],
        "wsa-lambda": float(lam),
        "wsa-reverse": bool(reverse),
    }


def target_from_config(config: Mapping[str, object]) -> Scope | None:
    """The WSA target an instruction's config carries, or None (train without WSA)."""
    if "wsa-mu" not in config:
        return None
    return Scope(
        tuple(cast("list[str]", config["wsa-names"])),
        tuple(cast("list[float]", config["wsa-mu"])),
        tuple(cast("list[float]", config["wsa-sigma"])),
    )


class WSARegularizer:
    """The WSA loss term ``lambda * R(theta)`` for a model; plugs into ``training.train``.

    Parameters
    ----------
    target : Scope
        The target scope; its ``names`` say which parameters count.
    lam : float
        ``wsa-lambda``.
    reverse : bool
        ``KL(target || current)`` instead of ``KL(current || target)``.
    device : torch.device or str
        Where the target lives (the training device).
    """

    def __init__(
        self,
        target: Scope,
        lam: float,
        *,
        reverse: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        self.names = target.names
        self.lam, self.reverse = lam, reverse
        self.mu_t, self.sigma_t = target.tensors(device)
        self._params: list[torch.Tensor] | None = None
        self._model_id: int | None = None

    def _parameters(self, model: nn.Module) -> list[torch.Tensor]:
        # Looked up once per model object: the same parameters are trained step after step.
        if self._model_id != id(model):
            params = dict(model.named_parameters())
            missing = [n for n in self.names if n not in params]
            if missing:
                raise ConfigError(
                    "wsa-layers", missing[:3], "names of trainable parameters of the model"
                )
            self._params = [params[n] for n in self.names]
            self._model_id = id(model)
        assert self._params is not None
        return self._params

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """``lambda * sum_l KL`` for the model's current weights (differentiable): the one
        definition of the term, :func:`fedmerge.step.wsa`, which the vectorised path maps."""
        return wsa(self._parameters(model), self.mu_t, self.sigma_t, self.lam, self.reverse)


def fuse_scopes(
    scopes: Sequence[Scope],
    weights: Sequence[float],
    rule: str = "moment",
    *,
    global_scope: Scope | None = None,
    initial: Scope | None = None,
) -> Scope:
    """Fuse client scopes into the next target.

    Parameters
    ----------
    scopes : sequence of Scope
        One per client, all over the same layer names.
    weights : sequence of float
        Client weights (data sizes); normalised here.
    rule : {"moment", "mean", "global", "fixed"}
        ``moment``: ``mu* = sum p_k mu_k``, ``s*^2 = sum p_k (s_k^2 + mu_k^2) - mu*^2``.
        ``mean``: ``mu* = sum p_k mu_k``, ``s* = sum p_k s_k``. ``global``: ``global_scope``.
        ``fixed``: ``initial``.
    """
    if rule not in FUSION_RULES:
        raise ConfigError("wsa-fusion", rule, "one of: " + ", ".join(FUSION_RULES))
    if rule == "global":
        if global_scope is None:
            raise ValueError("fusion rule 'global' needs global_scope")
        return global_scope
    if rule == "fixed":
        if initial is None:
            raise ValueError("fusion rule 'fixed' needs the initial scope")
        return initial
    if not scopes:
        raise ValueError("fusing needs at least one scope")
    names = scopes[0].names
    if any(s.names != names for s in scopes):
        raise ValueError("all scopes must cover the same layers")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("fusion weights must sum to a positive number")
    p = [w / total for w in weights]
    mu_star, sigma_star = [], []
    for layer in range(len(names)):
        m = sum(pk * s.mu[layer] for pk, s in zip(p, scopes, strict=True))
        if rule == "moment":
            second = sum(
                pk * (s.sigma[layer] ** 2 + s.mu[layer] ** 2)
                for pk, s in zip(p, scopes, strict=True)
            )
            sd = math.sqrt(max(second - m * m, 0.0))
        else:
            sd = sum(pk * s.sigma[layer] for pk, s in zip(p, scopes, strict=True))
        mu_star.append(m)
        sigma_star.append(sd)
    return Scope(names, tuple(mu_star), tuple(sigma_star))


def sigma_spread(sigmas: Sequence[Sequence[float]]) -> tuple[list[float], float]:
    """How far apart clients' scopes are: per layer, the std over clients of ``s_l``; and one
    number, the mean over layers of that std relative to the layer's mean ``s_l``."""
    sig = torch.tensor([list(s) for s in sigmas], dtype=torch.float64)
    if sig.ndim != 2 or sig.shape[1] == 0:
        raise ValueError("sigma_spread needs one equally long list of sigmas per client")
    std = sig.std(0, correction=0)
    rel = std / sig.mean(0).clamp_min(_EPS)
    return std.tolist(), float(rel.mean())
