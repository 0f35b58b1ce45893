"""Per-method options: one frozen dataclass per method, shared by the run-config and the library.

Each class holds one method's run-config keys under one prefix (``match-*``, ``wsa-*``,
``finetune-*``; NP Merge's ``np-*`` live in :class:`fedmerge.npmerge.NPOptions`), validates
its own values and names the key of a bad one. The defaults are written here once:
:class:`fedmerge.config.RunConfig` takes its ``match_*``, ``wsa_*`` and ``finetune_*`` defaults
from these classes, and a test keeps ``pyproject.toml`` equal to them.

Three ways to build one::

    MatchOptions(method="dual", beta="auto")           # keywords, in a user's ServerApp
    MatchOptions.from_run_config(context.run_config)   # a Flower run-config (keys match-*)
    MatchOptions.from_config(cfg)                      # a fedmerge RunConfig
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError, unknown_name

__all__ = [
    "FineTuneOptions",
    "MatchOptions",
    "Options",
    "WSAOptions",
]

OptionsT = TypeVar("OptionsT", bound="Options")


class Options:
    """What every per-method options class shares: key names, and building from configs.

    Subclasses are frozen dataclasses that set :attr:`PREFIX` (``"match"`` gives the key
    ``match-max-sweeps`` to the field ``max_sweeps``) and, where a key is not the field's name,
    :attr:`KEY_NAMES` (``{"lam": "lambda"}`` gives ``wsa-lambda``).
    """

    PREFIX: ClassVar[str] = ""
    KEY_NAMES: ClassVar[dict[str, str]] = {}

    @classmethod
    def key_of(cls, field: str) -> str:
        """The run-config key of a field: ``max_sweeps`` -> ``match-max-sweeps``."""
        return f"{cls.PREFIX}-{cls.KEY_NAMES.get(field, field).replace('_', '-')}"

    @classmethod
    def keys(cls) -> dict[str, str]:
        """Every run-config key of the class, mapped to its field name, in field order."""
        return {cls.key_of(f.name): f.name for f in fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def split(cls, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split keyword arguments into this class's fields and the rest (e.g. FedAvg's)."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        mine = {k: v for k, v in kwargs.items() if k in names}
        return mine, {k: v for k, v in kwargs.items() if k not in names}

    @classmethod
    def build(cls: type[OptionsT], options: OptionsT | None = None, **changes: Any) -> OptionsT:
        """``options`` (or the defaults) with some fields changed, validated again."""
        base = options if options is not None else cls()
        if not isinstance(base, cls):
            raise TypeError(f"options must be {cls.__name__}, got {type(base).__name__}")
        return replace(base, **changes) if changes else base  # type: ignore[type-var]

    @classmethod
    def from_config(cls: type[OptionsT], cfg: Any) -> OptionsT:
        """The options of a :class:`fedmerge.config.RunConfig` (its fields ``<prefix>_<field>``)."""
        prefix = cls.PREFIX.replace("-", "_")
        return cls(
            **{
                f.name: getattr(cfg, f"{prefix}_{cls.KEY_NAMES.get(f.name, f.name)}")
                for f in fields(cls)  # type: ignore[arg-type]
            }
        )

    @classmethod
    def from_run_config(
        cls: type[OptionsT], run_config: Mapping[str, Any], **changes: Any
    ) -> OptionsT:
        """The options from a Flower run-config (``context.run_config``), keys ``<prefix>-*``.

        Keys of other prefixes are ignored; a key with this prefix that is not one of the
        class's raises :class:`ConfigError` listing the valid ones. Missing keys keep their
        defaults; ``changes`` (field names) win over the run-config.
        """
        known = cls.keys()
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            if not key.startswith(f"{cls.PREFIX}-"):
                continue
            if key not in known:
                raise ConfigError(key, value, f"a {cls.PREFIX}-* key: " + ", ".join(known))
            values[known[key]] = value
        return cls(**(values | changes))


def _number(key: str, value: Any, ok: bool, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not ok:
        raise ConfigError(key, value, allowed)


def _integer(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(key, value, f"an integer >= {low}")


def _flag(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")


@dataclass(frozen=True)
class MatchOptions(Options):
    """Neuron matching before averaging (FedMatch, FedNPMerge's alignment, FedWSA matched).

    Attributes
    ----------
    method : {"weight", "activation", "dual"}
        ``match-method``: Git Re-Basin weight matching, activation correlation, or MuDSC's
        dual-space mix.
    reference : {"global", "largest", "barycenter"}
        ``match-reference``: what clients are aligned to.
    iterations : int
        ``match-iterations``: align-then-average passes.
    beta : float or "auto"
        ``match-beta``: weight-space share of the dual matcher (1 = data-free); ``"auto"``
        chooses it every round on the labelled proxy slice.
    bn_repair : bool
        ``match-bn-repair``: recompute BatchNorm statistics of the merged model on the proxy.
    max_sweeps : int
        ``match-max-sweeps``: coordinate-descent sweeps per matching.
    """

    PREFIX: ClassVar[str] = "match"

    method: str = "weight"
    reference: str = "global"
    iterations: int = 1
    beta: float | str = 0.5
    bn_repair: bool = True
    max_sweeps: int = 100

    def __post_init__(self) -> None:
        from .merging import MATCHER_NAMES, REFERENCES  # torch: imported when used

        if self.method not in MATCHER_NAMES:
            raise unknown_name("match-method", self.method, MATCHER_NAMES)
        if self.reference not in REFERENCES:
            raise unknown_name("match-reference", self.reference, REFERENCES)
        _integer("match-iterations", self.iterations, 1)
        if self.beta != "auto":
            _number(
                "match-beta",
                self.beta,
                isinstance(self.beta, int | float) and 0 <= self.beta <= 1,
                "a number in [0, 1], or auto (chosen each round on the proxy slice)",
            )
        _flag("match-bn-repair", self.bn_repair)
        _integer("match-max-sweeps", self.max_sweeps, 1)

    @property
    def auto_beta(self) -> bool:
        """The dual matcher chooses beta on the proxy slice."""
        return self.method == "dual" and self.beta == "auto"

    @property
    def needs_data(self) -> bool:
        """The matcher reads activations (needs proxy inputs)."""
        return self.method == "activation" or (
            self.method == "dual" and (self.beta == "auto" or float(self.beta) < 1)
        )


@dataclass(frozen=True)
class WSAOptions(Options):
    """Weight Scope Alignment (FedWSA).

    Attributes
    ----------
    lam : float
        ``wsa-lambda``: weight of the clients' scope regularizer.
    fusion : {"moment", "mean", "global", "fixed"}
        ``wsa-fusion``: how the clients' scopes become the next target.
    reverse : bool
        ``wsa-reverse``: clients use ``KL(target || current)``.
    layers : {"conv-linear", "all"}
        ``wsa-layers``: which tensors have a scope.
    merge : {"average", "matched"}
        ``wsa-merge``: aggregate by the weighted average, or neuron-matched averaging with the
        ``match-*`` options.
    """

    PREFIX: ClassVar[str] = "wsa"
    KEY_NAMES: ClassVar[dict[str, str]] = {"lam": "lambda"}

    lam: float = 0.01
    fusion: str = "moment"
    reverse: bool = False
    layers: str = "conv-linear"
    merge: str = "average"

    def __post_init__(self) -> None:
        from .merging import MERGES
        from .scopes import FUSION_RULES, LAYER_SETS

        _number(
            "wsa-lambda",
            self.lam,
            isinstance(self.lam, int | float) and math.isfinite(self.lam) and self.lam >= 0,
            "a number >= 0",
        )
        if self.fusion not in FUSION_RULES:
            raise unknown_name("wsa-fusion", self.fusion, FUSION_RULES)
        _flag("wsa-reverse", self.reverse)
        if self.layers not in LAYER_SETS:
            raise unknown_name("wsa-layers", self.layers, LAYER_SETS)
        if self.merge not in MERGES:
            raise unknown_name("wsa-merge", self.merge, MERGES)


@dataclass(frozen=True)
class FineTuneOptions(Options):
    """FedAvg fine-tuned on the server's proxy slice (the control for NP Merge).

    Attributes
    ----------
    epochs : int
        ``finetune-epochs``: SGD epochs over the proxy slice each round.
    lr : float
        ``finetune-lr``: its learning rate.
    """

    PREFIX: ClassVar[str] = "finetune"

    epochs: int = 1
    lr: float = 0.01

    def __post_init__(self) -> None:
        _integer("finetune-epochs", self.epochs, 1)
        _number(
            "finetune-lr",
            self.lr,
            isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0,
            "a number > 0",
        )
