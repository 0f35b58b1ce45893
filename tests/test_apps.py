"""The real ServerApp and ClientApp end to end on the local engine (embedded digits data)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from fedmerge.clients.client_app import app as client_app
from fedmerge.strategies.registry import STRATEGIES
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedmerge.config import RunConfig
from fedmerge.federation import DataSpec, client_shard, load_data, make_model
from fedmerge.results import read_metrics
from fedmerge.runner import run

FAST = {"num-rounds": 2, "num-clients": 4, "model": "mlp", "mlp-hidden": "32", "local-epochs": 1}


def cfg_for(tmp_path, **over) -> RunConfig:
    values = {
        **FAST,
        "output-dir": str(tmp_path),
        **{k.replace("_", "-"): v for k, v in over.items()},
    }
    return RunConfig.from_mapping(values)


def test_default_run_writes_the_output_folder(tmp_path):
    cfg = cfg_for(tmp_path, num_rounds=3, model="cnn", num_clients=10)
    seen = []
    run_dir = run(cfg, "local", on_round=seen.append)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "accuracy.png",
        "config.json",
        "metrics.csv",
        "metrics.json",
        "model.pt",
        "scope-spread.png",
    ]
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] == [r["round"] for r in seen]
    for r in rows[1:]:
        assert r["num-clients"] == 10 and r["num-examples"] == 1437
        assert r["round-time"] > 0 and r["train-loss"] > 0
    assert rows[-1]["test-accuracy"] > rows[0]["test-accuracy"]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["config"]["num-rounds"] == 3 and saved["facts"]["grid"] == "LocalGrid"
    import fedmerge  # the results name the code that produced them

    package = str(Path(fedmerge.__file__).resolve().parent)
    assert saved["facts"]["fedmerge-code"].startswith(f"{package} @ ")
    assert saved["facts"]["strategies-code"].split(" @ ")[0].endswith("strategies")
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"round", "test-accuracy", "test-loss", "train-loss", "round-time"} <= set(header)
    state = torch.load(run_dir / "model.pt")
    model = make_model(cfg, load_data(DataSpec.of(cfg)))
    model.load_state_dict(state)  # the final model loads back into the configured architecture


def test_same_seed_same_metrics_other_seed_other_metrics(tmp_path):
    def metrics(seed, name):
        cfg = cfg_for(tmp_path, seed=seed, run_name=name, fraction_train=0.5)
        rows = read_metrics(run(cfg, "local"))
        return [(r["test-accuracy"], r["test-loss"], r.get("train-loss")) for r in rows]

    first, again, other = metrics(3, "a"), metrics(3, "b"), metrics(4, "c")
    assert first == again
    assert first != other


def test_explicit_run_name_never_overwrites_results(tmp_path):
    cfg = cfg_for(tmp_path, run_name="keep", num_rounds=1)
    run_dir = run(cfg, "local")
    before = (run_dir / "metrics.json").read_bytes()
    with pytest.raises(Exception, match="'run-name'.*already holds a run"):
        run(cfg, "local")
    assert (run_dir / "metrics.json").read_bytes() == before


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_builtin_strategy_runs(tmp_path, name):
    # A proxy slice for the strategies that use server data (the others ignore it).
    cfg = cfg_for(tmp_path, strategy=name, num_clients=5, proxy_size=100)
    rows = read_metrics(run(cfg, "local"))
    assert len(rows) == 3
    assert all(0.0 <= r["test-accuracy"] <= 1.0 for r in rows)


def _train_message(
    cfg: RunConfig, config: dict, model: torch.nn.Module | None = None, pid: int = 1
) -> tuple[Message, Context]:
    model = model or make_model(cfg, load_data(DataSpec.of(cfg)), seed=0)
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(config)}
    )
    from fedmerge.engine.local import set_server_identity

    set_server_identity(1)
    msg = Message(content, dst_node_id=1000, message_type="train")
    ctx = Context(
        1,
        1000,
        {"partition-id": pid, "num-partitions": cfg.num_clients},
        RecordDict(),
        cfg.to_mapping(),
    )
    return msg, ctx


def test_client_applies_fedprox_mu_only_when_the_server_sends_it(tmp_path):
    cfg = cfg_for(tmp_path)
    replies = {}
    for mu in (0.0, 5.0):
        msg, ctx = _train_message(cfg, {"server-round": 1, "proximal-mu": mu})
        replies[mu] = client_app(msg, ctx)
    plain, _ = _train_message(cfg, {"server-round": 1})
    no_key = client_app(plain, _)
    a = replies[0.0].content["arrays"].to_torch_state_dict()
    b = replies[5.0].content["arrays"].to_torch_state_dict()
    c = no_key.content["arrays"].to_torch_state_dict()
    start = make_model(cfg, load_data(DataSpec.of(cfg)), seed=0).state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)  # mu = 0 is the same as no FedProx

    def drift(s):
        return sum(((s[k] - start[k]) ** 2).sum().item() for k in s)

    assert drift(b) < drift(a)  # the proximal term holds the client near the global model


def test_client_reply_carries_arrays_and_metrics(tmp_path):
    cfg = cfg_for(tmp_path)
    msg, ctx = _train_message(cfg, {"server-round": 2})
    reply = client_app(msg, ctx)
    metrics = reply.content["metrics"]
    x, _ = client_shard(DataSpec.of(cfg), 1)
    assert metrics["num-examples"] == len(x)
    assert metrics["train-loss"] > 0 and metrics["train-time"] > 0 and metrics["train-steps"] >= 1
    assert set(reply.content["arrays"].keys()) == set(msg.content["arrays"].keys())


def test_client_evaluate_handler(tmp_path):
    cfg = cfg_for(tmp_path, fraction_evaluate=1.0, num_rounds=1)
    rows = read_metrics(run(cfg, "local"))
    assert 0.0 <= rows[1]["client-eval-accuracy"] <= 1.0


def test_missing_partition_id_is_a_clear_error(tmp_path):
    cfg = cfg_for(tmp_path)
    msg, _ = _train_message(cfg, {"server-round": 1})
    ctx = Context(1, 1000, {}, RecordDict(), cfg.to_mapping())
    with pytest.raises(Exception, match="partition-id"):
        client_app(msg, ctx)


def test_a_supernode_may_keep_its_data_at_its_own_path(tmp_path):
    from fedmerge.clients.client_app import _setup

    cfg = cfg_for(tmp_path).replace(dataset="mnist", data_root="/nowhere")
    node = {"partition-id": 1, "num-partitions": 4, "data-root": str(tmp_path / "data")}
    ctx = Context(1, 1000, node, RecordDict(), cfg.to_mapping())
    got, spec, pid = _setup(ctx)
    assert got.data_root == str(tmp_path / "data") and spec.data_root == got.data_root
    assert pid == 1
    plain = Context(
        1, 1000, {"partition-id": 0, "num-partitions": 4}, RecordDict(), cfg.to_mapping()
    )
    assert _setup(plain)[0].data_root == "/nowhere"


def test_independent_client_init_trains_round_one_from_the_clients_own_init(tmp_path):
    """client-init=independent: in round 1 the client ignores the server's arrays and starts
    from its own seeded init (the same for any server model, other for another client); from
    round 2 it trains from the server's arrays like every client."""
    cfg = cfg_for(tmp_path, client_init="independent")
    spec = DataSpec.of(cfg)
    server = make_model(cfg, load_data(spec), seed=0)
    other = make_model(cfg, load_data(spec), seed=123)

    def trained(model, server_round, config=cfg, pid=1):
        msg, ctx = _train_message(config, {"server-round": server_round}, model=model, pid=pid)
        return client_app(msg, ctx).content["arrays"].to_torch_state_dict()

    def equal(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert equal(trained(server, 1), trained(other, 1))  # the server's arrays are not read
    from fedmerge.clients.client_app import _start

    starts = [_start(cfg, spec, pid, 1, _train_message(cfg, {}, model=server)[0]) for pid in (1, 2)]
    assert not equal(*starts)  # each client its own init, neither the server's
    assert not equal(starts[0], server.state_dict())
    shared = cfg_for(tmp_path)  # client-init=global: round 1 starts from the server's arrays
    assert not equal(trained(server, 1, shared), trained(server, 1))
    assert not equal(trained(server, 2), trained(other, 2))  # round 2: the server's arrays
    assert equal(trained(server, 2), trained(server, 2, shared))


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_version_names_the_commit_and_tracked_edits(tmp_path):
    from fedmerge.strategies.server_app import git_version

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert git_version(tmp_path) is None  # not a work tree yet
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    commit = git("rev-parse", "--short=12", "HEAD")
    assert git_version(tmp_path / "pkg") == commit
    (tmp_path / "pkg" / "new.py").write_text("")  # untracked: not an edit of the commit
    assert git_version(tmp_path / "pkg") == commit
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert git_version(tmp_path / "pkg") == f"{commit}-modified"
