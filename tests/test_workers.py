"""Process-parallel clients (the local engine's ``workers``), and where in-process calls run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fedmerge.clients.client_app import app as client_app
from fedmerge.strategies.server_app import app as server_app
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg
from test_engine_local import constant_client

from fedmerge.config import RunConfig
from fedmerge.engine.faults import Fault, FaultyClientApp
from fedmerge.engine.local import FIRST_NODE_ID, LocalGrid, run_apps, set_server_identity
from fedmerge.engine.workers import WorkerPool, resolve_workers
from fedmerge.errors import ConfigError
from fedmerge.processes import process_alive
from fedmerge.results import read_metrics
from fedmerge.runner import local_workers, run


def _arrays() -> ArrayRecord:
    return ArrayRecord([np.zeros((3, 2), dtype=np.float32), np.zeros(5, dtype=np.float32)])


# -- the pool behind a LocalGrid ---------------------------------------------------------
def test_a_pool_gives_the_exact_weighted_mean_and_keeps_node_state_across_processes():
    with WorkerPool(constant_client(), size=2) as pool:
        grid = LocalGrid(constant_client(), {}, num_nodes=4, pool=pool)
        set_server_identity(grid.run.run_id)
        result = FedAvg(fraction_evaluate=0.0).start(
            grid=grid, initial_arrays=_arrays(), num_rounds=3, timeout=60
        )
        pids = pool.pids()
    expected = sum(i * (i + 1) for i in range(4)) / sum(i + 1 for i in range(4))
    for arr in result.arrays.to_numpy_ndarrays():
        np.testing.assert_allclose(arr, expected)
    # Each node's context.state came back from whichever worker ran it: 3 calls per node.
    assert result.train_metrics_clientapp[3]["calls"] == pytest.approx(3.0)
    assert all(grid.context(n).state["calls"]["n"] == 3 for n in grid.get_node_ids())
    assert len(pids) == 2 and os.getpid() not in pids
    assert not any(process_alive(p) for p in pids)  # closed: every worker reaped


def _pid_client(sleep: dict[int, float] | None = None, die: set[int] = frozenset()) -> ClientApp:
    """Replies with its process id; node ``p`` sleeps ``sleep[p]`` s or SIGKILLs itself."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        if pid in die and server_round == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep((sleep or {}).get(pid, 0.0) if server_round == 1 else 0.0)
        metrics = MetricRecord({"num-examples": 1, "pid": os.getpid()})
        return Message(
            RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg
        )

    return app


def _round(grid: LocalGrid, server_round: int, timeout: float | None) -> dict[int, Message]:
    from flwr.app import ConfigRecord

    msgs = [
        Message(
            RecordDict(
                {"arrays": _arrays(), "config": ConfigRecord({"server-round": server_round})}
            ),
            dst_node_id=node,
            message_type="train",
        )
        for node in grid.get_node_ids()
    ]
    replies = grid.send_and_receive(msgs, timeout=timeout)
    return {r.metadata.src_node_id - FIRST_NODE_ID: r for r in replies}


def test_a_worker_past_its_deadline_is_set_aside_and_its_node_stays_busy():
    app = _pid_client(sleep={1: 4.0})
    with WorkerPool(app, size=2) as pool:
        grid = LocalGrid(app, {}, num_nodes=4, pool=pool)
        set_server_identity(grid.run.run_id)
        start = time.monotonic()
        first = _round(grid, 1, timeout=1.0)
        elapsed = time.monotonic() - start
        assert sorted(first) == [0, 2, 3]  # node 1 missed its deadline: no reply
        assert elapsed < 3.5  # the round did not wait for the late call (4 s)
        late = set(pool.pids()) - {int(r.content["metrics"]["pid"]) for r in first.values()}
        assert pool.busy_nodes() == {FIRST_NODE_ID + 1}
        second = _round(grid, 2, timeout=1.0)  # node 1 is still busy with round 1's call
        assert sorted(second) == [0, 2, 3]
        time.sleep(4.0)
        third = _round(grid, 3, timeout=5.0)
        assert sorted(third) == [0, 1, 2, 3]
        assert pool.busy_nodes() == set()
        assert len(pool.pids()) == 2  # the set-aside worker ended its call and left
        assert all(not process_alive(p) for p in late if p not in pool.pids())


def test_a_killed_worker_is_replaced_and_its_client_counted_missing():
    app = _pid_client(die={2})
    with WorkerPool(app, size=2) as pool:
        grid = LocalGrid(app, {}, num_nodes=4, pool=pool)
        set_server_identity(grid.run.run_id)
        first = _round(grid, 1, timeout=30.0)
        assert sorted(first) == [0, 1, 3] and pool.replaced == 1
        second = _round(grid, 2, timeout=30.0)
        assert sorted(second) == [0, 1, 2, 3]
        assert len(pool.pids()) == 2 and all(process_alive(p) for p in pool.pids())


def test_no_worker_outlives_close_even_one_stuck_in_a_call():
    app = _pid_client(sleep={0: 60.0})
    pool = WorkerPool(app, size=2)
    grid = LocalGrid(app, {}, num_nodes=2, pool=pool)
    set_server_identity(grid.run.run_id)
    _round(grid, 1, timeout=0.5)
    pids = pool.pids()
    assert len(pids) == 3  # two workers and the one set aside, still sleeping
    pool.close()
    assert not any(process_alive(p) for p in pids)


# -- results do not depend on the workers ------------------------------------------------
FAST = {
    "num-clients": 4,
    "num-rounds": 3,
    "model": "mlp",
    "mlp-hidden": "32",
    "local-epochs": 1,
    "device": "cpu",
    "proxy-size": 60,
    "np-epochs": 2,
    "save-model": False,
}


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "time" not in k} for r in rows]


def _rows_by_workers(tmp_path: Path, **over) -> dict[int, list[dict]]:
    """The time-free metrics of the FAST run with ``over``, on 1 and on 2 workers."""
    rows = {}
    for workers in (1, 2):
        values = {**FAST, **over, "workers": workers, "output-dir": str(tmp_path)}
        cfg = RunConfig.from_mapping({**values, "run-name": f"w{workers}"})
        rows[workers] = _comparable(read_metrics(run(cfg, "local")))
    return rows


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedwsa", "fedmatch", "fednpmerge"])
def test_two_workers_give_exactly_the_metrics_of_one(tmp_path, name):
    rows = _rows_by_workers(tmp_path, strategy=name)
    assert len(rows[1]) == 4 and rows[1] == rows[2]


def test_central_evaluation_shared_by_the_workers_equals_the_in_process_one(tmp_path):
    # 6 batches of 64 test samples: with 2 workers each evaluates 3, the sums added in order.
    rows = _rows_by_workers(tmp_path, **{"eval-batch-size": 64})
    assert len(rows[1]) == 4 and rows[1] == rows[2]


def test_pool_map_evaluates_shares_that_combine_to_evaluate_to_the_bit():
    from fedmerge.models import build_model
    from fedmerge.training import combine_sums, evaluate, evaluation_share

    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10, seed=0)
    x, y = torch.randn(300, 1, 8, 8), torch.randint(0, 10, (300,))
    with WorkerPool(constant_client(), 2) as pool:
        parts = pool.map(
            evaluation_share, [(model, x[:128], y[:128], 64), (model, x[128:], y[128:], 64)]
        )
        assert parts is not None and [len(p) for p in parts] == [2, 3]
        assert combine_sums([s for p in parts for s in p], 300) == evaluate(
            model, x, y, batch_size=64
        )
        assert pool.map(evaluation_share, [(model, x, y, 64)] * 3) is None  # 3 shares, 2 workers
        assert pool.map(_raises, [()]) is None  # a raise: the caller computes it itself
        assert len(pool.pids()) == 2


class _CountingPool:
    """A pool that records the shares it is asked to run, then runs them on ``pool``."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool, self.size, self.calls = pool, pool.size, []

    def map(self, fn, args):
        self.calls.append(len(args))
        return self.pool.map(fn, args)


def test_activation_similarities_spread_over_the_workers_equal_those_read_here():
    from fedmerge.bench.matching import SHAPES, client_states
    from fedmerge.merging import activation_similarities_of
    from fedmerge.spread import spreading

    model, spec, state, clients = client_states("resnet20", 5, 0.05)
    x = torch.randn(48, *SHAPES["resnet20"], generator=torch.Generator().manual_seed(2))
    read = {"reset_target": True, "reset_states": True, "reading": "one-pass"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' threads, and the server merge's by default
    try:
        here = activation_similarities_of(spec, model, state, clients, x, **read)
        with WorkerPool(constant_client(), 2) as workers:
            pool = _CountingPool(workers)
            with spreading(pool):
                spread = activation_similarities_of(spec, model, state, clients, x, **read)
                alone = activation_similarities_of(spec, model, state, clients[:1], x, **read)
    finally:
        torch.set_num_threads(threads)
    assert pool.calls == [2]  # two shares (2 + 3 clients); one client is read here
    assert len(spread) == len(here) == 5
    for a, b in zip(here, spread, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(alone[0][k], here[0][k]) for k in here[0])


def _spy_on_shares(monkeypatch) -> list[bool]:
    """Per call of ``similarities_in_shares`` from now on: whether the workers computed it."""
    from fedmerge.matching import reading

    spread, original = [], reading.similarities_in_shares

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        spread.append(out is not None)
        return out

    monkeypatch.setattr(reading, "similarities_in_shares", spy)
    return spread


def test_a_strategys_matching_reads_activations_in_the_workers(tmp_path, monkeypatch):
    spread = _spy_on_shares(monkeypatch)
    rows = _rows_by_workers(tmp_path, strategy="fedmatch", **{"match-method": "activation"})
    assert len(rows[1]) == 4 and rows[1] == rows[2]
    assert spread == [True] * 3  # the 2-worker run's 3 rounds; the 1-worker run has no pool


def test_the_matching_benchmark_spreads_its_reading_over_workers(capsys, monkeypatch):
    from fedmerge.bench import matching

    spread = _spy_on_shares(monkeypatch)
    argv = ["--models", "mlp", "--clients", "3", "--matchers", "activation", "--repeats", "1"]
    assert matching.main([*argv, "--proxy", "16", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "activations read on 2 worker process(es)" in out
    assert len([line for line in out.splitlines() if line.startswith("mlp")]) == 1
    with pytest.raises(SystemExit):
        matching.main([*argv, "--workers", "0"])
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err
    assert spread == [True]  # one reading (3 clients), in 2 shares


def _raises() -> None:
    raise ValueError("no")


def test_vectorised_training_runs_in_the_workers(tmp_path):
    rows = _rows_by_workers(tmp_path, vectorise=True)
    # Each worker trains its share of the round together; vmap sums in another order than
    # the per-client loop, so equal to float tolerance, as the vectorised path promises.
    acc = [[r["test-accuracy"] for r in rows[w]] for w in (1, 2)]
    np.testing.assert_allclose(acc[0], acc[1], atol=0.02)
    assert rows[2][-1]["num-clients"] == 4


PLAN = {1: {0: "nan", 1: "raise", 3: "stall"}, 2: {2: "raise"}}


def test_faults_give_the_same_rejected_and_missing_counts_on_two_workers(tmp_path):
    counts = {}
    for workers in (1, 2):
        cfg = RunConfig.from_mapping(
            {
                **FAST,
                "num-rounds": 3,
                "round-timeout": 3.0,
                "output-dir": str(tmp_path),
                "run-name": f"f{workers}",
            }
        )
        faults = [Fault(kind, {p}, {r}) for r, hits in PLAN.items() for p, kind in hits.items()]
        # Node 3 stalls in round 1 until released (in this process) or killed (a worker, at
        # the run's end): past the 3 s deadline of round 1, and busy in rounds 2 and 3.
        app = FaultyClientApp(client_app, faults, stall_seconds=60.0)
        release = threading.Timer(15.0, app.release)
        release.start()
        try:
            run_apps(server_app, app, cfg.to_mapping(), cfg.num_clients, workers=workers)
        finally:
            release.cancel()
            app.release()
        rows = read_metrics(tmp_path / f"f{workers}")
        counts[workers] = [(r["rejected-replies"], r["missing-replies"]) for r in rows[1:]]
    # Round 1: nan and raise rejected, the stalled node missing; rounds 2 and 3: the stalled
    # node, still busy, missing again; round 2 also rejects a raise.
    assert counts[1] == [(2, 1), (1, 1), (0, 1)]
    assert counts[2] == counts[1]


# -- the engine's choice of workers ------------------------------------------------------
def test_auto_workers_follow_the_cores_the_clients_and_the_device(monkeypatch):
    monkeypatch.setattr("fedmerge.engine.workers.available_cpus", lambda: 8)
    assert resolve_workers(0, 10, "cpu") == 8
    assert resolve_workers(0, 3, "cpu") == 3
    assert resolve_workers(0, 10, "cuda") == 1
    assert resolve_workers(5, 10, "cpu") == 5
    with pytest.raises(ConfigError, match="workers"):
        resolve_workers(2, 10, "cuda")
    cfg = RunConfig.from_mapping({"num-clients": 10, "fraction-train": 0.3, "device": "cpu"})
    assert local_workers(cfg) == 3


def test_client_threads_other_than_one_need_a_single_worker():
    with pytest.raises(ConfigError, match="client-threads.*workers = 2"):
        RunConfig.from_mapping({"workers": 2, "client-threads": 2})
    RunConfig.from_mapping({"workers": 1, "client-threads": 0})


# -- in-process: client calls on the main thread, the ServerApp beside it ---------------
def test_in_process_clients_run_on_the_main_thread_and_the_server_beside_it():
    seen: dict[str, set[str]] = {"client": set(), "server": set()}
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        seen["client"].add(threading.current_thread().name)
        metrics = MetricRecord({"num-examples": 1, "threads": torch.get_num_threads()})
        return Message(
            RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg
        )

    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        seen["server"].add(threading.current_thread().name)
        result = FedAvg(fraction_evaluate=0.0).start(
            grid=grid, initial_arrays=_arrays(), num_rounds=2, timeout=30
        )
        seen["threads"] = {result.train_metrics_clientapp[2]["threads"], torch.get_num_threads()}

    run_apps(server, app, {}, 3, client_threads=2)
    assert seen["client"] == {"MainThread"}
    assert seen["server"] == {"fedmerge-server"}
    assert seen["threads"] == {2.0, 1}  # clients: client-threads; server: one thread


def test_a_server_failure_in_its_thread_reaches_the_caller():
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        raise KeyError("from the server")

    with pytest.raises(KeyError, match="from the server"):
        run_apps(server, constant_client(), {}, 2)


# -- the parent dies: so do its workers --------------------------------------------------
def test_workers_die_with_a_sigkilled_engine(tmp_path):
    script = tmp_path / "engine.py"
    pids = tmp_path / "pids"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, time
            from flwr.app import Message, MetricRecord, RecordDict
            from flwr.clientapp import ClientApp
            from fedmerge.engine.workers import WorkerPool
            from fedmerge.engine.local import LocalGrid, set_server_identity
            from test_workers import _round

            app = ClientApp()

            @app.train()
            def train(msg, context):
                with open({str(pids)!r}, "a") as f:
                    f.write(f"{{os.getpid()}}\\n")
                time.sleep(120)

            pool = WorkerPool(app, size=2)
            grid = LocalGrid(app, {{}}, num_nodes=2, pool=pool)
            set_server_identity(grid.run.run_id)
            _round(grid, 1, timeout=None)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not pids.exists() or len(pids.read_text().split()) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        workers = [int(p) for p in pids.read_text().split()]
        assert proc.pid not in workers and all(process_alive(p) for p in workers)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(process_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(process_alive(p) for p in workers)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_every_worker(tmp_path):
    from test_resume import _checkpoint_round, _processes_with, _sigint_at_default

    fedmerge = str(Path(sys.executable).parent / "fedmerge")
    args = [fedmerge, "run", "-q", "num-rounds=200", "workers=2", f"output-dir={tmp_path}"]
    proc = subprocess.Popen(
        [*args, "run-name=c"], stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_at_default
    )
    try:
        deadline = time.monotonic() + 120
        while _checkpoint_round(tmp_path / "c") < 1:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        assert len(_processes_with(f"output-dir={tmp_path}")) == 3  # the engine, 2 workers
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        gone_by = time.monotonic() + 10
        while _processes_with(f"output-dir={tmp_path}") and time.monotonic() < gone_by:
            time.sleep(0.05)
        assert _processes_with(f"output-dir={tmp_path}") == []
        assert proc.returncode != 0
        assert (tmp_path / "c" / "metrics.json").exists()  # what was computed stays on disk
    finally:
        if proc.poll() is None:
            proc.kill()
