"""Bad client replies: validation, the strategies' mixin, the local grid's timeout, faults."""

from __future__ import annotations

import io
import math
import threading
import time

import numpy as np
import pytest
import torch
from fedmerge.clients.client_app import app as client_app
from fedmerge.strategies.registry import STRATEGIES, build_strategy
from fedmerge.strategies.replies import _view
from fedmerge.strategies.server_app import app as server_app
from fedmerge.strategies.validation import (
    ValidatedReplies,
    array_signature,
    filter_replies,
    validate_reply,
    validated,
)
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAdam, FedAvg
from strategy_harness import train_reply

from fedmerge.config import RunConfig
from fedmerge.engine.faults import (
    FAULT_KINDS,
    REPLY_FAULTS,
    Fault,
    FaultyClientApp,
    InjectedFault,
    spoil,
)
from fedmerge.engine.local import FIRST_NODE_ID, LocalGrid, run_apps, set_server_identity
from fedmerge.federation import DataSpec, load_data, make_model
from fedmerge.results import read_metrics
from fedmerge.runner import quiet_flower
from fedmerge.training import evaluate

quiet_flower()  # Flower's INFO lines for every round of every strategy drown the failures


# -- hand-made replies ------------------------------------------------------------------
def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc.weight": torch.randn(3, 2, generator=g),
        "fc.bias": torch.zeros(3),
        "norm.num_batches_tracked": torch.tensor(5),
    }


def _as_arrays(state: dict[str, torch.Tensor]) -> dict[str, Array]:
    return {k: Array(v.numpy()) for k, v in state.items()}


def _instruction(node: int = FIRST_NODE_ID) -> Message:
    set_server_identity(1)
    msg = Message(RecordDict(), dst_node_id=node, message_type="train")
    msg.metadata.__dict__["_message_id"] = f"m{node}"
    return msg


def _reply(instruction: Message, arrays=None, n: int = 10, **metrics) -> Message:
    arrays = arrays if arrays is not None else _state()
    values = {"train-loss": 0.5, "scope-sigma": [0.1, 0.2], **metrics}
    return train_reply(instruction, arrays, n, **values)


#: Each reply fault and a fragment of the reason it must be rejected with.
EXPECTED = {
    "nan": "non-finite",
    "inf": "non-finite",
    "wrong-shape": "the global model's is float32[3, 2]",
    "wrong-dtype": "float64[3, 2]",
    "missing-key": "missing [norm.num_batches_tracked]",
    "extra-key": "unexpected [injected.extra]",
    "truncated-data": "cannot be read",
    "no-arrays": "one ArrayRecord, got 0",
    "renamed-arrays": "the ArrayRecord is under 'model', not 'arrays'",
    "two-array-records": "one ArrayRecord, got 2",
    "no-metrics": "one MetricRecord, got 0",
    "zero-examples": "'num-examples' is 0",
    "negative-examples": "'num-examples' is -5",
    "string-examples": "'num-examples' holds a str",
    "list-examples": "'num-examples' is a list",
    "bool-metric": "holds a bool",
    "string-metric": "holds a str",
    "nan-metric": "not finite",
}


def test_a_healthy_reply_is_valid_against_the_record_its_signature_or_nothing():
    reply = _reply(_instruction())
    reference = ArrayRecord(_state())
    assert validate_reply(reply, reference) is None
    assert validate_reply(reply, array_signature(reference)) is None
    assert validate_reply(reply, None) is None
    assert array_signature(reference)["norm.num_batches_tracked"] == ((), "int64")


@pytest.mark.parametrize("kind", sorted(REPLY_FAULTS))
def test_every_reply_fault_is_rejected_with_its_reason(kind):
    instruction = _instruction()
    bad = spoil(_reply(instruction), instruction, kind)
    reason = validate_reply(bad, ArrayRecord(_state()), array_key="arrays")
    assert reason is not None and EXPECTED[kind] in reason, reason


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"num-examples": 2.5, "steps": [1, 2]}, None),  # float weights and int lists are fine
        ({"num-examples": 2**70}, "outside the int64 range"),
        ({"num-examples": 3, "loss": [0.1, math.inf]}, "'loss' is not finite"),
        ({"examples": 3}, "metrics lack 'num-examples'"),
    ],
)
def test_hand_made_metric_values(metrics, reason):
    reply = Message(
        RecordDict({"arrays": ArrayRecord(_state()), "metrics": MetricRecord(metrics)}),
        reply_to=_instruction(),
    )
    got = validate_reply(reply, ArrayRecord(_state()))
    assert got is None if reason is None else reason in got


def test_an_error_reply_is_rejected_with_the_clients_reason():
    error = Message(Error(2, "RuntimeError: out of memory"), reply_to=_instruction())
    assert "out of memory" in validate_reply(error, ArrayRecord(_state()))


def test_bytes_that_contradict_their_metadata_are_rejected():
    data = io.BytesIO()
    np.save(data, np.zeros((3, 2), dtype=np.float64))
    liar = Array(dtype="float32", shape=(3, 2), stype="numpy.ndarray", data=data.getvalue())
    arrays = {**_as_arrays(_state()), "fc.weight": liar}
    reply = _reply(_instruction(), ArrayRecord(arrays))
    reason = validate_reply(reply, ArrayRecord(_state()))
    assert "holds float64[3, 2] but declares float32[3, 2]" in reason


def test_fortran_ordered_and_integer_arrays_are_read_right():
    weight = np.asfortranarray(np.ones((3, 2), dtype=np.float32))
    ref = ArrayRecord(_state())
    for value, reason in [(1.0, None), (np.inf, "array 'fc.weight' has non-finite values")]:
        weight[2, 1] = value
        state = {**_as_arrays(_state()), "fc.weight": Array(weight)}
        assert validate_reply(_reply(_instruction(), ArrayRecord(state)), ref) == reason


def test_the_finiteness_check_reads_the_message_bytes_without_copying_them():
    array = ArrayRecord(_state())["fc.weight"]
    view = _view(array)
    owner = view
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert owner is array.data and not view.flags.writeable
    np.testing.assert_array_equal(view, array.numpy())


def test_evaluate_replies_need_metrics_only():
    ok = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 4, "eval-accuracy": 0.5})}),
        reply_to=_instruction(),
    )
    assert validate_reply(ok, None, train=False) is None
    assert "one ArrayRecord" in validate_reply(ok, None, train=True)


def test_filter_replies_rejects_replies_that_disagree_with_the_others():
    nodes = [FIRST_NODE_ID + i for i in range(4)]
    replies = [_reply(_instruction(n)) for n in nodes[:2]]
    replies.append(_reply(_instruction(nodes[2]), extra=1.0))  # one more metric key
    replies.append(_reply(_instruction(nodes[3]), **{"scope-sigma": [0.1]}))  # shorter list
    valid, reasons = filter_replies(replies, ArrayRecord(_state()))
    assert valid == replies[:2]
    assert len(reasons) == 2
    assert reasons[0].startswith(f"node {nodes[2]}: metrics differ") and "[extra]" in reasons[0]
    assert reasons[1].startswith(f"node {nodes[3]}:") and "different [scope-sigma]" in reasons[1]


def test_without_a_reference_the_most_common_array_layout_wins():
    other = {**_state(), "fc.bias": torch.zeros(4)}
    replies = [_reply(_instruction(FIRST_NODE_ID + i)) for i in range(2)]
    replies.append(_reply(_instruction(FIRST_NODE_ID + 2), other))
    valid, reasons = filter_replies(replies, None)
    assert valid == replies[:2]
    assert len(reasons) == 1 and "arrays differ" in reasons[0] and "fc.bias" in reasons[0]


# -- the mixin on every strategy ---------------------------------------------------------
def _cfg(name: str = "fedavg", **over) -> RunConfig:
    values = {
        "strategy": name,
        "num-clients": 4,
        "num-rounds": 4,
        "model": "mlp",
        "mlp-hidden": "32",
        "local-epochs": 1,
        "device": "cpu",
        "save-model": False,
        "proxy-size": 100,  # server data for the strategies that use it (others ignore it)
        **over,
    }
    return RunConfig.from_mapping(values)


def _model_arrays(cfg: RunConfig) -> ArrayRecord:
    return ArrayRecord(make_model(cfg, load_data(DataSpec.of(cfg)), seed=0).state_dict())


def _dummy_grid(num_nodes: int = 4) -> LocalGrid:
    grid = LocalGrid(ClientApp(), {}, num_nodes)
    set_server_identity(grid.run.run_id)
    return grid


def _instructions(strategy, arrays: ArrayRecord) -> list[Message]:
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), _dummy_grid()))
    for i, msg in enumerate(messages):
        msg.metadata.__dict__["_message_id"] = f"m{i}"
    return messages


def _trained(msg: Message, shift: float) -> dict[str, torch.Tensor]:
    state = msg.content["arrays"].to_torch_state_dict()
    return {k: v + shift if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_the_registry_puts_the_mixin_first_and_keeps_the_class(name):
    strategy = build_strategy(_cfg(name))
    mro = type(strategy).__mro__
    assert mro[1] is ValidatedReplies and isinstance(strategy, FedAvg)
    assert type(strategy).__name__ == f"Validated{mro[2].__name__}"
    assert validated(mro[2]) is type(strategy)  # one class per strategy, reused


def test_build_strategy_refuses_an_entry_without_validation(monkeypatch):
    monkeypatch.setitem(STRATEGIES, "fedavg", (lambda c: FedAvg(), "plain"))
    with pytest.raises(TypeError, match=r"validated\(FedAvg\)"):
        build_strategy(_cfg())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_bad_replies_are_dropped_counted_and_never_raise(name, caplog):
    cfg = _cfg(name)
    strategy = build_strategy(cfg)
    arrays = _model_arrays(cfg)
    sent = _instructions(strategy, arrays)
    good = [_reply(m, _trained(m, 0.01), n=10 + i) for i, m in enumerate(sent[:2])]
    nan = spoil(_reply(sent[2], _trained(sent[2], 0.0)), sent[2], "nan")
    error = Message(Error(2, "boom"), reply_to=sent[3])
    with caplog.at_level("WARNING"):
        new, metrics = strategy.aggregate_train(1, [good[0], nan, error, good[1]])
    assert new is not None and array_signature(new) == array_signature(arrays)
    assert all(np.isfinite(a).all() for a in new.to_numpy_ndarrays())
    assert (metrics["rejected-replies"], metrics["missing-replies"]) == (2, 0)
    assert metrics["round-skipped"] == 0 and metrics["num-clients"] == 2
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    node = sent[2].metadata.dst_node_id
    assert any(f"node {node}" in w and "non-finite" in w for w in warned)

    # A round where nothing usable comes back: skipped, the model untouched. (Most strategies
    # ask every node again; FedMA's next phase asks the two nodes still in its round.)
    asked = list(strategy.configure_train(2, arrays, ConfigRecord(), _dummy_grid()))
    bad = [spoil(_reply(m, _trained(m, 0.0)), m, "wrong-shape") for m in asked[:3]]
    new, metrics = strategy.aggregate_train(2, bad)
    assert new is None
    missing = len(asked) - len(bad)
    assert dict(metrics) == {
        "rejected-replies": len(bad),
        "missing-replies": missing,
        "round-skipped": 1,
    }
    assert len(asked) == (2 if name == "fedma" else 4)


def test_flowers_fedavg_alone_dies_on_a_reply_that_the_mixin_drops():
    arrays = ArrayRecord(_state())
    sent = _instructions(FedAvg(), arrays)
    replies = [_reply(sent[0]), spoil(_reply(sent[1]), sent[1], "no-metrics")]
    with pytest.raises(InconsistentMessageReplies):
        FedAvg().aggregate_train(1, replies)
    strategy = validated(FedAvg)()
    sent = _instructions(strategy, arrays)
    replies = [_reply(sent[0]), spoil(_reply(sent[1]), sent[1], "no-metrics")]
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is not None and metrics["rejected-replies"] == 1


def test_min_valid_replies_and_a_non_finite_aggregate_skip_the_round():
    arrays = ArrayRecord(_state())
    strategy = validated(FedAvg)()
    strategy.min_valid_replies = 3
    sent = _instructions(strategy, arrays)
    new, metrics = strategy.aggregate_train(1, [_reply(m) for m in sent[:2]])
    assert new is None and metrics["round-skipped"] == 1 and metrics["missing-replies"] == 2

    class Diverging(FedAvg):
        def aggregate_train(self, server_round, replies):
            _, metrics = super().aggregate_train(server_round, replies)
            return ArrayRecord({**_state(), "fc.bias": torch.full((3,), math.nan)}), metrics

    strategy = validated(Diverging)()
    new, metrics = strategy.aggregate_train(1, [_reply(m) for m in _instructions(strategy, arrays)])
    assert new is None and metrics["round-skipped"] == 1 and metrics["rejected-replies"] == 0


def test_fedadam_aggregate_keeps_the_models_dtype():
    arrays = ArrayRecord({"w": torch.zeros(3, 2)})
    replies = {}
    for strategy in (FedAdam(), validated(FedAdam)()):
        sent = _instructions(strategy, arrays)
        out, _ = strategy.aggregate_train(1, [_reply(m, {"w": torch.ones(3, 2)}) for m in sent])
        replies[type(strategy).__name__] = out["w"].dtype
    # Flower 1.41 under NumPy 2 drifts to float64 (a float64 scalar in its Adam step); the
    # mixin casts back, or every float32 reply of the next round would fail the dtype check.
    assert replies == {"FedAdam": "float64", "ValidatedFedAdam": "float32"}


def test_evaluate_replies_that_are_malformed_are_dropped():
    strategy = validated(FedAvg)()
    grid = _dummy_grid(3)
    sent = list(strategy.configure_evaluate(1, ArrayRecord(_state()), ConfigRecord(), grid))
    for i, msg in enumerate(sent):
        msg.metadata.__dict__["_message_id"] = f"e{i}"

    def metrics_reply(msg, **values):
        return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)

    good = metrics_reply(sent[0], **{"num-examples": 5, "eval-accuracy": 0.8})
    bad = spoil(
        metrics_reply(sent[1], **{"num-examples": 5, "eval-accuracy": 0.1}), sent[1], "bool-metric"
    )
    error = Message(Error(2, "boom"), reply_to=sent[2])
    metrics = strategy.aggregate_evaluate(1, [good, bad, error])
    assert metrics["eval-accuracy"] == pytest.approx(0.8)
    assert metrics["rejected-replies"] == 2 and metrics["missing-replies"] == 0
    # Federated evaluation off: nothing sent, nothing to report.
    assert validated(FedAvg)(fraction_evaluate=0.0).aggregate_evaluate(1, []) is None


# -- the local grid's timeout ------------------------------------------------------------
def test_a_client_past_the_timeout_gives_no_reply_and_is_never_overlapped():
    gate, calls, running, peak = threading.Event(), [], [0], [0]
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        calls.append(pid)
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        if pid == 1:
            gate.wait(30)  # a slow client: it keeps the client lock while it works
        running[0] -= 1
        metrics = MetricRecord({"num-examples": 1})
        content = RecordDict({"arrays": msg.content["arrays"], "metrics": metrics})
        return Message(content, reply_to=msg)

    grid = LocalGrid(app, {}, num_nodes=3)
    set_server_identity(grid.run.run_id)
    arrays = ArrayRecord([np.zeros(2, dtype=np.float32)])

    def round_trip(timeout):
        msgs = [  # in partition order, so the test knows who comes after the slow client
            Message(RecordDict({"arrays": arrays}), dst_node_id=node, message_type="train")
            for node in grid.get_node_ids()
        ]
        start = time.perf_counter()
        replies = list(grid.send_and_receive(msgs, timeout=timeout))
        return sorted(r.metadata.src_node_id - FIRST_NODE_ID for r in replies), start

    try:
        got, start = round_trip(0.5)
        # 0 replies; 1 misses its deadline; 2 would overlap the late call of 1: never started.
        assert got == [0] and calls == [0, 1]
        got, _ = round_trip(0.5)  # 1 is still busy and holds the lock: nobody can run
        assert got == [] and calls == [0, 1]
        assert time.perf_counter() - start < 5  # each round waited about its timeout
    finally:
        gate.set()
    for worker in list(grid._busy.values()):  # the late calls of rounds 1 and 2 end
        worker.join(10)
    got, _ = round_trip(5)
    assert got == [0, 1, 2] and calls == [0, 1, 0, 1, 2]
    assert peak[0] == 1  # no two ClientApp calls ever ran at once


# -- injected faults, end to end ---------------------------------------------------------
#: round -> {partition: fault}; round 2 fails everywhere.
PLAN = {
    1: {0: "nan", 1: "raise"},
    2: {0: "wrong-shape", 1: "missing-key", 2: "string-examples", 3: "zero-examples"},
    3: {1: "renamed-arrays", 2: "bool-metric", 3: "truncated-data"},
}


def _faults(plan: dict[int, dict[int, str]]) -> list[Fault]:
    return [Fault(kind, {p}, {r}) for r, hits in plan.items() for p, kind in hits.items()]


class Recorder:
    """``evaluate_fn``: test accuracy and a copy of the global model, per round."""

    def __init__(self, cfg: RunConfig) -> None:
        self.data = load_data(DataSpec.of(cfg))
        self.model = make_model(cfg, self.data)
        self.accuracy: dict[int, float] = {}
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        self.states[server_round] = arrays.to_torch_state_dict()
        self.model.load_state_dict(self.states[server_round])
        _, acc = evaluate(self.model, self.data.x_test, self.data.y_test)
        self.accuracy[server_round] = acc


#: FedMA's matching phases ask only the clients still in its round, so this plan hits it
#: differently; tests/test_fedma.py injects faults into its phases.
@pytest.mark.parametrize("name", sorted(set(STRATEGIES) - {"fedma"}))
def test_every_strategy_survives_injected_faults(name):
    cfg = _cfg(name, **{"fraction-evaluate": 0.0})
    app = FaultyClientApp(client_app, _faults(PLAN))
    grid = LocalGrid(app, cfg.to_mapping(), cfg.num_clients)
    set_server_identity(grid.run.run_id)
    recorder = Recorder(cfg)
    result = build_strategy(cfg).start(
        grid=grid,
        initial_arrays=_model_arrays(cfg),
        num_rounds=cfg.num_rounds,
        timeout=60,
        evaluate_fn=recorder,
    )
    assert len(app.injected) == sum(len(hits) for hits in PLAN.values())
    train = result.train_metrics_clientapp
    assert [train[r]["rejected-replies"] for r in (1, 2, 3, 4)] == [2, 4, 3, 0]
    assert [train[r]["round-skipped"] for r in (1, 2, 3, 4)] == [0, 1, 0, 0]
    assert all(train[r]["missing-replies"] == 0 for r in (1, 2, 3, 4))
    before, after = recorder.states[1], recorder.states[2]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped round
    assert not all(torch.equal(after[k], recorder.states[3][k]) for k in after)
    assert all(torch.isfinite(v).all() for v in result.arrays.to_torch_state_dict().values())
    acc = recorder.accuracy
    assert acc[4] > 0.2 and acc[4] > acc[0]  # 10 classes: chance is 0.1


def test_a_stalled_client_does_not_hold_up_the_round():
    cfg = _cfg(**{"num-rounds": 2, "fraction-evaluate": 0.0})
    arrays = _model_arrays(cfg)
    app = FaultyClientApp(client_app, [Fault("stall", {3}, {1})], stall_seconds=60)
    grid = LocalGrid(app, cfg.to_mapping(), cfg.num_clients)
    set_server_identity(grid.run.run_id)
    warm = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 0})}),
        dst_node_id=FIRST_NODE_ID,
        message_type="train",
    )
    client_app(warm, grid.context(FIRST_NODE_ID))  # data and model caches: not in the deadline
    start = time.perf_counter()
    try:
        result = build_strategy(cfg).start(
            grid=grid, initial_arrays=arrays, num_rounds=2, timeout=2.0
        )
    finally:
        app.release()
    elapsed = time.perf_counter() - start
    grid._busy[FIRST_NODE_ID + 3].join(30)  # the late call ends here, not in the next test
    assert elapsed < 20
    train = result.train_metrics_clientapp
    # Round 1 times out on partition 3; in round 2 it is still busy with round 1's call.
    assert [train[r]["missing-replies"] for r in (1, 2)] == [1, 1]
    assert [train[r]["num-clients"] for r in (1, 2)] == [3, 3]
    assert app.injected == [(1, 3, "stall", "train")]


def test_the_server_app_writes_rejected_and_skipped_rounds_to_the_results(tmp_path, monkeypatch):
    for plot in ("plot_accuracy", "plot_scope_spread"):  # seconds of matplotlib, not tested here
        monkeypatch.setattr(f"fedmerge.strategies.server_app.{plot}", lambda *a, **k: None)
    cfg = _cfg(**{"num-rounds": 3, "output-dir": str(tmp_path), "run-name": "faults"})
    plan = {1: {1: "raise"}, 2: {p: "inf" for p in range(4)}}
    run_apps(server_app, FaultyClientApp(client_app, _faults(plan)), cfg.to_mapping(), 4)
    rows = read_metrics(tmp_path / "faults")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["rejected-replies"] for r in rows[1:]] == [1, 4, 0]
    assert [r["round-skipped"] for r in rows[1:]] == [0, 1, 0]
    assert rows[2]["test-accuracy"] == rows[1]["test-accuracy"]  # the model did not move


def test_fault_kinds_are_checked_and_a_raise_is_a_raise():
    with pytest.raises(ValueError, match="unknown fault"):
        Fault("melt", {0})
    assert set(FAULT_KINDS) == set(REPLY_FAULTS) | {"raise", "stall"}
    app = FaultyClientApp(client_app, [Fault("raise", {0})])
    msg = _instruction()
    ctx = Context(1, FIRST_NODE_ID, {"partition-id": 0, "num-partitions": 4}, RecordDict(), {})
    with pytest.raises(InjectedFault):
        app(msg, ctx)
