"""examples/quickstart-fedmerge: a Flower user's own app with fedmerge's strategies.

The example is documentation: a Flower PyTorch quickstart whose only fedmerge code is the
strategy (``fedmerge.strategies``), the options (``*.from_run_config``) and one line in the
ClientApp (``fedmerge.client_side.loss_terms``). These tests keep it that way, and run it on both
engines a user has: Flower's simulation engine (``flwr run``, Ray) and fedmerge's in-process
engine (``fedmerge simulate``), which must give the same accuracies.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from fedmerge.engine.flower import _processes_mentioning, flower_env, free_ports, stop_superlink

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "quickstart-fedmerge"
PACKAGE = APP / "quickstart_fedmerge"
BIN = Path(sys.executable).parent
#: The only fedmerge modules a user's app needs.
PUBLIC = {"fedmerge.strategies", "fedmerge.client_side", "fedmerge.options", "fedmerge.npmerge"}
#: Small settings: 4 nodes, 2 rounds, 1 local epoch, 2000 training samples in all.
SMALL = {
    "num-server-rounds": 2,
    "local-epochs": 1,
    "max-train-samples": 2000,
    "proxy-size": 200,
}


def _overrides(values: dict) -> str:
    """``--run-config`` text (TOML values) for ``values``."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


@pytest.fixture
def mnist_root(shared_data_root: Path) -> Path:
    """The shared data folder, when it holds MNIST in torchvision's layout."""
    if not (shared_data_root / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found in {shared_data_root}/MNIST/raw (torchvision layout)")
    return shared_data_root


def _fedmerge_imports(path: Path) -> set[str]:
    """The fedmerge modules a source file imports (``import x`` and ``from x import y``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n == "fedmerge" or n.startswith("fedmerge.")}
    return found


def test_example_imports_only_public_fedmerge_modules():
    sources = sorted(PACKAGE.glob("*.py"))
    assert {p.name for p in sources} >= {"task.py", "client_app.py", "server_app.py"}
    imported = {p.name: _fedmerge_imports(p) for p in sources}
    for name, modules in imported.items():
        # a module is allowed, or an attribute of one (``from fedmerge.client_side import x``)
        bad = {m for m in modules if m not in PUBLIC and m.rpartition(".")[0] not in PUBLIC}
        assert not bad, f"{name} imports fedmerge internals: {sorted(bad)}"
    assert imported["task.py"] == set()  # model, data and training are plain PyTorch
    assert "fedmerge.client_side.loss_terms" in imported["client_app.py"]
    assert "fedmerge.strategies" in imported["server_app.py"]
    # Net is the user's own: no permutation spec for fedmerge to read
    tree = ast.parse((PACKAGE / "task.py").read_text())
    net = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Net")
    assert "permutation_spec" not in {f.name for f in net.body if isinstance(f, ast.FunctionDef)}


def test_pyproject_is_a_flower_app_with_the_documented_keys():
    data = tomllib.loads((APP / "pyproject.toml").read_text())
    assert "fedmerge" in data["project"]["dependencies"]
    app = data["tool"]["flwr"]["app"]
    assert app["publisher"]
    assert app["components"] == {
        "serverapp": "quickstart_fedmerge.server_app:app",
        "clientapp": "quickstart_fedmerge.client_app:app",
    }
    keys = set(app["config"])
    assert keys >= {
        "num-server-rounds", "fraction-train", "local-epochs", "lr", "batch-size", "strategy",
        "data-root", "max-train-samples", "proxy-size", "seed", "results-file", "round-timeout",
    }  # fmt: skip
    assert app["config"]["strategy"] == "fedavg"
    readme = (APP / "README.md").read_text()
    assert "flwr run ." in readme and "fedmerge simulate" in readme


# -- both engines ------------------------------------------------------------------------------
def flwr_run(app: Path, overrides: dict, work: Path, num_supernodes: int = 4) -> float:
    """``flwr run APP`` on Flower's simulation engine (Ray), as a user types it; returns its
    wall time. The detached local SuperLink it starts is stopped afterwards."""
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "flwr"), "run", str(app), "--run-config", _overrides(overrides)]
    cmd += ["--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus=1"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [*cmd, "--stream"],
            cwd=work,
            env=flower_env(home, tuple(free_ports(2))),  # type: ignore[arg-type]
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
        )
    finally:
        stop_superlink(home)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert not _processes_mentioning(str(home))
    return seconds


def fedmerge_simulate(app: Path, overrides: dict, work: Path, num_supernodes: int = 4) -> float:
    """``fedmerge simulate APP`` (the in-process engine), as a user types it; returns its wall
    time, start-up included."""
    cmd = [str(BIN / "fedmerge"), "simulate", str(app), "--num-supernodes", str(num_supernodes)]
    start = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "--run-config", _overrides(overrides), "--quiet"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return seconds


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedmatch", "fedwsa"])
def test_flwr_run_and_fedmerge_simulate_agree(tmp_path, mnist_root, strategy):
    # fedmatch: the server infers Net's permutation structure and aligns the clients;
    # fedwsa: the target scope travels to the user's loop through the ConfigRecord.
    rows, seconds = {}, {}
    for engine, runner in (("flwr", flwr_run), ("simulate", fedmerge_simulate)):
        results = tmp_path / f"{engine}.json"
        overrides = {
            **SMALL,
            "strategy": strategy,
            "data-root": str(mnist_root),
            "results-file": str(results),
        }
        seconds[engine] = runner(APP, overrides, tmp_path)
        rows[engine] = json.loads(results.read_text())
    print(
        f"\n{strategy}: flwr run {seconds['flwr']:.1f} s, fedmerge simulate "
        f"{seconds['simulate']:.1f} s; final accuracy flwr {rows['flwr']['final']['accuracy']:.4f}"
        f", simulate {rows['simulate']['final']['accuracy']:.4f}"
    )
    for engine in rows:
        assert [r["round"] for r in rows[engine]["rounds"]] == [0, 1, 2]
        assert rows[engine]["final"] == rows[engine]["rounds"][-1]
    for a, b in zip(rows["flwr"]["rounds"], rows["simulate"]["rounds"], strict=True):
        # replies are aggregated in arrival order: float sums may differ in the last bits
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=2e-3)
    final = rows["flwr"]["final"]["accuracy"]
    assert final > 0.2  # 10 classes: chance is 0.1
    assert final > rows["flwr"]["rounds"][0]["accuracy"]
    if strategy == "fedwsa":
        sigma = [rows[e]["train"]["2"]["wsa-target-sigma"] for e in rows]
        assert sigma[0] == pytest.approx(sigma[1], rel=1e-4)


@pytest.mark.slow
def test_fedma_runs_the_example_under_both_engines_with_the_same_accuracies(tmp_path, mnist_root):
    """One FedMA round of the example's Net (5 Flower rounds: train, then conv1, conv2, fc1,
    fc2 matched), grown widths loaded back into Net by the example's own ServerApp."""
    rows = {}
    for engine, runner in (("flwr", flwr_run), ("simulate", fedmerge_simulate)):
        results = tmp_path / f"{engine}-fedma.json"
        overrides = {
            **SMALL,
            "num-server-rounds": 5,
            "local-epochs": 2,
            "strategy": "fedma",
            "data-root": str(mnist_root),
            "results-file": str(results),
        }
        runner(APP, overrides, tmp_path)
        rows[engine] = json.loads(results.read_text())
    for a, b in zip(rows["flwr"]["rounds"], rows["simulate"]["rounds"], strict=True):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=2e-3)
    train = rows["simulate"]["train"]
    assert [train[str(r)]["fedma-phase"] for r in range(1, 6)] == [0, 1, 2, 3, 4]
    assert train["5"]["fedma-width-P_fc1"] >= 120  # Net's fc1, possibly grown
    assert rows["flwr"]["final"]["accuracy"] > 0.5


def test_fednpmerge_runs_the_example_in_process(tmp_path, mnist_root):
    from fedmerge.engine.simulate import simulate

    results = tmp_path / "np.json"
    overrides = {
        **SMALL,
        "num-server-rounds": 1,
        "strategy": "fednpmerge",
        "np-epochs": 2,
        "fraction-evaluate": 1.0,  # the example's client-side evaluation runs too
        "data-root": str(mnist_root),
        "results-file": str(results),
    }
    result = simulate(APP, 4, overrides, workers=1)
    assert result.run_config["strategy"] == "fednpmerge"
    rows = json.loads(results.read_text())
    assert [r["round"] for r in rows["rounds"]] == [0, 1]
    assert rows["final"]["accuracy"] > 0.15
    train = rows["train"]["1"]
    assert train["proxy-size"] == 200  # the server's labelled samples, taken from no client
    # the learned coefficients fit the proxy at least as well as the aligned average
    assert train["np-proxy-loss-end"] <= train["np-proxy-loss-start"]
    # np-* keys reach the strategy: np-epochs=2 for each of the 3 pairwise merges of 4 clients
    assert 0 < train["np-epochs"] <= 3 * 2
    evaluate = rows["evaluate"]["1"]
    assert 0.0 <= evaluate["eval-accuracy"] <= 1.0
