"""fedmerge as a Flower app: loaded the way Flower loads it, and run on Flower's own engines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from fedmerge.config import RunConfig
from fedmerge.engine.flower import _processes_mentioning, flower_env
from fedmerge.results import read_metrics
from fedmerge.runner import run

ROOT = Path(__file__).resolve().parents[1]
# Runner-layer modules may import Flower; the library core must not (STYLE.md).
RUNNER_LAYER = {"cli", "runner", "engine", "bench"}


def copy_app(dest: Path) -> Path:
    """What a Flower app bundle holds: the project's sources and pyproject, no install."""
    for name in ("fedmerge", "strategies", "clients"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_library_core_imports_no_flwr():
    package = ROOT / "fedmerge"
    core = sorted(
        "fedmerge."
        + ".".join(p.relative_to(package).with_suffix("").parts).removesuffix(".__init__")
        for p in package.rglob("*.py")
        if p.relative_to(package).parts[0].removesuffix(".py") not in RUNNER_LAYER
        and p.relative_to(package).parts != ("__init__.py",)
    )
    assert {"fedmerge.training", "fedmerge.partitions", "fedmerge.models.vit"} <= set(core)
    code = textwrap.dedent(
        f"""
        import sys, importlib
        for name in {core!r}:
            importlib.import_module(name)
        bad = sorted(m for m in sys.modules if m == "flwr" or m.startswith("flwr."))
        assert not bad, bad
        print("ok", len({core!r}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_components_load_from_a_copy_of_the_project_like_flower(tmp_path):
    app_dir = copy_app(tmp_path / "bundle")
    out_dir = tmp_path / "runs"
    code = textwrap.dedent(
        f"""
        import tomllib, sys
        from pathlib import Path
        from flwr.supercore.object_ref import load_app  # Flower's own loader
        app_dir = Path({str(app_dir)!r})
        pyproject = tomllib.loads((app_dir / "pyproject.toml").read_text())
        comps = pyproject["tool"]["flwr"]["app"]["components"]
        server = load_app(comps["serverapp"], ValueError, app_dir)
        client = load_app(comps["clientapp"], ValueError, app_dir)
        import fedmerge, strategies, clients
        from flwr.serverapp import ServerApp
        from flwr.clientapp import ClientApp
        assert isinstance(server, ServerApp) and isinstance(client, ClientApp)
        for mod in (fedmerge, strategies, clients):
            assert Path(mod.__file__).is_relative_to(app_dir), mod.__file__
        from fedmerge.engine.local import run_apps
        from fedmerge.config import RunConfig
        cfg = RunConfig(num_rounds=1, num_clients=3, model="mlp", mlp_hidden="16",
                        output_dir={str(out_dir)!r}, run_name="bundle")
        run_apps(server, client, cfg.to_mapping(), 3)
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(read_metrics(out_dir / "bundle")) == 2


# -- Flower's simulation engine (Ray): tens of seconds each --------------------------------
FMNIST = {
    "dataset": "fashion-mnist",
    "partition": "dirichlet",
    "partition-beta": 0.5,
    "num-clients": 4,
    "num-rounds": 2,
    "max-train-samples": 2000,
    "model": "cnn",
    "batch-size": 32,
    "lr": 0.01,
    "local-epochs": 2,  # set: fashion-mnist's default is NIID-Bench's 10
    "save-model": False,
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "fedwsa", "fednpmerge"])
def test_flower_engine_gives_the_local_engine_accuracies(
    tmp_path, shared_data_root, strategy, monkeypatch
):
    # fedwsa: the target scope travels in the ConfigRecord through Flower's real runtime;
    # fednpmerge: the server aligns the clients (FedMatch) and learns on its proxy slice.
    # The engine's scratch folder (the staged app its processes name) inside tmp_path: the
    # check below sees this test's processes only, not those of a test running beside it.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rows = {}
    for engine in ("local", "flower"):
        cfg = RunConfig.from_mapping(
            {
                **FMNIST,
                "strategy": strategy,
                "wsa-lambda": 10.0,
                "proxy-size": 200 if strategy == "fednpmerge" else 0,
                "data-root": str(shared_data_root),
                "output-dir": str(tmp_path),
                "run-name": engine,
            }
        )
        # Ray gives each client worker one thread (client-resources-num-cpus=1); the local
        # engine trains in this process: one thread too, so that both compute the same floats
        # (fednpmerge's learned merge amplifies last-bit differences past the tolerance).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            rows[engine] = read_metrics(run(cfg, engine, flower_options={"timeout": 600}))
        finally:
            torch.set_num_threads(threads)
    assert [r["round"] for r in rows["flower"]] == [0, 1, 2]
    for a, b in zip(rows["local"], rows["flower"], strict=True):
        assert a["test-accuracy"] == pytest.approx(b["test-accuracy"], abs=2e-3)
        assert a["test-loss"] == pytest.approx(b["test-loss"], rel=1e-3)
    assert rows["flower"][-1]["test-accuracy"] > rows["flower"][0]["test-accuracy"]
    if strategy == "fedwsa":
        for a, b in zip(rows["local"][1:], rows["flower"][1:], strict=True):
            assert a["wsa-target-sigma"] == pytest.approx(b["wsa-target-sigma"], rel=1e-4)
    assert not _processes_mentioning(str(tmp_path))  # the SuperLink it started is gone


@pytest.mark.slow
def test_plain_flwr_run_in_the_project_folder(tmp_path):
    home = tmp_path / "flwr-home"
    out = tmp_path / "runs"
    overrides = f'num-rounds=1 num-clients=3 model="mlp" output-dir="{out}" run-name="plain"'
    cmd = [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        ".",
        "--run-config",
        overrides,
        "--federation-config",
        "num-supernodes=3 client-resources-num-cpus=1",
        "--stream",
    ]
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=flower_env(home),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        from fedmerge.engine.flower import stop_superlink

        stop_superlink(home)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fedmerge | round 1/1" in proc.stdout
    assert len(read_metrics(out / "plain")) == 2
    assert os.path.exists(out / "plain" / "accuracy.png")


def test_each_flower_run_gets_free_superlink_ports(tmp_path):
    from fedmerge.engine.flower import free_ports, toml_value, write_run_config

    ports = free_ports(2)
    assert len(set(ports)) == 2 and all(1024 <= p < 65536 for p in ports)
    env = flower_env(tmp_path, (ports[0], ports[1]))
    assert env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] == str(ports[0])
    assert env["FLWR_LOCAL_CONTROL_API_PORT"] == str(ports[1])
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_HOME"] == str(tmp_path)
    # the run-config file Flower reads back holds exactly the config's values
    import tomllib

    cfg = RunConfig(data_root='C:\\data "quoted"', lr=1e-5, download=True)
    path = write_run_config(cfg.to_mapping(), tmp_path / "rc.toml")
    assert tomllib.loads(path.read_text()) == cfg.to_mapping()
    assert toml_value(3) == "3" and toml_value(False) == "false"


def test_flower_engine_warns_when_no_superlink_of_its_own_served_the_run(
    tmp_path, monkeypatch, caplog
):
    """`flwr run` on ports another SuperLink holds is served by that one, silently: the engine
    finds none serving its FLWR_HOME afterwards and says so (and is quiet when it finds it)."""
    import logging

    from fedmerge.engine import flower as engine

    app = copy_app(tmp_path / "app")
    cfg = RunConfig.from_mapping({"num-rounds": 1})
    monkeypatch.setattr(engine, "flwr_run_command", lambda *a: [sys.executable, "-c", "1"])
    for found, warned in (([], True), ([12345], False)):
        monkeypatch.setattr(engine, "stop_superlink", lambda home, found=found: found)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=engine.log.name):
            engine.run_flower(cfg, app_dir=app)
        assert ("did not start" in caplog.text) is warned
