"""The client side of fedmerge's strategies, for any ClientApp: the loss terms the server asked for.

A strategy asks clients for extra loss terms through the train instruction's config: FedWSA
sends a target scope (``wsa-names``, ``wsa-mu``, ``wsa-sigma``, ``wsa-lambda``,
``wsa-reverse``), Flower's FedProx sends ``proximal-mu``. A user's own training loop adds them
with one line::

    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    terms = loss_terms(msg, model)          # after loading the received weights
    ...
    loss = criterion(model(x), y) + terms(model)

With no term requested, ``terms(model)`` is a zero and costs nothing; the same loop then serves
FedAvg, FedMatch, FedNPMerge and FedWSA alike. FedMA asks more of a client (a model at the
widths it sends, matched layers frozen, its retraining epochs, the class counts in the reply):
:func:`fedma_model`, :func:`fedma_epochs` and :func:`fedma_metrics`. This module does not
import Flower: it reads any message whose ``content`` has ``config_records``, a
``ConfigRecord``, or a plain mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .scopes import Scope, WSARegularizer, target_from_config
from .training import Regularizer, proximal_term

__all__ = [
    "LossTerms",
    "RequestedTerms",
    "fedma_epochs",
    "fedma_frozen",
    "fedma_metrics",
    "fedma_model",
    "instruction_config",
    "load_arrays",
    "loss_terms",
]


def instruction_config(message_or_config: object) -> Mapping[str, object]:
    """The config of a train instruction: a Flower ``Message``'s ConfigRecord, or the mapping.

    A message's config is read under ``"config"`` (where Flower's strategies put it) or, when
    absent, from its only ConfigRecord; a message without one gives an empty config.
    """
    content = getattr(message_or_config, "content", None)
    if content is None:
        if not isinstance(message_or_config, Mapping):
            raise TypeError(
                "expected a Flower Message or its ConfigRecord, got "
                f"{type(message_or_config).__name__}"
            )
        return message_or_config
    records = content.config_records
    if "config" in records:
        return records["config"]
    return next(iter(records.values())) if len(records) == 1 else {}


@dataclass(frozen=True)
class RequestedTerms:
    """The extra loss terms a train instruction's config asks for.

    Attributes
    ----------
    proximal_mu : float
        Flower FedProx's ``proximal-mu`` (0 = no term).
    wsa_target : Scope or None
        FedWSA's target scope (None = no term; also when ``wsa-lambda`` is 0).
    wsa_lambda : float
        ``wsa-lambda``.
    wsa_reverse : bool
        ``wsa-reverse``.
    """

    proximal_mu: float = 0.0
    wsa_target: Scope | None = None
    wsa_lambda: float = 0.0
    wsa_reverse: bool = False

    @classmethod
    def of(cls, message_or_config: object) -> RequestedTerms:
        """Read the terms from a message or its config."""
        config = instruction_config(message_or_config)
        target = target_from_config(config)
        lam = float(config["wsa-lambda"]) if target is not None else 0.0  # type: ignore[arg-type]
        if lam <= 0:
            target, lam = None, 0.0
        return cls(
            float(config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
            target,
            lam,
            bool(config.get("wsa-reverse", False)),
        )

    def regularizers(self, model: nn.Module, device: torch.device | str) -> list[Regularizer]:
        """The terms as callables ``term(model) -> scalar``. Call with the received weights
        loaded: the proximal term's reference is the model's parameters now."""
        regs: list[Regularizer] = []
        if self.proximal_mu > 0:
            ref = [p.detach().clone().to(device) for p in model.parameters()]
            regs.append(proximal_term(ref, self.proximal_mu))
        if self.wsa_target is not None:
            regs.append(
                WSARegularizer(
                    self.wsa_target, self.wsa_lambda, reverse=self.wsa_reverse, device=device
                )
            )
        return regs


class LossTerms:
    """The sum of the requested loss terms, as a function of the model being trained.

    Parameters
    ----------
    requested : RequestedTerms
        What the server asked for.
    model : torch.nn.Module
        The model with the received weights loaded (the proximal term's reference).
    device : torch.device or str, optional
        The training device (default: that of the model's first parameter).
    """

    def __init__(
        self,
        requested: RequestedTerms,
        model: nn.Module,
        device: torch.device | str | None = None,
    ) -> None:
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else "cpu"
        self.requested = requested
        self.device = torch.device(device)
        self.terms = requested.regularizers(model, self.device)

    def __bool__(self) -> bool:
        """True when at least one term was requested."""
        return bool(self.terms)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """The terms' sum for the model's current weights (differentiable); 0 without terms."""
        if not self.terms:
            return torch.zeros((), device=self.device)
        total = self.terms[0](model)
        for term in self.terms[1:]:
            total = total + term(model)
        return total


def loss_terms(
    message_or_config: object, model: nn.Module, device: torch.device | str | None = None
) -> LossTerms:
    """The loss terms a train instruction asks for, ready to add to a training loss.

    Parameters
    ----------
    message_or_config : Message, ConfigRecord or mapping
        The train instruction the ClientApp received (or its config).
    model : torch.nn.Module
        The model, with the received weights already loaded.
    device : torch.device or str, optional
        The training device (default: the model's).

    Returns
    -------
    LossTerms
        ``terms(model)`` gives the scalar to add to the loss at each step.

    Raises
    ------
    ConfigError
        When the WSA target names tensors that are not trainable parameters of ``model``
        (raised at the first call, naming ``wsa-layers``).
    """
    return LossTerms(RequestedTerms.of(message_or_config), model, device)


# -- FedMA ---------------------------------------------------------------------------------

#: The config keys of FedMA's instructions (written by :class:`fedmerge.strategies.FedMA`)
#: and the metric of its replies.
FEDMA_PHASE, FEDMA_FROZEN, FEDMA_EPOCHS = "fedma-phase", "fedma-frozen", "fedma-epochs"
FEDMA_CLASS_COUNTS = "fedma-class-counts"


def _received(message: object) -> dict[str, torch.Tensor]:
    content = getattr(message, "content", None)
    records = getattr(content, "array_records", None)
    if not records:
        raise TypeError("expected a Flower train Message carrying arrays")
    record = records["arrays"] if "arrays" in records else next(iter(records.values()))
    return record.to_torch_state_dict()


def load_arrays(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    example_input: torch.Tensor | None = None,
    build: Callable[[dict[str, int]], nn.Module] | None = None,
) -> nn.Module:
    """``model`` with ``state`` loaded, rebuilt first when the widths differ (FedMA's global
    model grew): :func:`fedmerge.fedma.fit_model` (by ``build(widths)``, else resized from the
    model's spec, its own or inferred from ``example_input``).

    Raises
    ------
    ValueError
        The widths differ and neither ``build`` nor a spec says how to rebuild the model.
    """
    from .fedma import fit_model  # not at import: it brings SciPy into every ClientApp

    return fit_model(model, state, example_input=example_input, build=build)


def fedma_model(
    message: object,
    model: nn.Module,
    *,
    example_input: torch.Tensor | None = None,
    build: Callable[[dict[str, int]], nn.Module] | None = None,
) -> nn.Module:
    """The model to train for a train instruction, with FedMA's needs met: the received
    arrays loaded (:func:`load_arrays`: a rebuilt model when FedMA's global model grew) and,
    in FedMA's matching phases, the matched layers frozen (``requires_grad`` False: train
    only what still requires a gradient). For any other strategy this loads the arrays.
    """
    model = load_arrays(model, _received(message), example_input=example_input, build=build)
    frozen = fedma_frozen(message)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen)
    return model


def fedma_frozen(message_or_config: object) -> set[str]:
    """The state entries a train instruction asks to keep as sent (FedMA's matched layers;
    empty for other strategies)."""
    value = instruction_config(message_or_config).get(FEDMA_FROZEN, "")
    return {name for name in str(value).split(",") if name}


def fedma_epochs(message: object, default: int) -> int:
    """Epochs to train for a train instruction: FedMA's retraining epochs in its matching
    phases, ``default`` otherwise."""
    config = instruction_config(message)
    if int(config.get(FEDMA_PHASE, 0)) > 0:  # type: ignore[call-overload]
        return int(config.get(FEDMA_EPOCHS, default))  # type: ignore[call-overload]
    return default


def fedma_metrics(message: object, labels: torch.Tensor, num_classes: int) -> dict[str, list[int]]:
    """The metrics a FedMA reply adds (the node's count of every class, by which the output
    layer is averaged); empty for other strategies."""
    if FEDMA_PHASE not in instruction_config(message):
        return {}
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes)
    return {FEDMA_CLASS_COUNTS: [int(c) for c in counts]}
