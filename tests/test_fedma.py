"""Strategy ``fedma``: FedMA's protocol on fedmerge's runs (phases, frozen prefixes, grown
models, dropped clients, workers, resume)."""

from __future__ import annotations

import copy

import pytest
import torch
from fedmerge.clients.client_app import app as client_app
from fedmerge.strategies.registry import build_strategy
from flwr.app import ArrayRecord, Context, Message

from fedmerge.config import RunConfig
from fedmerge.engine.local import LocalGrid, set_server_identity
from fedmerge.errors import ConfigError
from fedmerge.federation import DataSpec, load_data, make_model
from fedmerge.fedma import fedma_widths, fit_model
from fedmerge.results import MODEL_FILE, read_metrics
from fedmerge.runner import run
from fedmerge.training import evaluate

FAST = {
    "strategy": "fedma",
    "num-clients": 4,
    "model": "cnn",
    "local-epochs": 10,  # competent clients: FedMA matches what they learnt
    "lr": 0.02,  # at the digits default 0.05 the grown model's second round diverges
    "max-train-samples": 800,
    "fraction-evaluate": 0.0,
}
PHASES = 5  # cnn: the train phase and one per hidden layer (conv1, conv2, fc1, fc2)


def _cfg(tmp_path, name: str = "run", **over) -> RunConfig:
    values = {**FAST, "num-rounds": 2 * PHASES, "output-dir": str(tmp_path), "run-name": name}
    values.update(over)
    return RunConfig.from_mapping(values)


def _comparable(rows: list[dict]) -> list[dict]:
    timing = ("time", "seconds")
    return [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rows]


def test_a_fedma_run_reports_every_phase_and_saves_its_grown_model(tmp_path):
    rows = read_metrics(run(_cfg(tmp_path), "local"))
    spec = make_model(_cfg(tmp_path), load_data(DataSpec.of(_cfg(tmp_path)))).permutation_spec()
    assert [r["fedma-phase"] for r in rows[1:]] == list(range(PHASES)) * 2
    assert [r["fedma-layer"] for r in rows[1:]] == [1, 2, 3, 4, 0] * 2
    for row in rows[1:]:
        assert row["fedma-clients"] == 4 and row["fedma-dropped"] == 0
        assert row["fedma-mb-down"] > 0 and row["fedma-mb-up"] > 0
        assert all(row[f"fedma-width-{perm}"] >= spec.perms[perm].size for perm in spec.perms)
    matching = [r for r in rows[1:] if r["fedma-layer"] > 0]
    assert all(r["fedma-units-matched"] > 0 and r["fedma-units-new"] >= 0 for r in matching)
    assert sum(r["fedma-units-new"] for r in matching) > 0  # the global model grew
    # The central accuracy is the last complete model's: it moves only when a round completes.
    accuracy = [r["test-accuracy"] for r in rows]
    assert accuracy[1:PHASES] == [accuracy[0]] * (PHASES - 1)
    assert accuracy[2 * PHASES] > 0.6
    # model.pt holds the grown model; a registry model fits it and scores what was recorded.
    state = torch.load(tmp_path / "run" / MODEL_FILE, weights_only=True)
    cfg = _cfg(tmp_path)
    data = load_data(DataSpec.of(cfg))
    widths = fedma_widths(spec, state)
    assert widths == {p: rows[-1][f"fedma-width-{p}"] for p in spec.perms}
    model = fit_model(make_model(cfg, data), state)
    _, acc = evaluate(model, data.x_test, data.y_test)
    assert acc == pytest.approx(rows[-1]["test-accuracy"], abs=1e-6)


def test_fixed_width_keeps_every_layer(tmp_path):
    rows = read_metrics(run(_cfg(tmp_path, **{"fedma-grow": False}), "local"))
    spec = make_model(_cfg(tmp_path), load_data(DataSpec.of(_cfg(tmp_path)))).permutation_spec()
    for row in rows[1:]:
        assert all(row[f"fedma-width-{p}"] == spec.perms[p].size for p in spec.perms)
        assert row.get("fedma-units-new", 0) == 0
    assert rows[-1]["test-accuracy"] > 0.6


class Recording:
    """A ClientApp that records each train instruction and reply; optionally it raises for a
    partition in a round, or changes a frozen entry before replying."""

    def __init__(self, fail: tuple[int, int] | None = None, tamper: int | None = None) -> None:
        self.calls: list[tuple[Message, Message]] = []
        self.fail, self.tamper = fail, tamper

    def __call__(self, message: Message, context: Context) -> Message:
        config = message.content.config_records["config"]
        pid, rnd = int(context.node_config["partition-id"]), int(config["server-round"])
        if self.fail == (pid, rnd):
            raise RuntimeError(f"partition {pid} fails in round {rnd}")
        reply = client_app(message, context)
        frozen = [n for n in str(config.get("fedma-frozen", "")).split(",") if n]
        if self.tamper == pid and frozen:
            arrays = reply.content.array_records["arrays"].to_torch_state_dict()
            arrays[frozen[0]] = arrays[frozen[0]] + 1.0
            reply.content.array_records["arrays"] = ArrayRecord(arrays)
        self.calls.append((message, reply))
        return reply


def _start(cfg: RunConfig, app: Recording, rounds: int):
    grid = LocalGrid(app, cfg.to_mapping(), cfg.num_clients)
    set_server_identity(grid.run.run_id)
    initial = ArrayRecord(make_model(cfg, load_data(DataSpec.of(cfg)), seed=cfg.seed).state_dict())
    strategy = build_strategy(cfg)
    return strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, timeout=60)


def test_frozen_layers_come_back_bit_identical_and_the_rest_retrains(tmp_path):
    cfg = _cfg(tmp_path)
    app = Recording()
    _start(cfg, app, PHASES)
    phases = 0
    for message, reply in app.calls:
        frozen = [n for n in str(message.content["config"]["fedma-frozen"]).split(",") if n]
        sent = message.content["arrays"].to_torch_state_dict()
        back = reply.content["arrays"].to_torch_state_dict()
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in sent.items()}
        for name in frozen:
            assert torch.equal(back[name], sent[name]), name
        trained = [n for n in sent if n not in frozen and not torch.equal(back[n], sent[n])]
        assert trained, "nothing above the frozen layers was retrained"
        phases += bool(frozen)
    assert phases == 4 * (PHASES - 1)  # 4 clients in each matching phase


def test_a_reply_that_changed_a_frozen_layer_is_dropped(tmp_path):
    result = _start(_cfg(tmp_path), Recording(tamper=1), PHASES)
    train = result.train_metrics_clientapp
    assert train[1]["fedma-dropped"] == 0  # the train phase freezes nothing
    assert train[2]["fedma-dropped"] == 1 and train[2]["fedma-clients"] == 3
    assert train[3]["fedma-clients"] == 3  # that client left this FedMA round


def test_a_client_missing_from_a_phase_is_counted_and_the_phase_completes(tmp_path):
    cfg = _cfg(tmp_path, **{"num-rounds": 2 * PHASES})
    result = _start(cfg, Recording(fail=(2, 3)), 2 * PHASES)  # partition 2 fails in round 3
    train = result.train_metrics_clientapp
    assert train[3]["missing-replies"] + train[3]["rejected-replies"] == 1
    assert train[3]["fedma-clients"] == 3 and train[3]["fedma-dropped"] == 1
    assert train[4]["fedma-clients"] == 3 and train[5]["fedma-clients"] == 3
    assert train[6]["fedma-clients"] == 4  # back in the next FedMA round
    assert all(train[r]["round-skipped"] == 0 for r in train)


def test_one_and_two_workers_give_the_same_run(tmp_path):
    one = read_metrics(run(_cfg(tmp_path, "one", workers=1), "local"))
    two = read_metrics(run(_cfg(tmp_path, "two", workers=2), "local"))
    assert _comparable(one) == _comparable(two)


def test_fedma_refuses_models_that_are_no_chain(tmp_path):
    for model in ("resnet20", "vit"):
        with pytest.raises(ConfigError, match="model.*fedma"):
            _cfg(tmp_path, model=model)


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_fedma_round_then_resume(tmp_path):
    """Killed in the middle of a FedMA round (mlp with two hidden layers: three phases; the
    checkpoint of round 2 holds the clients' models for phase 3): the resumed run ends with
    the metrics of the uninterrupted one."""
    from test_resume import _kill_mid_run_then_resume

    _kill_mid_run_then_resume(tmp_path, "local", "workers=1", "strategy=fedma", "mlp-hidden=32,24")


def test_the_strategy_state_round_trips_through_a_checkpoint(tmp_path):
    from fedmerge.strategies.checkpoint import (
        from_plain,
        load_strategy_state,
        strategy_state,
        to_plain,
    )

    cfg = _cfg(tmp_path)
    strategy = build_strategy(cfg)
    strategy.phase, strategy.nodes = 2, [7, 9]
    strategy.outbox = {7: {"w": torch.ones(2)}, 9: {"w": torch.zeros(2)}}
    strategy.frozen, strategy.complete = ["conv1.weight"], {"w": torch.arange(3.0)}
    restored = build_strategy(cfg)
    load_strategy_state(restored, from_plain(copy.deepcopy(to_plain(strategy_state(strategy)))))
    assert (restored.phase, restored.nodes, restored.frozen) == (2, [7, 9], ["conv1.weight"])
    assert torch.equal(restored.outbox[9]["w"], torch.zeros(2))
    assert torch.equal(restored.complete["w"], torch.arange(3.0))


def test_a_run_stopped_in_the_middle_of_a_fedma_round_resumes_to_the_same_metrics(
    tmp_path, monkeypatch
):
    """Stopped after round 2 of a three-phase FedMA round (mlp, two hidden layers): the
    checkpoint holds each client's model for phase 3, and the resumed run ends as the whole."""
    from test_resume import comparable, run_interrupted

    from fedmerge.checkpoint import load_checkpoint
    from fedmerge.runner import resume_config

    over = {"model": "mlp", "mlp-hidden": "24,16", "num-rounds": 6}
    full = read_metrics(run(_cfg(tmp_path, "full", **over), "local"))
    run_dir = run_interrupted(monkeypatch, _cfg(tmp_path, "cut", **over), after=2)
    assert load_checkpoint(run_dir).round == 2
    assert [r["fedma-phase"] for r in read_metrics(run_dir)[1:]] == [0, 1]  # mid-round
    resumed = read_metrics(run(resume_config(run_dir), "local"))
    assert [r["fedma-phase"] for r in resumed[1:]] == [0, 1, 2, 0, 1, 2]
    assert comparable(resumed) == comparable(full)


# -- the helpers a user's ClientApp calls ----------------------------------------------------
class _UserNet(torch.nn.Module):
    """A user's chain CNN without a permutation spec."""

    def __init__(self, widths: dict[str, int] | None = None) -> None:
        super().__init__()
        w = {"conv": 6, "fc1": 20, **(widths or {})}
        self.conv = torch.nn.Conv2d(1, w["conv"], 3, padding=1)
        self.fc1 = torch.nn.Linear(w["conv"] * 16, w["fc1"])
        self.fc2 = torch.nn.Linear(w["fc1"], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _instruction(state: dict, **config) -> Message:
    from flwr.app import ConfigRecord, RecordDict

    set_server_identity(1)
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type="train")


def test_fedma_model_rebuilds_grown_widths_and_freezes_the_matched_layers():
    from fedmerge.client_side import fedma_epochs, fedma_metrics, fedma_model

    grown = _UserNet({"conv": 8, "fc1": 25}).state_dict()
    msg = _instruction(grown, **{"fedma-phase": 1, "fedma-frozen": "conv.weight,conv.bias"})
    msg.content.config_records["config"]["fedma-epochs"] = 3
    x = torch.randn(2, 1, 8, 8)
    for net in (
        fedma_model(msg, _UserNet(), example_input=x),  # resized from its inferred spec
        fedma_model(msg, _UserNet(), build=lambda widths: _UserNet(widths)),  # the user's own
    ):
        assert net.fc1.weight.shape == (25, 128) and torch.equal(
            net.fc1.weight, grown["fc1.weight"]
        )
        assert [n for n, p in net.named_parameters() if not p.requires_grad] == [
            "conv.weight",
            "conv.bias",
        ]
        assert net(x).shape == (2, 10)
    with pytest.raises(ValueError, match="FedMA's global model grew"):
        fedma_model(msg, _UserNet())
    assert fedma_epochs(msg, 10) == 3
    labels = torch.tensor([0, 0, 3, 9])
    assert fedma_metrics(msg, labels, 10) == {"fedma-class-counts": [2, 0, 0, 1, 0, 0, 0, 0, 0, 1]}
    plain = _instruction(_UserNet().state_dict(), lr=0.1)  # any other strategy: just loaded
    net = fedma_model(plain, _UserNet())
    assert all(p.requires_grad for p in net.parameters())
    assert fedma_epochs(plain, 10) == 10 and fedma_metrics(plain, labels, 10) == {}


def test_fedma_costs_compares_at_equal_epochs_and_megabytes(tmp_path):
    from fedmerge.bench.fedma_costs import costs, report

    for variant, strategy in (("fedavg", "fedavg"), ("fedma", "fedma")):
        cell = tmp_path / "digits" / "dir" / variant
        run(_cfg(cell, "s0", strategy=strategy, **{"num-rounds": PHASES}), "local")
    fedma = costs(tmp_path / "digits" / "dir" / "fedma" / "s0")
    fedavg = costs(tmp_path / "digits" / "dir" / "fedavg" / "s0", model_mb=0.178)
    # FedMA: 10 epochs x 4 clients in its train phase, 1 retraining epoch x 4 in each other
    assert [c["epochs"] for c in fedma] == [40, 44, 48, 52, 56]
    assert [c["epochs"] for c in fedavg] == [40, 80, 120, 160, 200]
    assert [round(c["mb"], 3) for c in fedavg] == [round(1.424 * r, 3) for r in range(1, 6)]
    assert fedma[-1]["mb"] > fedma[0]["mb"] > 0
    table = report(tmp_path)
    assert table.count("\n") == 3 and "| fedma |" in table and "| fedavg |" in table


def test_one_shot_matches_every_layer_in_the_round_the_clients_trained(tmp_path):
    # Independently initialised clients: the first merge sees models whose units differ, the
    # setting in which FedMA's one-shot matching is published; one Flower round per FedMA round.
    over = {"fedma-one-shot": True, "client-init": "independent", "num-rounds": 2}
    rows = read_metrics(run(_cfg(tmp_path, **over), "local"))
    cfg = _cfg(tmp_path)
    spec = make_model(cfg, load_data(DataSpec.of(cfg))).permutation_spec()
    assert [r["fedma-phase"] for r in rows[1:]] == [0, 0]
    assert [r["fedma-layer"] for r in rows[1:]] == [0, 0]
    first = rows[1]
    assert first["fedma-units-matched"] > 0 and first["fedma-units-new"] > 0
    assert all(first[f"fedma-width-{p}"] >= spec.perms[p].size for p in spec.perms)
    # every round completes a global model: the central loss moves each round
    assert rows[0]["test-loss"] != rows[1]["test-loss"] != rows[2]["test-loss"]
    assert rows[2]["test-accuracy"] > 0.6
