"""Shared pieces of the analyses: settings, training, outputs, accuracy; the model-set names."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...federation import DataSpec, load_data
from ...permutations import StateDict
from ...training import SGDSettings, train

if TYPE_CHECKING:
    from ...config import RunConfig


#: Model sets of :func:`soups` and :func:`scaling`.
SETTINGS: tuple[str, ...] = ("shared", "independent")
#: Heads of the feature ensemble.
FEATURE_HEADS: tuple[str, ...] = ("soup", "first")
#: Training data of independently initialised models.
INDEPENDENT_DATA: tuple[str, ...] = ("shards", "full")
#: Which models :func:`scaling` scales.
CASES: tuple[str, ...] = ("one", "half", "all")
#: Held-out samples when the config's ``proxy-size`` is 0.
DEFAULT_HOLDOUT = 1000


# -- shared helpers --------------------------------------------------------------------------
def analysis_sgd(cfg: RunConfig, epochs: int | None = None) -> SGDSettings:
    """The SGD of every model an analysis trains: the config's local training, for
    ``local-epochs`` or the command's ``--epochs``."""
    if epochs is None:
        return SGDSettings.of(cfg)
    if epochs < 1:
        raise ConfigError("--epochs", epochs, "an integer >= 1")
    return SGDSettings.of(cfg, epochs=epochs)


def _cpu(state: dict[str, Tensor]) -> StateDict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    settings: SGDSettings,
    *,
    seed: int,
    device: torch.device | str = "cpu",
) -> StateDict:
    """Train ``model`` in place and return its state dict (a CPU copy)."""
    train(model, x, y, settings, seed=seed, device=device)
    return _cpu(model.state_dict())


def _loaded(template: nn.Module, state: StateDict, device: torch.device | str) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model.to(device).eval()


def with_holdout(cfg: RunConfig) -> RunConfig:
    """``cfg`` with a held-out proxy slice: its own ``proxy-size``, else 1000 (or a tenth)."""
    if cfg.proxy_size > 0:
        return cfg
    n = len(load_data(DataSpec.of(cfg)).y_train)
    return cfg.replace(proxy_size=min(DEFAULT_HOLDOUT, max(1, n // 10)))


def head_name(model: nn.Module) -> str:
    """Name of the model's last ``nn.Linear`` (its classifier head)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear head")
    return names[-1]


@torch.no_grad()
def outputs(
    model: nn.Module, x: Tensor, *, device: torch.device | str = "cpu", batch_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Logits and penultimate features (the input of the head) of ``model`` on ``x``, on CPU."""
    model.to(device).eval()
    feats: list[Tensor] = []
    hook = model.get_submodule(head_name(model)).register_forward_pre_hook(
        lambda _m, inputs: feats.append(inputs[0].detach().cpu())
    )
    try:
        logits = [
            model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)
        ]
    finally:
        hook.remove()
    return torch.cat(logits), torch.cat(feats)


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Share of rows whose arg-max is the label."""
    return float((logits.argmax(1) == y).double().mean())


def agreement(a: Tensor, b: Tensor) -> float:
    """Share of rows where two logit tensors predict the same class."""
    return float((a.argmax(1) == b.argmax(1)).double().mean())
