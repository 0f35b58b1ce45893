"""The run configuration: one frozen dataclass parsed and validated at the boundary.

The defaults live in ``pyproject.toml`` (``[tool.flwr.app.config]``), the file Flower reads for
``flwr run``; the field defaults below mirror them (a test keeps the two equal), so that the
``fedmerge`` command and library users get the same values without the project folder.
Keys use Flower's spelling (``num-rounds``); fields use Python's (``num_rounds``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError, unknown_name
from .options import FineTuneOptions as _FINETUNE
from .options import MatchOptions as _MATCH
from .options import WSAOptions as _WSA

# Values Flower accepts in a run-config (``flwr.common.typing.UserConfigValue``).
ConfigValue = bool | int | float | str

PARTITION_SCHEMES = ("iid", "dirichlet", "label-quantity", "quantity-skew", "noise", "natural")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a fedmerge run. See ``pyproject.toml`` for the meaning of each key."""

    # experiment
    seed: int = 0
    num_rounds: int = 20
    num_clients: int = 10
    strategy: str = "fedavg"
    # data
    dataset: str = "digits"
    data_root: str = "data"
    download: bool = False
    max_train_samples: int = 0
    proxy_size: int = 0
    input_scaling: str = "standard"
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    # partition
    partition: str = "dirichlet"
    partition_beta: float = 0.5
    partition_k: int = 2
    partition_sigma: float = 0.1
    partition_min_size: int = 10
    # model
    model: str = "cnn"
    model_width: int = 1
    model_norm: str = "batch"
    mlp_hidden: str = "200,200"
    # local training (0 = the dataset's default: see TRAINING_KEYS)
    local_epochs: int = 0
    batch_size: int = 0
    lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-5
    device: str = "auto"
    vectorise: bool = False
    workers: int = 0
    client_threads: int = 1
    # server
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
    # Weight Scope Alignment (defaults: fedmerge.options.WSAOptions)
    wsa_lambda: float = _WSA.lam
    wsa_fusion: str = _WSA.fusion
    wsa_reverse: bool = _WSA.reverse
    wsa_layers: str = _WSA.layers
    wsa_merge: str = _WSA.merge
    # neuron-matched averaging (fedmatch; defaults: fedmerge.options.MatchOptions)
    match_method: str = _MATCH.method
    match_reference: str = _MATCH.reference
    match_iterations: int = _MATCH.iterations
    match_beta: float | str = _MATCH.beta  # a number in [0, 1], or "auto" (chosen on the proxy)
    match_bn_repair: bool = _MATCH.bn_repair
    match_max_sweeps: int = _MATCH.max_sweeps
    # NP Merge (fednpmerge; the match-* keys align the clients first)
    np_form: str = "pairwise"
    np_align: str = "reference"
    np_init: str = "weights"
    np_params: str = "all"
    np_lr: float = 0.01
    np_epochs: int = 10
    np_batch_size: int = 64
    np_holdout: float = 0.2
    np_patience: int = 3
    np_bn_mode: str = "train"
    # server fine-tuning on the proxy slice (fedavg-ft; defaults: fedmerge.options.FineTuneOptions)
    finetune_epochs: int = _FINETUNE.epochs
    finetune_lr: float = _FINETUNE.lr
    # checkpoint and resume (fedmerge run --resume DIR sets it)
    resume: bool = False
    # results
    output_dir: str = "runs"
    run_name: str = ""
    save_model: bool = True
    log: str = "files"  # results sinks, comma separated (fedmerge.sinks.SINKS)

    def __post_init__(self) -> None:
        _resolve_training(self)
        _validate(self)

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
            changes[name] = _coerce(key, value, types[name])
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
            old = _training_defaults(self.dataset)
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


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read run-config keys from a TOML file.

    Accepts either a flat file of ``key = value`` lines or a ``pyproject.toml`` (whose
    ``[tool.flwr.app.config]`` table is used).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", str(path), "an existing TOML file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", str(path), "valid TOML", str(exc)) from None
    table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    return dict(table) if table is not None else data


def parse_cli_value(text: str) -> ConfigValue:
    """Parse the value of a ``key=value`` argument as TOML, falling back to a bare string.

    ``lr=0.1`` gives a float, ``download=true`` a bool, ``dataset=mnist`` the string.
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, ConfigValue]:
    """Parse ``["key=value", ...]`` (the form of ``flwr run --run-config``) into a dict."""
    out: dict[str, ConfigValue] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(item, item, "key=value pairs, e.g. num-rounds=5")
        out[key.strip()] = parse_cli_value(text.strip())
    return out


# -- validation -------------------------------------------------------------------------
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    if str(type_name) == "float | str":  # a number, or the word "auto"
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str) and isinstance(parse_cli_value(value), str):
            raise ConfigError(key, value, "a number, or auto")
        return _coerce(key, value, "float")
    kind = {"int": int, "float": float, "bool": bool, "str": str}[str(type_name)]
    if isinstance(value, str) and kind is not str:
        value = parse_cli_value(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # nan / inf pass every range check below
                raise ConfigError(key, value, "a finite number")
            return float(value)
    elif isinstance(value, str):
        return value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        # `run-name=2024` or `mlp-hidden=100` arrive as numbers from TOML / Flower.
        return str(value)
    raise ConfigError(key, value, _TYPE_WORDS[kind])


#: Fields whose 0 means "the dataset's default" (``fedmerge datasets`` lists them).
TRAINING_KEYS = ("lr", "batch_size", "local_epochs")


def _training_defaults(dataset: str) -> Any:
    from .datasets import DATASETS

    info = DATASETS.get(dataset)
    return info.training if info is not None else None


def _resolve_training(c: RunConfig) -> None:
    """Fill ``lr``, ``batch-size`` and ``local-epochs`` left at 0 from the dataset's defaults."""
    defaults = _training_defaults(c.dataset)
    if defaults is None:  # an unknown dataset: _validate names it
        return
    for name in TRAINING_KEYS:
        if getattr(c, name) == 0:
            object.__setattr__(c, name, getattr(defaults, name))


def _check(ok: bool, key: str, value: object, allowed: str, hint: str | None = None) -> None:
    if not ok:
        raise ConfigError(key, value, allowed, hint)


def _validate(c: RunConfig) -> None:
    # Names that live in registries of the library core are checked here; the strategy name
    # is checked by the ServerApp (its registry imports Flower) and by the CLI up front.
    from .datasets import DATASETS, INPUT_SCALINGS
    from .models import MODELS, NORMS, parse_hidden

    _check(c.seed >= 0, "seed", c.seed, "an integer >= 0")
    _check(c.num_rounds >= 1, "num-rounds", c.num_rounds, "an integer >= 1")
    _check(c.num_clients >= 1, "num-clients", c.num_clients, "an integer >= 1")
    if c.dataset not in DATASETS:
        raise unknown_name("dataset", c.dataset, DATASETS)
    _check(c.max_train_samples >= 0, "max-train-samples", c.max_train_samples, "0 (all) or more")
    _check(c.proxy_size >= 0, "proxy-size", c.proxy_size, "an integer >= 0")
    if c.input_scaling not in INPUT_SCALINGS:
        raise unknown_name("input-scaling", c.input_scaling, INPUT_SCALINGS)
    _check(c.synthetic_alpha >= 0, "synthetic-alpha", c.synthetic_alpha, "a number >= 0")
    _check(c.synthetic_beta >= 0, "synthetic-beta", c.synthetic_beta, "a number >= 0")
    if c.partition not in PARTITION_SCHEMES:
        raise unknown_name("partition", c.partition, PARTITION_SCHEMES)
    _check(c.partition_beta > 0, "partition-beta", c.partition_beta, "a number > 0")
    _check(c.partition_k >= 1, "partition-k", c.partition_k, "an integer >= 1")
    _check(c.partition_sigma >= 0, "partition-sigma", c.partition_sigma, "a number >= 0")
    _check(c.partition_min_size >= 0, "partition-min-size", c.partition_min_size, "an integer >= 0")
    if c.model not in MODELS:
        raise unknown_name("model", c.model, MODELS)
    _check(c.model_width >= 1, "model-width", c.model_width, "an integer >= 1")
    if c.model_norm not in NORMS:
        raise unknown_name("model-norm", c.model_norm, NORMS)
    parse_hidden(c.mlp_hidden)
    _check(c.local_epochs >= 1, "local-epochs", c.local_epochs, "0 (the dataset's) or >= 1")
    _check(c.batch_size >= 1, "batch-size", c.batch_size, "0 (the dataset's) or >= 1")
    _check(c.lr > 0, "lr", c.lr, "0 (the dataset's default) or a number > 0")
    _check(0 <= c.momentum < 1, "momentum", c.momentum, "a number in [0, 1)")
    _check(c.weight_decay >= 0, "weight-decay", c.weight_decay, "a number >= 0")
    _check(bool(_DEVICE_RE.match(c.device)), "device", c.device, "auto, cpu, cuda, cuda:N or mps")
    _check(c.workers >= 0, "workers", c.workers, "0 (one per CPU core) or an integer >= 1")
    _check(c.client_threads >= 0, "client-threads", c.client_threads, "0 (torch's) or >= 1")
    _check(
        c.client_threads == 1 or c.workers == 1,
        "client-threads",
        c.client_threads,
        f"1 when workers is not 1 (got workers = {c.workers}): a forked worker process can "
        "train with one intra-op thread only",
    )
    _check(0 < c.fraction_train <= 1, "fraction-train", c.fraction_train, "a number in (0, 1]")
    _check(
        0 <= c.fraction_evaluate <= 1,
        "fraction-evaluate",
        c.fraction_evaluate,
        "a number in [0, 1]",
    )
    _check(c.min_train_clients >= 1, "min-train-clients", c.min_train_clients, "an integer >= 1")
    _check(
        c.min_train_clients <= c.num_clients,
        "min-train-clients",
        c.min_train_clients,
        f"at most num-clients ({c.num_clients})",
    )
    _check(c.eval_batch_size >= 1, "eval-batch-size", c.eval_batch_size, "an integer >= 1")
    _check(
        c.round_timeout >= 0,
        "round-timeout",
        c.round_timeout,
        "a number >= 0 (seconds; 0 = Flower's default, 3600)",
    )
    _check(c.proximal_mu >= 0, "proximal-mu", c.proximal_mu, "a number >= 0")
    _check(c.server_lr > 0, "server-lr", c.server_lr, "a number > 0")
    _check(0 <= c.server_momentum < 1, "server-momentum", c.server_momentum, "a number in [0, 1)")
    for key in ("fedopt-eta", "fedopt-tau"):
        value = getattr(c, key_to_field(key))
        _check(value > 0, key, value, "a number > 0")
    for key in ("fedopt-beta-1", "fedopt-beta-2"):
        value = getattr(c, key_to_field(key))
        _check(0 <= value < 1, key, value, "a number in [0, 1)")
    _check(0 <= c.trimmed_beta < 0.5, "trimmed-beta", c.trimmed_beta, "a number in [0, 0.5)")
    _WSA.from_config(c)  # each options class names its own keys when wrong
    _FINETUNE.from_config(c)
    match = _MATCH.from_config(c)
    _check(
        not (c.strategy == "fedavg-bn" and c.proxy_size == 0),
        "proxy-size",
        c.proxy_size,
        "> 0 for strategy fedavg-bn (BatchNorm statistics are recomputed on it)",
        "set e.g. proxy-size=500",
    )
    _check(
        not (c.strategy == "fedavg-ft" and c.proxy_size == 0),
        "proxy-size",
        c.proxy_size,
        "> 0 for strategy fedavg-ft (it fine-tunes on the server's proxy slice)",
        "set e.g. proxy-size=500",
    )
    from .npmerge import NPOptions  # NP Merge: every np-* key, named when wrong

    NPOptions.from_config(c)
    _check(
        not (c.strategy == "fednpmerge" and c.proxy_size == 0),
        "proxy-size",
        c.proxy_size,
        "> 0 for strategy fednpmerge (it learns its coefficients on the server's proxy slice)",
        "set e.g. proxy-size=500",
    )
    matching = c.strategy == "fedmatch" or (c.strategy == "fedwsa" and c.wsa_merge == "matched")
    _check(
        not (matching and match.needs_data and c.proxy_size == 0),
        "proxy-size",
        c.proxy_size,
        f"> 0 for match-method={c.match_method} (it matches on the server's proxy slice)",
        "set e.g. proxy-size=500, or use match-method=weight (data-free)",
    )
    _check(bool(c.output_dir), "output-dir", c.output_dir, "a folder path")
    from .sinks import check_log  # known sink names, their optional packages installed

    check_log(c.log)
    _check(
        bool(_RUN_NAME_RE.match(c.run_name)),
        "run-name",
        c.run_name,
        "letters, digits, '.', '_' and '-' (or empty for an automatic name)",
    )
