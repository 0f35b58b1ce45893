"""``fedmerge simulate APP_DIR``: any Flower app (a tiny one made per test) on the local engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedmerge.engine.simulate import parse_run_config, simulate
from fedmerge.errors import ConfigError, FedmergeError
from fedmerge.results import read_metrics

ROOT = Path(__file__).resolve().parents[1]

PYPROJECT = """\
[project]
name = "tinyapp"
version = "1.0.0"

[tool.flwr.app]
publisher = "tests"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "tinyapp.client_app:app"

[tool.flwr.app.config]
num-rounds = 2
fraction-train = 0.5
lr = 0.5
tag = "default"
out-dir = "unset"
"""

CLIENT = """\
import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from tinyapp.task import make_data, make_model

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = context.node_config["partition-id"]
    n = context.node_config["num-partitions"]
    x, y = make_data(100 + pid, 20 * (pid + 1))
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=context.run_config["lr"])
    for i in torch.randperm(len(y)).split(8):  # global RNG: seeded per call by simulate
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    calls = int(context.state["seen"]["calls"]) + 1 if "seen" in context.state else 1
    context.state["seen"] = ConfigRecord({"partition-id": pid, "num-partitions": n, "calls": calls})
    out = Path(context.run_config["out-dir"]) / f"node-{pid}.json"
    out.write_text(json.dumps({**context.node_config, "tag": context.run_config["tag"]}))
    metrics = MetricRecord({"num-examples": len(y)})
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(reply, reply_to=msg)
"""

TASK = """\
import torch


def make_data(seed, n):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long()


def make_model():
    return torch.nn.Linear(2, 2)  # initialised from torch's global generator
"""

SERVER = """\
import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from tinyapp.task import make_data, make_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    x, y = make_data(99, 200)
    accuracies = {}

    def evaluate(server_round, arrays):
        model = make_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        accuracies[server_round] = acc
        return MetricRecord({"accuracy": acc})

    strategy = FedAvg(fraction_train=cfg["fraction-train"], fraction_evaluate=0.0,
                      min_train_nodes=1, min_available_nodes=1)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()),
                   num_rounds=cfg["num-rounds"], evaluate_fn=evaluate)
    weights = [w.tolist() for w in make_model().state_dict().values()]
    out = {"accuracy": accuracies, "tag": cfg["tag"], "params": weights}
    (Path(cfg["out-dir"]) / "server.json").write_text(json.dumps(out))
"""


def make_app(folder: Path, serverapp: str = "tinyapp.server_app:app", **files: str) -> Path:
    """A tiny Flower app in ``folder`` (package ``tinyapp``); ``files`` replace or add modules."""
    package = folder / "tinyapp"
    package.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT.format(serverapp=serverapp))
    sources = {"__init__": "", "task": TASK, "client_app": CLIENT, "server_app": SERVER, **files}
    for name, text in sources.items():
        (package / f"{name}.py").write_text(textwrap.dedent(text))
    return folder


def outputs(out_dir: Path) -> dict:
    """Everything the app wrote: the server's accuracies and each node's record."""
    return {p.name: json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))}


def run_api(tmp_path: Path, name: str, **kwargs) -> tuple[dict, object]:
    out = tmp_path / name
    out.mkdir()
    kwargs.setdefault("workers", 1)
    overrides = {"out-dir": str(out), **kwargs.pop("overrides", {})}
    result = simulate(tmp_path / "app", kwargs.pop("nodes", 4), overrides, **kwargs)
    return outputs(out), result


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    return make_app(tmp_path / "app")


def test_cli_simulates_an_app_with_flower_style_overrides(app_dir, tmp_path):
    out = tmp_path / "cli"
    out.mkdir()
    cmd = [sys.executable, "-m", "fedmerge.cli", "simulate", str(app_dir)]
    cmd += ["--num-supernodes", "3", "--run-config", f'out-dir="{out}" tag="from-cli"']
    cmd += ["-c", "num-rounds=3", "-c", "fraction-train=1.0", "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "on 3 supernodes (2 workers, seed 0)" in proc.stdout
    got = outputs(out)
    assert set(got) == {"server.json", "node-0.json", "node-1.json", "node-2.json"}
    for i in range(3):
        assert got[f"node-{i}.json"] == {"partition-id": i, "num-partitions": 3, "tag": "from-cli"}
    assert list(got["server.json"]["accuracy"]) == ["0", "1", "2", "3"]
    assert got["server.json"]["tag"] == "from-cli"


def test_cli_refuses_an_unknown_key_naming_it(app_dir, tmp_path):
    cmd = [sys.executable, "-m", "fedmerge.cli", "simulate", str(app_dir)]
    cmd += ["--num-supernodes", "2", "-c", "num-round=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    message = " ".join(proc.stderr.split())
    assert "'num-round'" in message and "[tool.flwr.app.config]" in message
    assert "fraction-train, lr, num-rounds, out-dir, tag" in message


def test_each_node_gets_its_partition_and_keeps_its_context(app_dir, tmp_path):
    got, result = run_api(tmp_path, "nodes", overrides={"fraction-train": 1.0, "tag": "api"})
    for i in range(4):
        assert got[f"node-{i}.json"] == {"partition-id": i, "num-partitions": 4, "tag": "api"}
    seen = [dict(c.state["seen"]) for c in result.node_contexts]
    assert seen == [{"partition-id": i, "num-partitions": 4, "calls": 2} for i in range(4)]
    assert result.run_config["tag"] == "api" and result.run_config["num-rounds"] == 2
    assert result.workers == 1 and result.seconds > 0
    assert got["server.json"]["accuracy"]["2"] > 0.7  # FedAvg trained the model


def test_same_seed_same_results_whatever_the_workers(app_dir, tmp_path):
    # fraction-train 0.5: FedAvg samples 2 of 4 nodes with random.sample each round
    first, _ = run_api(tmp_path, "a", seed=7)
    again, _ = run_api(tmp_path, "b", seed=7)
    forked, result = run_api(tmp_path, "c", seed=7, workers=2)
    other, _ = run_api(tmp_path, "d", seed=8)
    assert result.workers == 2
    assert first == again == forked
    assert len([k for k in first if k.startswith("node-")]) < 4  # some nodes not sampled
    assert other["server.json"] != first["server.json"]


def test_run_config_strings_parse_as_flower_parses_them():
    assert parse_run_config('a=1 b=0.5 c=true d="x y"') == {"a": 1, "b": 0.5, "c": True, "d": "x y"}
    assert parse_run_config(["a=1", "t.k='v'"]) == {"a": 1, "t.k": "v"}
    with pytest.raises(FedmergeError, match="--run-config"):
        parse_run_config("lr=abc")


def test_unknown_keys_are_refused_naming_them(app_dir):
    with pytest.raises(ConfigError) as err:
        simulate(app_dir, 2, "lr=0.1 learning-rate=0.1 rounds=2")
    assert err.value.key == "learning-rate"
    assert "learning-rate, rounds" in str(err.value)
    assert "(fraction-train, lr, num-rounds, out-dir, tag)" in str(err.value)


def _no_pyproject(tmp_path: Path) -> Path:
    (tmp_path / "bare").mkdir()
    return tmp_path / "bare"


def _no_components(tmp_path: Path) -> Path:
    folder = make_app(tmp_path / "nocomp")
    text = (folder / "pyproject.toml").read_text()
    (folder / "pyproject.toml").write_text(text.replace("[tool.flwr.app.components]", "[x]"))
    return folder


def _no_project(tmp_path: Path) -> Path:
    folder = make_app(tmp_path / "noproject")
    text = (folder / "pyproject.toml").read_text()
    (folder / "pyproject.toml").write_text(text.replace('[project]\nname = "tinyapp"', ""))
    return folder


def test_refuses_a_pyproject_without_project_for_flwr_runs_reason(tmp_path):
    """A run_simulation script's folder often lacks [project]; `flwr run` refuses it (Flower's
    own validator, which `flwr run` calls), and so does simulate, with the same reasons."""
    import tomllib

    from flwr.common.config import validate_fields_in_config

    folder = _no_project(tmp_path)
    valid, reasons, _ = validate_fields_in_config(
        tomllib.loads((folder / "pyproject.toml").read_text())
    )
    assert not valid and "Missing [project] section" in reasons
    with pytest.raises(FedmergeError, match="not a Flower app that `flwr run` accepts") as err:
        simulate(folder, 2)
    assert all(reason in str(err.value) for reason in reasons)
    assert "docs/flower-apps.md" in str(err.value)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda t: t / "missing", "does not exist"),
        (_no_pyproject, "has no pyproject.toml"),
        (_no_components, r"no \[tool.flwr.app.components\]"),
        (lambda t: make_app(t / "m", "tinyapp.nothere:app"), "importing tinyapp.nothere"),
        (lambda t: make_app(t / "a", "tinyapp.server_app:nope"), "has no attribute 'nope'"),
        (lambda t: make_app(t / "s", "tinyapp.server_app"), "not of the form"),
        (
            lambda t: make_app(t / "c", "tinyapp.client_app:app"),
            "is a flwr.clientapp.client_app.ClientApp, not a flwr ServerApp",
        ),
        (
            lambda t: make_app(t / "r", server_app="raise RuntimeError('boom')\n"),
            "RuntimeError: boom",
        ),
    ],
)
def test_refusals_name_what_is_wrong(tmp_path, make, match):
    with pytest.raises(FedmergeError, match=match):
        simulate(make(tmp_path), 2)


def test_refuses_fewer_than_one_supernode(app_dir):
    with pytest.raises(ConfigError, match="num-supernodes"):
        simulate(app_dir, 0)


LIFESPAN_SERVER = SERVER.replace(
    "app = ServerApp()\n",
    """app = ServerApp()
EVENTS = []


@app.lifespan()
def lifespan(context):
    EVENTS.append("enter")
    yield
    EVENTS.append("exit")
    (Path(context.run_config["out-dir"]) / "lifespan.json").write_text(json.dumps(EVENTS))
""",
)


def test_serverapp_lifespan_runs_around_main(tmp_path):
    make_app(tmp_path / "app", server_app=LIFESPAN_SERVER)
    got, _ = run_api(tmp_path, "l")
    assert got["lifespan.json"] == ["enter", "exit"]
    assert list(got["server.json"]["accuracy"]) == ["0", "1", "2"]


LEGACY_SERVER = """\
from flwr.server import ServerConfig
from flwr.server.strategy import FedAvg
from flwr.serverapp import ServerApp

app = ServerApp(config=ServerConfig(num_rounds=2),
                strategy=FedAvg(fraction_evaluate=0.0, min_fit_clients=3,
                                min_available_clients=3))
"""

LEGACY_CLIENT = """\
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp


class Client(NumPyClient):
    def __init__(self, pid):
        self.pid = pid

    def fit(self, parameters, config):
        return [p + self.pid for p in parameters], self.pid + 1, {}


def client_fn(context):
    return Client(context.node_config["partition-id"]).to_client()


app = ClientApp(client_fn=client_fn)
"""


def test_legacy_serverapp_runs_in_process_only(tmp_path):
    make_app(tmp_path / "app", server_app=LEGACY_SERVER, client_app=LEGACY_CLIENT)
    _, result = run_api(tmp_path, "auto", nodes=3, workers=0)
    assert result.workers == 1  # auto: the legacy client proxies call the grid from threads
    with pytest.raises(ConfigError, match="deprecated ServerApp"):
        run_api(tmp_path, "two", nodes=3, workers=2)


def test_the_projects_own_app_runs_through_simulate(tmp_path):
    overrides = {
        "num-rounds": 1,
        "num-clients": 3,
        "model": "mlp",
        "mlp-hidden": "16",
        "output-dir": str(tmp_path),
        "run-name": "own",
        "save-model": False,
    }
    result = simulate(ROOT, 3, overrides, workers=1)
    assert result.num_supernodes == 3
    rows = read_metrics(tmp_path / "own")
    assert [r["round"] for r in rows] == [0, 1]
    assert os.path.isfile(tmp_path / "own" / "metrics.json")
