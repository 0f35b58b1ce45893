"""Per-method options: one frozen dataclass per method, shared by the run-config and the library.

Each class holds one method's run-config keys under one prefix (``match-*``, ``wsa-*``,
``finetune-*``, ``np-*``, ``fedma-*``), validates its own values and names the key of a bad one;
a rule between a method's keys and the rest of a run lives in its :meth:`Options.check_run`. The
defaults and the names of each choice are written here once: :class:`fedmerge.config.RunConfig`
takes its ``<prefix>_*`` defaults from these classes, the method modules their names, and a
test keeps ``pyproject.toml`` equal to them. Nothing here imports a method module.

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
    "FedMAOptions",
    "FineTuneOptions",
    "MatchOptions",
    "NPOptions",
    "Options",
    "WSAOptions",
]

#: Matchers of :mod:`fedmerge.matching` (``match-method``).
MATCHER_NAMES: tuple[str, ...] = ("weight", "activation", "dual")
#: What clients are aligned to (``match-reference``; :func:`fedmerge.merging.matched_average`).
REFERENCES: tuple[str, ...] = ("global", "largest", "barycenter")
#: FedWSA's aggregations (``wsa-merge``: :func:`fedmerge.merging.average` or
#: :func:`fedmerge.merging.matched_average`).
WSA_MERGES: tuple[str, ...] = ("average", "matched")
#: Scope fusion rules and layer sets of :mod:`fedmerge.scopes` (``wsa-fusion``, ``wsa-layers``).
FUSION_RULES: tuple[str, ...] = ("moment", "mean", "global", "fixed")
LAYER_SETS: tuple[str, ...] = ("conv-linear", "all")
#: NP Merge's choices (``np-form``, ``np-align``, ``np-init``, ``np-params``, ``np-bn-mode``).
NP_FORMS = ("pairwise", "softmax")
NP_ALIGNS = ("reference", "running")
NP_INITS = ("weights", "uniform")
NP_PARAMS = ("all", "weights")
NP_BN_MODES = ("train", "eval")
#: ``match-sites``: every activation site of a unit space, or its last consumer only.
MATCH_SITES = ("all", "last")
#: How ``match-beta = auto`` scores each candidate (:func:`fedmerge.merging.select_beta`).
BETA_CRITERIA = ("accuracy", "loss")
#: How a fine-tuned control spends the proxy slice's labels: NP Merge's budget, or epochs of SGD.
FINETUNE_BUDGETS = ("np", "epochs")
#: The registry's models whose hidden layers form a chain (what strategy ``fedma`` matches).
FEDMA_MODELS = ("mlp", "cnn", "vgg9")

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
    def check_run(cls, cfg: Any) -> None:
        """Rules between this method's keys and other keys of a RunConfig ``cfg``."""
        cls.from_config(cfg)

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


#: Defaults of the matching keys (match-beta, match-max-sweeps, match-sites), written once:
#: MatchOptions and the keyword defaults of the library's matching functions read them.
DEFAULT_MATCH_BETA = 0.5
DEFAULT_MATCH_MAX_SWEEPS = 100
DEFAULT_MATCH_SITES = "all"


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
        chooses it every round on the labelled proxy slice (MuDSC's grid 0.9, 0.8, ..., 0.1).
    beta_criterion : {"accuracy", "loss"}
        ``match-beta-criterion``: how ``"auto"`` scores each candidate's merge on the proxy
        slice: highest accuracy (MuDSC's code) or lowest cross-entropy.
    bn_repair : bool
        ``match-bn-repair``: recompute BatchNorm statistics of the merged model on the proxy.
    max_sweeps : int
        ``match-max-sweeps``: coordinate-descent sweeps per matching.
    sites : {"all", "last"}
        ``match-sites``: activation matching reads every activation site of a unit space as
        extra samples (``all``), or one site per space, its last consumer, as MuDSC does
        (``last``).
    """

    PREFIX: ClassVar[str] = "match"

    method: str = "weight"
    reference: str = "global"
    iterations: int = 1
    beta: float | str = DEFAULT_MATCH_BETA
    beta_criterion: str = "accuracy"
    bn_repair: bool = True
    max_sweeps: int = DEFAULT_MATCH_MAX_SWEEPS
    sites: str = DEFAULT_MATCH_SITES

    def __post_init__(self) -> None:
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
        if self.beta_criterion not in BETA_CRITERIA:
            raise unknown_name("match-beta-criterion", self.beta_criterion, BETA_CRITERIA)
        _flag("match-bn-repair", self.bn_repair)
        _integer("match-max-sweeps", self.max_sweeps, 1)
        if self.sites not in MATCH_SITES:
            raise unknown_name("match-sites", self.sites, MATCH_SITES)

    @classmethod
    def check_run(cls, cfg: Any) -> None:
        match = cls.from_config(cfg)
        matching = cfg.strategy in ("fedmatch", "fedmatch-ft") or (
            cfg.strategy == "fedwsa" and cfg.wsa_merge == "matched"
        )
        if matching and match.needs_data and cfg.proxy_size == 0:
            raise ConfigError(
                "proxy-size",
                cfg.proxy_size,
                f"> 0 for match-method={match.method} (it matches on the server's proxy slice)",
                "set e.g. proxy-size=500, or use match-method=weight (data-free)",
            )

    @property
    def auto_beta(self) -> bool:
        """The dual matcher chooses beta on the proxy slice."""
        return self.method == "dual" and self.beta == "auto"

    @property
    def fixed_beta(self) -> float:
        """``beta`` as the number a matching reads: ``auto`` is chosen on labelled data
        (:func:`fedmerge.merging.select_beta`) and refused for the dual matcher here; the
        weight and activation matchers do not read beta (the default stands in)."""
        if self.beta != "auto":
            return float(self.beta)
        if self.method == "dual":
            raise ConfigError(
                "match-beta",
                self.beta,
                "a number in [0, 1] here",
                "auto is chosen on labelled data by fedmerge.merging.select_beta",
            )
        return DEFAULT_MATCH_BETA

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
        if self.merge not in WSA_MERGES:
            raise unknown_name("wsa-merge", self.merge, WSA_MERGES)


@dataclass(frozen=True)
class FineTuneOptions(Options):
    """A merge fine-tuned on the server's proxy slice (``fedavg-ft``, ``fedmatch-ft``: the
    controls for NP Merge).

    Attributes
    ----------
    budget : str
        ``finetune-budget``: ``np`` spends NP Merge's label budget (its ``np-*`` optimiser,
        learning rate, batch size, epochs per learning problem times the problems it would
        solve, held-out early stopping; fedmerge.npmerge.finetune); ``epochs`` runs
        ``finetune-epochs`` epochs of SGD at ``finetune-lr``.
    epochs : int
        ``finetune-epochs``: SGD epochs over the proxy slice each round (budget ``epochs``).
    lr : float
        ``finetune-lr``: its learning rate (budget ``epochs``).
    """

    PREFIX: ClassVar[str] = "finetune"

    budget: str = "np"
    epochs: int = 1
    lr: float = 0.01

    def __post_init__(self) -> None:
        if self.budget not in FINETUNE_BUDGETS:
            raise unknown_name("finetune-budget", self.budget, FINETUNE_BUDGETS)
        _integer("finetune-epochs", self.epochs, 1)
        _number(
            "finetune-lr",
            self.lr,
            isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0,
            "a number > 0",
        )


@dataclass(frozen=True)
class FedMAOptions(Options):
    """FedMA's layer-by-layer matched averaging (strategy ``fedma``; fedmerge.strategies.fedma).

    Attributes
    ----------
    sigma : float
        ``fedma-sigma``: variance of a client unit around its global unit (BBP-MAP).
    sigma0 : float
        ``fedma-sigma0``: prior variance of a global unit.
    gamma : float
        ``fedma-gamma``: Beta-Bernoulli process mass (larger: new global units open more
        easily).
    iterations : int
        ``fedma-iterations``: BBP-MAP sweeps per layer.
    retrain_epochs : int
        ``fedma-retrain-epochs``: epochs the clients retrain the layers above the matched ones
        in each matching phase (the train phase uses ``local-epochs``).
    grow : bool
        ``fedma-grow``: client units may open new global units (the global model grows);
        false keeps every layer's width (plain Hungarian matching).
    max_width : int
        ``fedma-max-width``: cap on a layer's units (0: no cap).
    one_shot : bool
        ``fedma-one-shot``: match every hidden layer in the round the clients trained, one
        after another with no retraining between layers, and average the output layer (FedMA's
        one-shot use of BBP-MAP, as PFNM): one Flower round per FedMA round.
    """

    PREFIX: ClassVar[str] = "fedma"

    sigma: float = 1.0
    sigma0: float = 1.0
    gamma: float = 7.0
    iterations: int = 5
    retrain_epochs: int = 1
    grow: bool = True
    max_width: int = 0
    one_shot: bool = False

    def __post_init__(self) -> None:
        for key, value in (
            ("fedma-sigma", self.sigma),
            ("fedma-sigma0", self.sigma0),
            ("fedma-gamma", self.gamma),
        ):
            ok = isinstance(value, int | float) and math.isfinite(value) and value > 0
            _number(key, value, ok, "a number > 0")
        _integer("fedma-iterations", self.iterations, 0)
        _integer("fedma-retrain-epochs", self.retrain_epochs, 1)
        _flag("fedma-grow", self.grow)
        _integer("fedma-max-width", self.max_width, 0)
        _flag("fedma-one-shot", self.one_shot)

    @classmethod
    def check_run(cls, cfg: Any) -> None:
        cls.from_config(cfg)
        if cfg.strategy == "fedma" and cfg.model not in FEDMA_MODELS:
            raise ConfigError(
                "model",
                cfg.model,
                " or ".join(FEDMA_MODELS) + " for strategy fedma",
                hint="FedMA matches a chain of layers one after another; resnet20's residual "
                "stream and vit's attention heads are no chain",
            )


@dataclass(frozen=True)
class NPOptions(Options):
    """NP Merge's hyper-parameters (run-config keys ``np-*``; the module docstring has why).

    Raises
    ------
    ConfigError
        Naming the ``np-*`` key of a bad value.
    """

    PREFIX: ClassVar[str] = "np"

    form: str = "pairwise"  # np-form: pairwise (paper) | softmax (N-way, our extension)
    align: str = "reference"  # np-align: reference (match-reference) | running (pairwise)
    init: str = "weights"  # np-init: weights (data-size shares) | uniform (a = 0)
    params: str = "all"  # np-params: all floating parameters | weights (>= 2-D) only
    lr: float = 1e-2  # np-lr: Adam learning rate of the logits
    epochs: int = 10  # np-epochs: most epochs over the fitting part (0 = no learning)
    batch_size: int = 64  # np-batch-size: samples per Adam step
    holdout: float = 0.2  # np-holdout: share held out for early stopping, in [0, 1)
    patience: int = 3  # np-patience: epochs without held-out improvement before stopping
    bn_mode: str = "train"  # np-bn-mode: train (batch statistics) | eval (repaired stats)

    def __post_init__(self) -> None:
        for key, value, names in (
            ("np-form", self.form, NP_FORMS),
            ("np-align", self.align, NP_ALIGNS),
            ("np-init", self.init, NP_INITS),
            ("np-params", self.params, NP_PARAMS),
            ("np-bn-mode", self.bn_mode, NP_BN_MODES),
        ):
            if value not in names:
                raise unknown_name(key, value, names)
        if self.form == "softmax" and self.align == "running":
            raise ConfigError("np-align", self.align, "reference when np-form=softmax")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("np-lr", self.lr, "a number > 0")
        for name, number, low in (
            ("np-epochs", self.epochs, 0),
            ("np-batch-size", self.batch_size, 1),
            ("np-patience", self.patience, 1),
        ):
            if isinstance(number, bool) or not isinstance(number, int) or number < low:
                raise ConfigError(name, number, f"an integer >= {low}")
        if not (isinstance(self.holdout, int | float) and 0 <= self.holdout < 1):
            raise ConfigError("np-holdout", self.holdout, "a number in [0, 1)")
