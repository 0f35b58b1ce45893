"""``fedmerge simulate APP_DIR``: any Flower app on the local engine (no SuperLink, no Ray).

The app folder is read as ``flwr run`` reads it: ``[tool.flwr.app.components]`` names the
ServerApp and the ClientApp (``"package.module:attribute"``), ``[tool.flwr.app.config]`` holds
the run-config defaults, and overrides are parsed with Flower's own ``--run-config`` parser
(TOML values; a key the app does not define is refused). The components are imported with the
app folder first on ``sys.path``, without installing the app, as Flower's runtime does. Then
the ServerApp and the ClientApp run in this process (or the ClientApp in forked worker
processes, ``workers`` > 1) through :func:`fedmerge.engine.local.run_apps`; node ``i`` of
``N`` gets Flower's simulation node config ``{"partition-id": i, "num-partitions": N}``.

Determinism, for a fixed ``seed`` (None seeds nothing, as Flower):

* before the components are imported, Python's ``random``, NumPy's global generator
  (``np.random.seed``) and torch's (``torch.manual_seed``, every device) are seeded with
  ``seed``: module-level model initialisation and the server's draws (Flower's ``FedAvg``
  samples nodes with ``random.sample``) repeat;
* every ClientApp call runs with those three generators seeded from (``seed``, partition id,
  message type, the message's group id, which Flower's strategies set to the round), and the
  generators are put back as they were after the call. A client's randomness is then the same
  whatever worker process runs it and whatever ran before, so ``workers`` does not change the
  results, and client calls do not disturb the server's random stream.

Not controlled: ``np.random.default_rng()`` without a seed, ``PYTHONHASHSEED``, and CUDA's
nondeterministic kernels. Client calls use ``client_threads`` torch threads (default one, as
each worker process does), so that results do not depend on ``workers`` either.

The app's own top-level packages (those its component references name) and every module
loaded from the app folder are imported afresh at each :func:`simulate` call: two apps whose
packages share a name do not see each other's modules, and module-level state does not leak
from one call into the next (each ``flwr run`` starts a new process too).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import random
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, UserConfigValue
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from ..errors import ConfigError, FedmergeError
from .local import FIRST_NODE_ID, run_apps
from .workers import resolve_workers

log = logging.getLogger(__name__)

RunConfigValues = dict[str, UserConfigValue]
#: Overrides: ``{"key": value}``, or Flower's ``--run-config`` strings (``"k=v k2=v2"``, or
#: one ``FILE.toml``).
Overrides = Mapping[str, UserConfigValue] | Sequence[str] | str | None

_OWN_PACKAGE = __name__.split(".")[0]  # fedmerge itself is never re-imported


@dataclass(frozen=True)
class FlowerApp:
    """What ``pyproject.toml`` says about a Flower app.

    Attributes
    ----------
    app_dir : Path
        The app folder (absolute).
    serverapp, clientapp : str
        The component references (``"package.module:attribute"``).
    config : dict
        The run-config defaults of ``[tool.flwr.app.config]``, flattened as Flower flattens
        them (nested tables become ``"table.key"``).
    """

    app_dir: Path
    serverapp: str
    clientapp: str
    config: RunConfigValues


@dataclass
class SimulationResult:
    """What :func:`simulate` ran and how long it took.

    Attributes
    ----------
    seconds : float
        Wall time of the run (the ServerApp's call, workers included; imports excluded).
    run_config : dict
        The fused run-config every node's and the server's ``Context`` carried.
    num_supernodes, workers : int
        Nodes simulated; worker processes used (1: in this process).
    seed : int or None
        The seed (None: nothing seeded).
    node_contexts : list of Context
        Every node's ``Context`` after the run, in partition order (``state`` holds what the
        ClientApp kept there).
    """

    seconds: float
    run_config: RunConfigValues
    num_supernodes: int
    workers: int
    seed: int | None
    node_contexts: list[Context] = field(default_factory=list)


# -- reading the app ----------------------------------------------------------------------
def read_app(app_dir: str | Path) -> FlowerApp:
    """Read the Flower app in ``app_dir`` (its ``pyproject.toml``).

    Raises
    ------
    FedmergeError
        No such folder, no ``pyproject.toml`` (or not TOML), no ``[tool.flwr.app.components]``
        with ``serverapp`` and ``clientapp`` strings, or run-config defaults Flower would
        refuse.
    """
    from flwr.common.config import flatten_dict

    path = Path(app_dir).expanduser()
    if not path.is_dir():
        raise FedmergeError(f"simulate: app folder {path} does not exist (or is not a folder)")
    path = path.resolve()
    pyproject = path / "pyproject.toml"
    if not pyproject.is_file():
        raise FedmergeError(f"simulate: {path} is not a Flower app: it has no pyproject.toml")
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedmergeError(f"simulate: {pyproject} is not valid TOML ({exc})") from None
    app = data.get("tool", {}).get("flwr", {}).get("app")
    components = app.get("components") if isinstance(app, dict) else None
    if not isinstance(components, dict):
        raise FedmergeError(
            f"simulate: {pyproject} has no [tool.flwr.app.components] table; a Flower app "
            'names its apps there: serverapp = "package.module:app", clientapp = "..."'
        )
    _check_like_flwr_run(data, pyproject)
    refs = {}
    for kind in ("serverapp", "clientapp"):
        ref = components.get(kind)
        if not isinstance(ref, str) or not ref.strip():
            raise FedmergeError(
                f"simulate: [tool.flwr.app.components] in {pyproject} has no {kind} "
                f'reference (a string like "package.module:app"); found {ref!r}'
            )
        refs[kind] = ref.strip()
    try:
        defaults = flatten_dict(app.get("config") or {})
    except ValueError as exc:
        raise FedmergeError(f"simulate: [tool.flwr.app.config] in {pyproject}: {exc}") from None
    return FlowerApp(path, refs["serverapp"], refs["clientapp"], defaults)


def _check_like_flwr_run(data: dict[str, Any], pyproject: Path) -> None:
    """Refuse what ``flwr run`` refuses (``[project]`` with ``name`` and ``version``,
    ``[tool.flwr.app]`` with ``publisher``...), with Flower's own reasons."""
    try:
        from flwr.common.config import validate_fields_in_config
    except ImportError:  # pragma: no cover - a Flower without the validator: check [project]
        project = data.get("project")
        errors = [] if isinstance(project, dict) else ["Missing [project] section"]
        errors += [
            f'Property "{key}" missing in [project]'
            for key in ("name", "version")
            if isinstance(project, dict) and key not in project
        ]
    else:
        _, errors, _ = validate_fields_in_config(data)
    if errors:
        raise FedmergeError(
            f"simulate: {pyproject} is not a Flower app that `flwr run` accepts: "
            f"{'; '.join(errors)}. See docs/flower-apps.md ('From a run_simulation script to "
            "an app folder') for the sections an app needs"
        )


def parse_run_config(items: str | Sequence[str]) -> RunConfigValues:
    """Parse ``--run-config`` arguments with Flower's own parser (TOML values).

    ``items``: strings of space-separated ``key=value`` pairs (values in TOML: ``5``,
    ``0.1``, ``true``, ``"text"``), or a single path to a ``.toml`` file.
    """
    import click
    from flwr.common.config import parse_config_args

    args = [items] if isinstance(items, str) else list(items)
    try:
        return dict(parse_config_args(args))
    except click.ClickException as exc:
        raise FedmergeError(f"--run-config: {exc.format_message()}") from None
    except (ValueError, OSError) as exc:
        raise FedmergeError(f"--run-config: {exc}") from None


def fuse_run_config(app: FlowerApp, overrides: Overrides = None) -> RunConfigValues:
    """The app's run-config defaults with ``overrides`` applied, as Flower fuses them.

    Raises
    ------
    ConfigError
        An override names a key that ``[tool.flwr.app.config]`` does not define (Flower's
        SuperLink refuses such a run too); the message lists the valid keys.
    """
    from flwr.common.config import flatten_dict, fuse_dicts

    if overrides is None:
        values: RunConfigValues = {}
    elif isinstance(overrides, Mapping):
        values = flatten_dict(dict(overrides))
    else:
        values = parse_run_config(overrides)
    unknown = [k for k in values if k not in app.config]
    if unknown:
        valid = ", ".join(sorted(app.config)) or "none: the app defines no run-config"
        raise ConfigError(
            unknown[0],
            values[unknown[0]],
            f"a key of [tool.flwr.app.config] in {app.app_dir / 'pyproject.toml'} ({valid})",
            "unknown run-config key" + ("s: " if len(unknown) > 1 else ": ") + ", ".join(unknown),
        )
    return dict(fuse_dicts(app.config, values))


# -- importing the components ------------------------------------------------------------
def _under(module: Any, path: Path) -> bool:
    """Whether ``module`` was loaded from ``path`` (a package folder) or ``path.py``."""
    file = getattr(module, "__file__", None)
    if not file:
        return False
    try:
        source = Path(file).resolve()
    except (OSError, ValueError):
        return False
    return source.is_relative_to(path) or source == path.with_name(path.name + ".py")


def _top_level_names(app_dir: Path) -> set[str]:
    """Names importable from ``app_dir`` as top-level modules or packages."""
    names = set()
    for entry in app_dir.iterdir():
        if entry.is_dir() and entry.name.isidentifier():
            names.add(entry.name)
        elif entry.suffix == ".py" and entry.stem.isidentifier():
            names.add(entry.stem)
    return names


def _forget_app_modules(app: FlowerApp) -> None:
    """Drop the app's modules from ``sys.modules`` so that they are imported afresh.

    Those of the packages its components name, and those loaded from a top-level module or
    package of the app folder (not those of an environment inside it: ``.venv/...``).
    """
    tops = {ref.partition(":")[0].split(".")[0] for ref in (app.serverapp, app.clientapp)}
    local = _top_level_names(app.app_dir)
    for name, module in list(sys.modules.items()):
        top = name.split(".")[0]
        if top == _OWN_PACKAGE:
            continue
        if top in tops or (top in local and _under(module, app.app_dir / top)):
            del sys.modules[name]


@contextlib.contextmanager
def app_on_sys_path(app_dir: Path) -> Iterator[None]:
    """Put ``app_dir`` first on ``sys.path`` for the block (as Flower does before importing)."""
    entry = str(app_dir)
    before = list(sys.path)
    sys.path[:] = [entry] + [p for p in sys.path if p != entry]
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path[:] = before


def load_component(ref: str, kind: str, app_dir: Path) -> Any:
    """Import ``"package.module:attribute"`` (``app_dir`` must be on ``sys.path`` already).

    Raises
    ------
    FedmergeError
        A malformed reference, or the module fails to import, or lacks the attribute.
    """
    module_name, sep, attributes = ref.partition(":")
    if not sep or not module_name or not attributes:
        raise FedmergeError(
            f'simulate: {kind} = "{ref}" in {app_dir / "pyproject.toml"} is not of the form '
            '"package.module:attribute"'
        )
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of the app is reported
        raise FedmergeError(
            f'simulate: {kind} = "{ref}": importing {module_name} from {app_dir} failed '
            f"({type(exc).__name__}: {exc})"
        ) from exc
    for name in attributes.split("."):
        if not hasattr(target, name):
            raise FedmergeError(
                f'simulate: {kind} = "{ref}": {module_name} ({getattr(target, "__file__", "?")})'
                f" has no attribute {attributes!r}"
            )
        target = getattr(target, name)
    return target


def load_apps(app: FlowerApp) -> tuple[ServerApp, ClientApp]:
    """The app's ServerApp and ClientApp, imported afresh from its folder.

    Raises
    ------
    FedmergeError
        A component cannot be imported, or is not a ``ServerApp`` / ``ClientApp`` (the
        message names the type found).
    """
    _forget_app_modules(app)
    server = load_component(app.serverapp, "serverapp", app.app_dir)
    client = load_component(app.clientapp, "clientapp", app.app_dir)
    for kind, ref, obj, expected in (
        ("serverapp", app.serverapp, server, ServerApp),
        ("clientapp", app.clientapp, client, ClientApp),
    ):
        if not isinstance(obj, expected):
            raise FedmergeError(
                f'simulate: {kind} = "{ref}" is a {type(obj).__module__}.{type(obj).__qualname__}'
                f", not a flwr {expected.__name__}"
            )
    return server, client


def is_legacy(server: ServerApp) -> bool:
    """Whether ``server`` uses Flower's deprecated compatibility form.

    ``ServerApp(config=..., strategy=...)`` or ``ServerApp(server_fn=...)``: no ``@app.main()``
    function. Flower runs it through ``start_grid``, whose client proxies call the grid from
    several threads at once.
    """
    return getattr(server, "_main", None) is None


# -- seeding ------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch's (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global generator apps use
    torch.manual_seed(seed)


def call_seed(seed: int, partition_id: int, message_type: str, group_id: str) -> int:
    """The seed of one ClientApp call: a hash of what identifies it (32 bits)."""
    text = f"{seed}/{partition_id}/{message_type}/{group_id}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


@contextlib.contextmanager
def _kept_random_state() -> Iterator[None]:
    """Put ``random``, NumPy's and torch's generators back as they were after the block."""
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002


class SeededClientApp:
    """A ClientApp whose every call runs with generators seeded by :func:`call_seed`.

    Parameters
    ----------
    client_app : ClientApp
        The app's ClientApp.
    seed : int
        The run's seed.
    """

    def __init__(self, client_app: ClientApp, seed: int) -> None:
        self.client_app, self.seed = client_app, seed

    def __call__(self, message: Message, context: Context) -> Message:
        partition = int(context.node_config.get("partition-id", context.node_id))
        meta = message.metadata
        with _kept_random_state():
            seed_everything(call_seed(self.seed, partition, meta.message_type, meta.group_id))
            return self.client_app(message, context)


# -- running ------------------------------------------------------------------------------
def simulation_workers(requested: int, num_supernodes: int) -> int:
    """Worker processes for a simulation: ``requested``, or for 0 one per CPU core.

    Never more than the nodes; 0 means one on a machine with CUDA (a process forked after
    CUDA is initialised cannot use it; an explicit number is taken as asked).
    """
    if requested < 0:
        raise ConfigError("workers", requested, "0 (one per CPU core) or a number >= 1")
    if requested == 0:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return resolve_workers(0, num_supernodes, device)
    return min(requested, num_supernodes)


def _workers_for(server: ServerApp, ref: str, requested: int, resolved: int) -> int:
    """One worker for a legacy ServerApp (its threads would race on a worker pool)."""
    if resolved <= 1 or not is_legacy(server):
        return resolved
    if requested > 1:
        raise ConfigError(
            "workers",
            requested,
            "1 (or 0, auto) for this app",
            f'serverapp = "{ref}" uses the deprecated ServerApp(config=..., strategy=...) / '
            "server_fn form, whose client proxies call the engine from several threads at "
            "once; the local engine runs it only in this process. Or port it to the Message "
            "API: @app.main() def main(grid, context) with flwr.serverapp.strategy",
        )
    log.warning("%s is a legacy ServerApp: its clients run in this process (workers = 1)", ref)
    return 1


def simulate(
    app_dir: str | Path,
    num_supernodes: int,
    run_config: Overrides = None,
    *,
    workers: int = 0,
    seed: int | None = 0,
    client_threads: int = 1,
) -> SimulationResult:
    """Run the Flower app in ``app_dir`` on the in-process engine.

    Parameters
    ----------
    app_dir : path
        The app folder (``pyproject.toml`` with ``[tool.flwr.app]``).
    num_supernodes : int
        Simulated nodes (>= 1); node ``i`` gets ``{"partition-id": i, "num-partitions": N}``.
    run_config : mapping, str or list of str, optional
        Run-config overrides: ``{"key": value}``, or ``flwr run --run-config`` strings.
    workers : int
        Processes running the ClientApp calls; 0: one per CPU core (at most one per node), 1:
        in this process.
    seed : int or None
        Seeds ``random``, NumPy and torch (module docstring); None: nothing is seeded.
    client_threads : int
        Torch threads of in-process client calls (0: torch's setting). Worker processes use
        one; with one here too, results do not depend on ``workers``.

    Returns
    -------
    SimulationResult

    Raises
    ------
    FedmergeError
        Bad app folder or components, unknown run-config keys, ``num_supernodes`` < 1, or
        ``workers`` > 1 for a legacy ServerApp (:func:`is_legacy`; it runs with one).
        Exceptions of the ServerApp itself propagate unchanged (their traceback points into
        the app).
    """
    if not isinstance(num_supernodes, int) or num_supernodes < 1:
        raise ConfigError("num-supernodes", num_supernodes, "an integer >= 1")
    app = read_app(app_dir)
    config = fuse_run_config(app, run_config)
    n_workers = simulation_workers(workers, num_supernodes)
    with app_on_sys_path(app.app_dir):
        if seed is not None:
            seed_everything(seed)
        server_app, client_app = load_apps(app)
        n_workers = _workers_for(server_app, app.serverapp, workers, n_workers)
        client = client_app if seed is None else SeededClientApp(client_app, seed)
        start = time.perf_counter()
        grid = run_apps(
            server_app,
            client,
            config,
            num_supernodes,
            workers=n_workers,
            client_threads=client_threads,
        )
        seconds = time.perf_counter() - start
    contexts = [grid.context(FIRST_NODE_ID + i) for i in range(num_supernodes)]
    return SimulationResult(seconds, config, num_supernodes, n_workers, seed, contexts)
