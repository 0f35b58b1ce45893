"""The in-process Grid: Flower's strategies over ClientApps called directly."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedmerge.engine.local import FIRST_NODE_ID, LocalGrid, run_apps, set_server_identity


def constant_client(raise_on: set[int] = frozenset()) -> ClientApp:
    """A ClientApp whose node i replies with arrays filled with i and weight i + 1."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if pid in raise_on:
            raise RuntimeError(f"client {pid} failed")
        count = context.state.get("calls", MetricRecord({"n": 0}))["n"] + 1
        context.state["calls"] = MetricRecord({"n": count})  # per-node state survives rounds
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        reply = ArrayRecord([np.full_like(a, float(pid)) for a in arrays])
        metrics = MetricRecord({"num-examples": pid + 1, "calls": count})
        return Message(RecordDict({"arrays": reply, "metrics": metrics}), reply_to=msg)

    return app


def test_fedavg_over_local_grid_gives_the_exact_weighted_mean():
    grid = LocalGrid(constant_client(), {}, num_nodes=4)
    set_server_identity(grid.run.run_id)
    initial = ArrayRecord([np.zeros((3, 2), dtype=np.float32), np.zeros(5, dtype=np.float32)])
    result = FedAvg(fraction_evaluate=0.0).start(grid=grid, initial_arrays=initial, num_rounds=3)
    expected = sum(i * (i + 1) for i in range(4)) / sum(i + 1 for i in range(4))  # = 2.0
    for arr in result.arrays.to_numpy_ndarrays():
        np.testing.assert_allclose(arr, expected)
    # weighted mean of the per-node call counters: every node was called once per round
    assert result.train_metrics_clientapp[3]["calls"] == pytest.approx(3.0)


def test_nodes_get_flower_style_node_config_and_persistent_state():
    grid = LocalGrid(constant_client(), {"k": 1}, num_nodes=3)
    ids = list(grid.get_node_ids())
    assert ids == [FIRST_NODE_ID, FIRST_NODE_ID + 1, FIRST_NODE_ID + 2]
    for i, node in enumerate(ids):
        ctx = grid.context(node)
        assert ctx.node_config == {"partition-id": i, "num-partitions": 3}
        assert ctx.run_config == {"k": 1}
        assert "calls" not in ctx.state
    # Each node's context.state survives across rounds: after 3 rounds its counter says 3
    # and each round's replies carried that round's count.
    set_server_identity(grid.run.run_id)
    initial = ArrayRecord([np.zeros(2, dtype=np.float32)])
    result = FedAvg(fraction_evaluate=0.0).start(grid=grid, initial_arrays=initial, num_rounds=3)
    for node in ids:
        assert grid.context(node).state["calls"]["n"] == 3
    calls = [result.train_metrics_clientapp[r]["calls"] for r in (1, 2, 3)]
    assert calls == pytest.approx([1, 2, 3])


def test_a_raising_client_becomes_an_error_reply_and_the_round_goes_on():
    grid = LocalGrid(constant_client(raise_on={1}), {}, num_nodes=3)
    set_server_identity(grid.run.run_id)
    initial = ArrayRecord([np.zeros(2, dtype=np.float32)])
    msgs = FedAvg().configure_train(1, initial, __import__("flwr").app.ConfigRecord(), grid)
    replies = list(grid.send_and_receive(msgs))
    assert len(replies) == 3
    errors = [r for r in replies if r.has_error()]
    assert len(errors) == 1 and "client 1 failed" in errors[0].error.reason
    arrays, _ = FedAvg().aggregate_train(1, replies)
    # nodes 0 and 2 remain, weights 1 and 3: (0*1 + 2*3) / 4
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], 1.5)


def test_message_to_unknown_node_is_an_error_reply():
    grid = LocalGrid(constant_client(), {}, num_nodes=1)
    set_server_identity(grid.run.run_id)
    msg = Message(RecordDict(), dst_node_id=42, message_type="train")
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_error() and "42" in reply.error.reason


def test_flower_internal_task_identity_is_what_messages_need():
    # The local engine depends on this Flower internal; if Flower changes it, this fails first.
    TaskIdentity.run_id = None
    with pytest.raises(RuntimeError, match="run_id"):
        Message(RecordDict(), dst_node_id=FIRST_NODE_ID, message_type="train")
    set_server_identity(7)
    msg = Message(RecordDict(), dst_node_id=FIRST_NODE_ID, message_type="train")
    assert msg.metadata.run_id == 7


def test_run_apps_calls_the_server_app_with_the_grid():
    server = ServerApp()
    seen = {}

    @server.main()
    def main(grid, context):
        seen["nodes"] = list(grid.get_node_ids())
        seen["config"] = dict(context.run_config)
        result = FedAvg(fraction_evaluate=0.0).start(
            grid=grid, initial_arrays=ArrayRecord([np.zeros(1, dtype=np.float32)]), num_rounds=1
        )
        seen["mean"] = float(result.arrays.to_numpy_ndarrays()[0][0])

    run_apps(server, constant_client(), {"x": 1}, num_nodes=2)
    assert seen["nodes"] == [FIRST_NODE_ID, FIRST_NODE_ID + 1]
    assert seen["config"] == {"x": 1}
    assert seen["mean"] == pytest.approx(2 / 3)  # (0*1 + 1*2) / 3
