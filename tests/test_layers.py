"""The layers of the house: the library core imports no experiment, runner or Flower code, and
no module imports itself back through others (read from the sources, every import counted:
module level, inside functions and under ``TYPE_CHECKING``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedmerge"

#: The library core: data, partitions, models, permutations, matching, merging,
#: NP Merge, scopes, training (one client or many at once), and the small modules they share.
CORE = (
    "datasets",
    "partitions",
    "models",
    "permutations",
    "spec_inference",
    "fedma",
    "matching",
    "merging",
    "npmerge",
    "scopes",
    "training",
    "step",
    "vectorised",
    "options",
    "proxy",
    "client_side",
    "spread",
    "errors",
    "config",
    "federation",
)
#: What the core may not import.
FORBIDDEN = (
    "fedmerge.experiments",
    "fedmerge.bench",
    "fedmerge.engine",
    "fedmerge.strategies",
    "fedmerge.clients",
    "fedmerge.runner",
    "fedmerge.cli",
    "fedmerge.command_config",
    "fedmerge.commands",
    "strategies",
    "clients",
    "flwr",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    nodes = list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)  # submodules
    return out


def _sources(names: tuple[str, ...]) -> list[Path]:
    paths = []
    for name in names:
        if (PACKAGE / name).is_dir():
            paths.extend(sorted((PACKAGE / name).rglob("*.py")))
        else:
            paths.append(PACKAGE / f"{name}.py")
    return paths


def test_the_library_core_imports_no_experiment_runner_strategy_or_flower_code():
    sources = _sources(CORE)
    assert len(sources) > 20
    bad = {
        _module_name(path): sorted(
            name for name in _imports(path) if name.startswith(FORBIDDEN) and name != "fedmerge"
        )
        for path in sources
    }
    assert not {k: v for k, v in bad.items() if v}


def test_no_import_circle_between_fedmerge_modules():
    """Every import counted, in functions too: a circle held open by a lazy, in-function
    import is still a circle a reader has to untangle."""
    paths = {
        _module_name(p): p
        for p in [*PACKAGE.rglob("*.py"), *(ROOT / "strategies").rglob("*.py")]
        if "__pycache__" not in p.parts
    }
    graph = {
        name: {
            target
            for target in _imports(path)
            if target in paths and target != name and not name.startswith(f"{target}.")
        }
        for name, path in paths.items()
    }
    # A package importing its own submodules is a tree, not a circle; everything else counts.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


#: The modules that hold the run-config's checks (no validator imports a method).
VALIDATORS = ("config", "config_values", "components", "options", "errors")
#: Method modules: the code of the methods themselves.
METHODS = ("fedmerge.matching", "fedmerge.merging", "fedmerge.npmerge", "fedmerge.scopes")


def test_no_validator_imports_a_method_module():
    """Every import of the validators counted, in functions too (the lazy ones did, before)."""
    bad = {
        name: sorted(t for t in _imports(PACKAGE / f"{name}.py") if t.startswith(METHODS))
        for name in VALIDATORS
    }
    assert not {k: v for k, v in bad.items() if v}


def test_building_and_checking_every_key_loads_no_method_module():
    """The same, at run time: a RunConfig with every method's keys set (and a bad one refused)
    in a fresh interpreter leaves the method modules unimported."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from fedmerge.config import RunConfig\n"
        "from fedmerge.errors import ConfigError\n"
        "RunConfig(strategy='fedwsa', wsa_merge='matched', match_method='dual', "
        "match_beta='auto', proxy_size=10, np_form='softmax', finetune_epochs=2)\n"
        "for bad in ({'wsa_fusion': 'x'}, {'match_method': 'x'}, {'np_form': 'x'}):\n"
        "    try:\n"
        "        RunConfig(**bad)\n"
        "    except ConfigError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit(f'not refused: {bad}')\n"
        f"print(sorted(m for m in sys.modules if m.startswith({METHODS!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]"
