"""The run-config's components: one frozen dataclass per part of a run, each checking its keys.

:class:`fedmerge.config.RunConfig` is composed of these (it inherits their fields: Flower's
run-config is one flat table of keys) and of the per-method options of :mod:`fedmerge.options`
(keys ``match-*``, ``wsa-*``, ``np-*``, ``finetune-*``). Each component checks only its own keys
and names the key of a bad value; a rule that spans components lives with the component that
needs it, in its :meth:`Component.check_run`, which sees the whole config. The checks import
registries (datasets, partitions, models, sinks), never a method module (matching, merging,
npmerge, scopes).

A component can be built alone (``TrainingOptions(lr=0.1)``) or read out of a config
(``TrainingOptions.of(cfg)``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError, unknown_name
from .sinks import check_log

__all__ = [
    "COMPONENTS",
    "Component",
    "DataOptions",
    "ExperimentOptions",
    "ModelOptions",
    "PartitionOptions",
    "ResultsOptions",
    "ServerOptions",
    "TrainingOptions",
]

ComponentT = TypeVar("ComponentT", bound="Component")

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9._-]*$")


def check(ok: bool, key: str, value: object, allowed: str, hint: str | None = None) -> None:
    """Raise :class:`ConfigError` naming ``key``, ``value`` and what is allowed, unless ``ok``."""
    if not ok:
        raise ConfigError(key, value, allowed, hint)


@dataclass(frozen=True)
class Component:
    """A part of the run-config: frozen fields named as their keys (``num_rounds``)."""

    NAME: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Check this component's own keys."""

    @classmethod
    def check_run(cls, cfg: Any) -> None:
        """Rules between this component's keys and other components' (``cfg``: a RunConfig)."""

    @classmethod
    def of(cls: type[ComponentT], cfg: Any) -> ComponentT:
        """This component's keys read out of a config holding them (a RunConfig)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


#: Strategies that read the server's proxy slice, and what for.
PROXY_USERS = {
    "fedavg-bn": "BatchNorm statistics are recomputed on it",
    "fedavg-ft": "it fine-tunes on the server's proxy slice",
    "fedmatch-ft": "it fine-tunes on the server's proxy slice",
    "fednpmerge": "it learns its coefficients on the server's proxy slice",
}


@dataclass(frozen=True)
class ExperimentOptions(Component):
    """The experiment: seed, rounds, federation size and strategy.

    The strategy name is checked by the ServerApp's registry (it imports Flower) and by the
    command line up front, not here.
    """

    NAME: ClassVar[str] = "experiment"

    seed: int = 0
    num_rounds: int = 20
    num_clients: int = 10
    strategy: str = "fedavg"

    def check(self) -> None:
        check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        check(self.num_rounds >= 1, "num-rounds", self.num_rounds, "an integer >= 1")
        check(self.num_clients >= 1, "num-clients", self.num_clients, "an integer >= 1")

    @classmethod
    def check_run(cls, cfg: Any) -> None:
        why = PROXY_USERS.get(cfg.strategy)
        check(
            why is None or cfg.proxy_size > 0,
            "proxy-size",
            cfg.proxy_size,
            f"> 0 for strategy {cfg.strategy} ({why})",
            "set e.g. proxy-size=500",
        )


@dataclass(frozen=True)
class DataOptions(Component):
    """The dataset, its size, the server's proxy slice and input scaling."""

    NAME: ClassVar[str] = "data"

    dataset: str = "digits"
    data_root: str = "data"
    download: bool = False
    max_train_samples: int = 0
    max_test_samples: int = 0
    validation_size: int = 0
    proxy_size: int = 0
    input_scaling: str = "standard"
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0

    def check(self) -> None:
        from .datasets import DATASETS, INPUT_SCALINGS

        if self.dataset not in DATASETS:
            raise unknown_name("dataset", self.dataset, DATASETS)
        check(
            self.max_train_samples >= 0,
            "max-train-samples",
            self.max_train_samples,
            "0 (all) or more",
        )
        check(
            self.max_test_samples >= 0,
            "max-test-samples",
            self.max_test_samples,
            "0 (all) or more",
        )
        check(
            self.validation_size >= 0,
            "validation-size",
            self.validation_size,
            "0 (evaluate on the test split) or more",
        )
        check(self.proxy_size >= 0, "proxy-size", self.proxy_size, "an integer >= 0")
        if self.input_scaling not in INPUT_SCALINGS:
            raise unknown_name("input-scaling", self.input_scaling, INPUT_SCALINGS)
        check(self.synthetic_alpha >= 0, "synthetic-alpha", self.synthetic_alpha, "a number >= 0")
        check(self.synthetic_beta >= 0, "synthetic-beta", self.synthetic_beta, "a number >= 0")


@dataclass(frozen=True)
class PartitionOptions(Component):
    """How the training split is divided among clients (NIID-Bench's schemes)."""

    NAME: ClassVar[str] = "partition"

    partition: str = "dirichlet"
    partition_beta: float = 0.5
    partition_k: int = 2
    partition_sigma: float = 0.1
    partition_min_size: int = 10

    def check(self) -> None:
        from .partitions import PARTITIONS

        if self.partition not in PARTITIONS:
            raise unknown_name("partition", self.partition, PARTITIONS)
        check(self.partition_beta > 0, "partition-beta", self.partition_beta, "a number > 0")
        check(self.partition_k >= 1, "partition-k", self.partition_k, "an integer >= 1")
        check(self.partition_sigma >= 0, "partition-sigma", self.partition_sigma, "a number >= 0")
        size = self.partition_min_size
        check(size >= 0, "partition-min-size", size, "an integer >= 0")


@dataclass(frozen=True)
class ModelOptions(Component):
    """The model: registry name, width, normalisation, MLP hidden sizes."""

    NAME: ClassVar[str] = "model"

    model: str = "cnn"
    model_width: int = 1
    model_norm: str = "batch"
    mlp_hidden: str = "200,200"

    def check(self) -> None:
        from .models import MODELS, NORMS, parse_hidden

        if self.model not in MODELS:
            raise unknown_name("model", self.model, MODELS)
        check(self.model_width >= 1, "model-width", self.model_width, "an integer >= 1")
        if self.model_norm not in NORMS:
            raise unknown_name("model-norm", self.model_norm, NORMS)
        parse_hidden(self.mlp_hidden)


#: ``client-init``: round 1 starts from the server's model (``global``), or each client from
#: its own seeded initialisation (``independent``: the models the server merges first differ in
#: their units, the regime neuron matching is for).
CLIENT_INITS = ("global", "independent")

#: Training keys whose 0 means "the dataset's default" (``fedmerge datasets`` lists them).
TRAINING_KEYS = ("lr", "batch_size", "local_epochs")


def training_defaults(dataset: str) -> Any:
    """The dataset's training defaults (``DatasetInfo.training``), None for an unknown name."""
    from .datasets import DATASETS

    info = DATASETS.get(dataset)
    return info.training if info is not None else None


@dataclass(frozen=True)
class TrainingOptions(Component):
    """Local training on the clients: optimiser, epochs, device and parallelism.

    ``lr``, ``batch_size`` and ``local_epochs`` at 0 take the dataset's defaults
    (:meth:`resolve`, called by the RunConfig, which knows the dataset).
    """

    NAME: ClassVar[str] = "training"

    local_epochs: int = 0
    batch_size: int = 0
    lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-5
    device: str = "auto"
    vectorise: bool = False
    workers: int = 0
    client_threads: int = 1
    client_init: str = "global"

    def check(self) -> None:
        check(
            self.local_epochs >= 0, "local-epochs", self.local_epochs, "0 (the dataset's) or >= 1"
        )
        check(self.batch_size >= 0, "batch-size", self.batch_size, "0 (the dataset's) or >= 1")
        check(self.lr >= 0, "lr", self.lr, "0 (the dataset's default) or a number > 0")
        check(0 <= self.momentum < 1, "momentum", self.momentum, "a number in [0, 1)")
        check(self.weight_decay >= 0, "weight-decay", self.weight_decay, "a number >= 0")
        ok = bool(_DEVICE_RE.match(self.device))
        check(ok, "device", self.device, "auto, cpu, cuda, cuda:N or mps")
        check(self.workers >= 0, "workers", self.workers, "0 (one per CPU core) or an integer >= 1")
        check(
            self.client_threads >= 0, "client-threads", self.client_threads, "0 (torch's) or >= 1"
        )
        check(
            self.client_threads == 1 or self.workers == 1,
            "client-threads",
            self.client_threads,
            f"1 when workers is not 1 (got workers = {self.workers}): a forked worker process "
            "can train with one intra-op thread only",
        )
        if self.client_init not in CLIENT_INITS:
            raise unknown_name("client-init", self.client_init, CLIENT_INITS)

    @staticmethod
    def resolve(cfg: Any) -> None:
        """Fill ``cfg``'s training keys left at 0 from its dataset's defaults (in place)."""
        defaults = training_defaults(cfg.dataset)
        if defaults is None:  # an unknown dataset: DataOptions names it
            return
        for name in TRAINING_KEYS:
            if getattr(cfg, name) == 0:
                object.__setattr__(cfg, name, getattr(defaults, name))


@dataclass(frozen=True)
class ServerOptions(Component):
    """The server's round: sampling, evaluation, deadline, and the built-in strategies' keys."""

    NAME: ClassVar[str] = "server"

    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_train_clients: int = 2
    eval_batch_size: int = 1024
    round_timeout: float = 0.0
    proximal_mu: float = 0.01
    server_lr: float = 1.0
    server_momentum: float = 0.9
    fedopt_eta: float = 0.01
    fedopt_beta_1: float = 0.9
    fedopt_beta_2: float = 0.99
    fedopt_tau: float = 0.001
    trimmed_beta: float = 0.2
    merge_threads: int = 1

    def check(self) -> None:
        check(
            self.merge_threads >= 0,
            "merge-threads",
            self.merge_threads,
            "an integer >= 0 (0: leave torch's thread setting)",
        )
        ft, fe = self.fraction_train, self.fraction_evaluate
        check(0 < ft <= 1, "fraction-train", ft, "a number in (0, 1]")
        check(0 <= fe <= 1, "fraction-evaluate", fe, "a number in [0, 1]")
        check(
            self.min_train_clients >= 1,
            "min-train-clients",
            self.min_train_clients,
            "an integer >= 1",
        )
        check(self.eval_batch_size >= 1, "eval-batch-size", self.eval_batch_size, "an integer >= 1")
        timeout = self.round_timeout
        allowed = "a number >= 0 (seconds; 0 = Flower's default, 3600)"
        check(timeout >= 0, "round-timeout", timeout, allowed)
        check(self.proximal_mu >= 0, "proximal-mu", self.proximal_mu, "a number >= 0")
        check(self.server_lr > 0, "server-lr", self.server_lr, "a number > 0")
        momentum = self.server_momentum
        check(0 <= momentum < 1, "server-momentum", momentum, "a number in [0, 1)")
        for key in ("fedopt-eta", "fedopt-tau"):
            value = getattr(self, key.replace("-", "_"))
            check(value > 0, key, value, "a number > 0")
        for key in ("fedopt-beta-1", "fedopt-beta-2"):
            value = getattr(self, key.replace("-", "_"))
            check(0 <= value < 1, key, value, "a number in [0, 1)")
        beta = self.trimmed_beta
        check(0 <= beta < 0.5, "trimmed-beta", beta, "a number in [0, 0.5)")

    @classmethod
    def check_run(cls, cfg: Any) -> None:
        check(
            cfg.min_train_clients <= cfg.num_clients,
            "min-train-clients",
            cfg.min_train_clients,
            f"at most num-clients ({cfg.num_clients})",
        )


@dataclass(frozen=True)
class ResultsOptions(Component):
    """Where results go, checkpoint resume, and the results sinks."""

    NAME: ClassVar[str] = "results"

    resume: bool = False
    output_dir: str = "runs"
    run_name: str = ""
    save_model: bool = True
    log: str = "files"  # results sinks, comma separated (fedmerge.sinks.SINKS)

    def check(self) -> None:

        check(bool(self.output_dir), "output-dir", self.output_dir, "a folder path")
        check_log(self.log)
        check(
            bool(_RUN_NAME_RE.match(self.run_name)),
            "run-name",
            self.run_name,
            "letters, digits, '.', '_' and '-' (or empty for an automatic name)",
        )


#: The components of a RunConfig besides the per-method options, in key order.
COMPONENTS: tuple[type[Component], ...] = (
    ExperimentOptions,
    DataOptions,
    PartitionOptions,
    ModelOptions,
    TrainingOptions,
    ServerOptions,
    ResultsOptions,
)
