"""The run configuration: one frozen dataclass parsed and validated at the boundary.

:class:`RunConfig` composes the components of :mod:`fedmerge.components` (experiment, data,
partition, model, training, server, results) and the per-method options of
:mod:`fedmerge.options` (by key prefix: ``wsa-*``, ``match-*``, ``np-*``, ``finetune-*``,
``fedma-*``); each part checks its own keys. The defaults are written once, in those classes;
``pyproject.toml`` (``[tool.flwr.app.config]``, the file Flower reads for ``flwr run``) repeats
them for Flower and a test keeps the two equal.
Keys use Flower's spelling (``num-rounds``); fields use Python's (``num_rounds``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .components import (
    COMPONENTS,
    TRAINING_KEYS,
    DataOptions,
    ExperimentOptions,
    ModelOptions,
    PartitionOptions,
    ResultsOptions,
    ServerOptions,
    TrainingOptions,
    training_defaults,
)
from .config_values import ConfigValue, coerce, load_toml, parse_cli_value, parse_overrides
from .errors import ConfigError
from .options import FedMAOptions as _FEDMA
from .options import FineTuneOptions as _FINETUNE
from .options import MatchOptions as _MATCH
from .options import NPOptions as _NP
from .options import WSAOptions as _WSA

__all__ = [  # value parsing lives in config_values; re-exported here, its users' one import
    "ConfigValue",
    "MethodKeys",
    "RunConfig",
    "config_keys",
    "field_to_key",
    "key_to_field",
    "load_toml",
    "parse_cli_value",
    "parse_overrides",
]


@dataclass(frozen=True)
class MethodKeys:
    """The per-method keys, flat (``match_method``); defaults, checks: :mod:`fedmerge.options`."""

    # Weight Scope Alignment (fedwsa)
    wsa_lambda: float = _WSA.lam
    wsa_fusion: str = _WSA.fusion
    wsa_reverse: bool = _WSA.reverse
    wsa_layers: str = _WSA.layers
    wsa_merge: str = _WSA.merge
    # neuron-matched averaging (fedmatch; NP Merge and FedWSA matched align with it)
    match_method: str = _MATCH.method
    match_reference: str = _MATCH.reference
    match_iterations: int = _MATCH.iterations
    match_beta: float | str = _MATCH.beta  # a number in [0, 1], or "auto" (chosen on the proxy)
    match_beta_criterion: str = _MATCH.beta_criterion
    match_bn_repair: bool = _MATCH.bn_repair
    match_max_sweeps: int = _MATCH.max_sweeps
    match_sites: str = _MATCH.sites
    # NP Merge (fednpmerge)
    np_form: str = _NP.form
    np_align: str = _NP.align
    np_init: str = _NP.init
    np_params: str = _NP.params
    np_lr: float = _NP.lr
    np_epochs: int = _NP.epochs
    np_batch_size: int = _NP.batch_size
    np_holdout: float = _NP.holdout
    np_patience: int = _NP.patience
    np_bn_mode: str = _NP.bn_mode
    # server fine-tuning on the proxy slice (fedavg-ft)
    finetune_budget: str = _FINETUNE.budget
    finetune_epochs: int = _FINETUNE.epochs
    finetune_lr: float = _FINETUNE.lr
    # FedMA's layer-by-layer matched averaging (fedma)
    fedma_sigma: float = _FEDMA.sigma
    fedma_sigma0: float = _FEDMA.sigma0
    fedma_gamma: float = _FEDMA.gamma
    fedma_iterations: int = _FEDMA.iterations
    fedma_retrain_epochs: int = _FEDMA.retrain_epochs
    fedma_grow: bool = _FEDMA.grow
    fedma_max_width: int = _FEDMA.max_width
    fedma_one_shot: bool = _FEDMA.one_shot


#: The per-method options classes whose keys :class:`MethodKeys` holds.
METHOD_OPTIONS = (_WSA, _MATCH, _NP, _FINETUNE, _FEDMA)


# Field order is the reverse of the bases' (dataclasses collect fields base-first): keys come
# in COMPONENTS order, the method keys before the results'.
@dataclass(frozen=True)
class RunConfig(
    ResultsOptions,
    MethodKeys,
    ServerOptions,
    TrainingOptions,
    ModelOptions,
    PartitionOptions,
    DataOptions,
    ExperimentOptions,
):
    """Every setting of a fedmerge run: the components' keys, flat as Flower's run-config.

    See ``pyproject.toml`` for the meaning of each key, :mod:`fedmerge.components` and
    :mod:`fedmerge.options` for the parts and their checks.
    """

    def __post_init__(self) -> None:
        TrainingOptions.resolve(self)  # lr / batch-size / local-epochs = 0: the dataset's
        for component in COMPONENTS:
            component.check(self)  # each names its own keys when wrong
        for options in METHOD_OPTIONS:
            options.check_run(self)
        for component in COMPONENTS:
            component.check_run(self)

    # -- conversions -------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, base: RunConfig | None = None) -> RunConfig:
        """Build a config from run-config keys (``num-rounds``), over ``base`` or the defaults.

        Values may already be typed (TOML, Flower) or be strings (``key=value`` on a command
        line). Unknown keys and values of the wrong type raise :class:`ConfigError`.
        """
        types = {f.name: f.type for f in fields(cls)}
        changes: dict[str, Any] = {}
        for key, value in values.items():
            name = key_to_field(key)
            if name not in types:
                close = difflib.get_close_matches(key, config_keys(), n=3)
                hint = f"did you mean {', '.join(close)}?" if close else "see pyproject.toml"
                raise ConfigError(key, value, "a known run-config key", hint)
            changes[name] = coerce(key, value, types[name])
        return (base or cls()).replace(**changes)

    def to_mapping(self) -> dict[str, ConfigValue]:
        """The config as run-config keys, the form Flower's ``--run-config`` takes."""
        return {field_to_key(f.name): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again).

        A new ``dataset`` brings its own training defaults for the keys of
        :data:`TRAINING_KEYS` that are not changed too and still hold the old dataset's.
        """
        if "dataset" in changes and changes["dataset"] != self.dataset:
            old = training_defaults(self.dataset)
            for name in TRAINING_KEYS:
                if name not in changes and getattr(self, name) == getattr(old, name):
                    changes[name] = 0
        return dataclasses.replace(self, **changes)

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        """``mlp-hidden`` parsed into layer sizes."""
        from .models import parse_hidden

        return parse_hidden(self.mlp_hidden)


def key_to_field(key: str) -> str:
    """``num-rounds`` -> ``num_rounds``."""
    return key.replace("-", "_")


def field_to_key(name: str) -> str:
    """``num_rounds`` -> ``num-rounds``."""
    return name.replace("_", "-")


def config_keys() -> list[str]:
    """All run-config keys, in declaration order."""
    return [field_to_key(f.name) for f in fields(RunConfig)]
