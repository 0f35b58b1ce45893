"""Checkpoint and resume: an interrupted run continues to exactly the uninterrupted metrics."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fedmerge.strategies import server_app
from fedmerge.strategies.checkpoint import (
    RoundTracker,
    from_plain,
    load_strategy_state,
    reply_digest,
    strategy_state,
    to_plain,
)
from fedmerge.strategies.registry import STRATEGIES, build_strategy
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedmerge.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    config_changes,
    load_checkpoint,
    rng_state,
    run_lock,
    save_checkpoint,
    set_rng_state,
    wait_until_unlocked,
)
from fedmerge.cli import main
from fedmerge.config import RunConfig
from fedmerge.engine.flower import stop_superlink
from fedmerge.engine.local import FIRST_NODE_ID, set_server_identity
from fedmerge.errors import FedmergeError
from fedmerge.processes import process_alive
from fedmerge.results import read_metrics
from fedmerge.runner import AlreadyFinished, resume_config, run

# fraction-train < 1: which clients train depends on Flower's sampling (Python's `random`).
FAST = {
    "num-rounds": 4,
    "num-clients": 4,
    "fraction-train": 0.75,
    "model": "mlp",
    "mlp-hidden": "16",
    "local-epochs": 1,
    "max-train-samples": 600,
    "proxy-size": 60,  # the strategies that use server data (the others ignore it)
    "np-epochs": 2,
    "save-model": False,
}


def comparable(rows: list[dict]) -> list[dict]:
    """Rows without what measures time (it differs between any two runs)."""
    return [{k: v for k, v in r.items() if "time" not in k} for r in rows]


def cfg_for(tmp_path: Path, name: str, **over) -> RunConfig:
    values = {**FAST, "output-dir": str(tmp_path), "run-name": name}
    values.update({k.replace("_", "-"): v for k, v in over.items()})
    return RunConfig.from_mapping(values)


class Interrupted(Exception):
    pass


def run_interrupted(monkeypatch, cfg: RunConfig, after: int = 2, *, saved: bool = True) -> Path:
    """Run ``cfg`` until the checkpoint of round ``after`` is on disk (``saved``), or until just
    before it is written (the results sinks have that round, the checkpoint only the one
    before), then stop it there."""
    real = server_app.save_checkpoint

    def save_then_stop(run_dir, checkpoint):
        if checkpoint.round == after and not saved:
            raise Interrupted
        path = real(run_dir, checkpoint)
        if checkpoint.round == after:
            raise Interrupted
        return path

    with monkeypatch.context() as m:
        m.setattr(server_app, "save_checkpoint", save_then_stop)
        with pytest.raises(Interrupted):
            run(cfg, "local")
    run_dir = Path(cfg.output_dir) / cfg.run_name
    assert load_checkpoint(run_dir).round == (after if saved else after - 1)
    return run_dir


# -- every strategy resumes to the uninterrupted metrics ---------------------------------
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_resumed_run_ends_with_the_uninterrupted_metrics(tmp_path, monkeypatch, name):
    full = read_metrics(run(cfg_for(tmp_path, "full", strategy=name), "local"))
    run_dir = run_interrupted(monkeypatch, cfg_for(tmp_path, "cut", strategy=name))
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1, 2]
    resumed = read_metrics(run(resume_config(run_dir), "local"))
    assert [r["round"] for r in resumed] == [0, 1, 2, 3, 4]
    assert comparable(resumed) == comparable(full)
    assert all("train-loss" in r and "num-clients" in r for r in resumed[1:])
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        p.name for p in (tmp_path / "full").iterdir()
    )  # the checkpoint is gone once the run finished; no temporary file is left
    facts = json.loads((run_dir / "config.json").read_text())["facts"]
    assert facts["resumed"][0]["after-round"] == 2


@pytest.mark.parametrize(
    ("name", "skipped"),
    [("fedavgm", "load_strategy_state"), ("fedwsa", "load_strategy_state"), ("fedavg", "rng")],
)
def test_resuming_without_that_state_would_change_the_metrics(tmp_path, monkeypatch, name, skipped):
    # The equality above is not a tautology: drop one piece of the checkpoint and it breaks.
    full = read_metrics(run(cfg_for(tmp_path, "full", strategy=name), "local"))
    run_dir = run_interrupted(monkeypatch, cfg_for(tmp_path, "cut", strategy=name))
    if skipped == "rng":
        monkeypatch.setattr(server_app, "set_rng_state", lambda state: None)
    else:
        monkeypatch.setattr(server_app, skipped, lambda strategy, state: None)
    resumed = read_metrics(run(resume_config(run_dir), "local"))
    assert comparable(resumed)[:3] == comparable(full)[:3]
    assert comparable(resumed)[3:] != comparable(full)[3:]


def test_clients_and_strategies_see_the_true_round_numbers(tmp_path, monkeypatch):
    seen: list[tuple[int, int]] = []
    real = RoundTracker.configure_train

    def spy(self, server_round, arrays, config, grid):
        messages = list(real(self, server_round, arrays, config, grid))
        seen.append((server_round, int(messages[0].content["config"]["server-round"])))
        return messages

    run_dir = run_interrupted(monkeypatch, cfg_for(tmp_path, "cut"))
    monkeypatch.setattr(RoundTracker, "configure_train", spy)
    run(resume_config(run_dir), "local")
    assert seen == [(1, 3), (2, 4)]  # Flower's round k of the resumed start() is round k + 2


# -- the checkpoint itself ----------------------------------------------------------------
def test_checkpoint_round_trip_is_exact_and_loads_without_pickled_code(tmp_path):
    random.seed(5)
    np.random.seed(6)  # noqa: NPY002 - the global generator is what is checkpointed
    torch.manual_seed(7)
    state = {"w": torch.randn(3, 2, dtype=torch.float64), "n": torch.tensor(4)}
    rng = rng_state()
    ckpt = Checkpoint(3, 5, state, {"own": {"x": [1.5]}}, rng, [{"round": 0, "a": [0.1]}], {"k": 1})
    save_checkpoint(tmp_path, ckpt)
    expected = (random.random(), np.random.rand(), torch.rand(1))  # noqa: NPY002
    back = load_checkpoint(tmp_path)  # torch.load(weights_only=True) inside
    set_rng_state(back.rng)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected  # noqa: NPY002
    assert back.round == 3 and back.num_rounds == 5 and back.rows == ckpt.rows
    assert all(torch.equal(back.arrays[k], v) for k, v in state.items())
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


def test_unreadable_or_missing_checkpoints_are_one_clear_error(tmp_path):
    with pytest.raises(FedmergeError, match="no checkpoint.pt"):
        load_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"torn")
    with pytest.raises(FedmergeError, match="cannot be read"):
        load_checkpoint(tmp_path)


def test_flower_strategy_state_round_trips_exactly():
    cfg = RunConfig(strategy="fedavgm", model="mlp", mlp_hidden="8")
    strategy = build_strategy(cfg)
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2)}
    strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    strategy.momentum_vector = [np.full(3, 0.1), np.float64(2.5)]
    plain = strategy_state(strategy)
    fresh = build_strategy(cfg)
    load_strategy_state(fresh, plain)
    for k, v in arrays.items():
        restored = fresh.current_arrays[k].numpy()
        assert restored.dtype == v.dtype and np.array_equal(restored, v)
    assert np.array_equal(fresh.momentum_vector[0], np.full(3, 0.1))
    assert float(fresh.momentum_vector[1]) == 2.5
    adam = build_strategy(cfg.replace(strategy="fedadam"))
    with pytest.raises(ValueError, match="does not fit"):
        load_strategy_state(build_strategy(cfg.replace(strategy="fedwsa")), strategy_state(adam))
    nested = {"m": {"x": np.zeros(2, np.float16)}, "l": (1, "s")}
    assert from_plain(to_plain(nested))["m"]["x"].dtype == np.float16


def test_replies_are_ordered_by_content_not_by_sender_or_time():
    set_server_identity(1)

    def reply(node: int, value: float, seconds: float) -> Message:
        msg = Message(RecordDict(), dst_node_id=node, message_type="train")
        msg.metadata.__dict__["_message_id"] = f"m{node}"
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.full(3, value, np.float32))}),
                "metrics": MetricRecord({"num-examples": 5, "train-time": seconds}),
            }
        )
        return Message(content, reply_to=msg)

    a, b = reply(FIRST_NODE_ID, 1.0, 0.1), reply(FIRST_NODE_ID + 1, 2.0, 0.2)
    again = reply(FIRST_NODE_ID + 7, 1.0, 9.9)  # same model, other node, other time
    assert reply_digest(a) == reply_digest(again) != reply_digest(b)
    tracker = RoundTracker(build_strategy(RunConfig()), sort_replies=True)
    assert tracker._ordered([a, b]) == tracker._ordered([b, a])


def test_config_changes_name_what_a_resume_may_not_change():
    saved = RunConfig(lr=0.1).to_mapping()
    moved = RunConfig(lr=0.1, output_dir="elsewhere", data_root="/d", resume=True).to_mapping()
    assert config_changes(saved, moved) == []
    assert config_changes(saved, RunConfig(lr=0.2).to_mapping()) == ["lr: 0.1 -> 0.2"]
    older = {k: v for k, v in saved.items() if k != "resume"}  # written before the key existed
    assert config_changes(older, RunConfig(lr=0.1).to_mapping()) == []


def test_one_writer_per_run_folder(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(FedmergeError, match="another fedmerge process"), run_lock(tmp_path):
            pass
        assert not wait_until_unlocked(tmp_path, timeout=0.3)
    assert wait_until_unlocked(tmp_path, timeout=0)


def test_a_killed_but_unreaped_process_counts_as_gone():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(proc.pid)
        proc.kill()
        deadline = time.monotonic() + 10
        while process_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(proc.pid)  # a zombie until the wait() below
    finally:
        proc.kill()
        proc.wait()


# -- the command ----------------------------------------------------------------------------
def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_resume_from_the_command_line(tmp_path, monkeypatch, capsys):
    run_dir = run_interrupted(monkeypatch, cfg_for(tmp_path, "cut"))
    code, out, err = _cli(capsys, "run", "--resume", str(run_dir), "-q")
    assert code == 0, err
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1, 2, 3, 4]
    code, out, _ = _cli(capsys, "run", "--resume", str(run_dir))
    assert code == 0 and "finished all 4 rounds" in out


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("none", [], "not a fedmerge run folder"),
        ("cut", ["lr=0.5", "seed=3"], "would change its results: lr, seed"),
        ("cut", ["--config", "x.toml"], "drop --config"),
        ("cut", ["--overwrite"], "exclude each other"),
        ("no-checkpoint", [], "no checkpoint.pt (it stopped after round 2 of 4"),
    ],
)
def test_resume_refuses_bad_input_in_one_line(tmp_path, monkeypatch, capsys, setup, args, message):
    run_dir = tmp_path / "cut"
    if setup != "none":
        run_interrupted(monkeypatch, cfg_for(tmp_path, "cut"))
    if setup == "no-checkpoint":
        (run_dir / CHECKPOINT_FILE).unlink()
    code, _, err = _cli(capsys, "run", "--resume", str(run_dir), *args)
    assert code == 2
    assert message in " ".join(err.split()) and "Traceback" not in err


def test_the_server_refuses_a_checkpoint_of_another_config(tmp_path, monkeypatch):
    run_dir = run_interrupted(monkeypatch, cfg_for(tmp_path, "cut"))
    with pytest.raises(FedmergeError, match="differs from the checkpoint's in lr: 0.05 -> 0.5"):
        run(resume_config(run_dir).replace(lr=0.5), "local")
    assert load_checkpoint(run_dir).round == 2  # nothing was touched


def test_overwrite_replaces_a_run_and_nothing_else(tmp_path, capsys):
    values = {k: str(v).lower() if isinstance(v, bool) else v for k, v in FAST.items()}
    args = ["run", "-q", *(f"{k}={v}" for k, v in values.items()), f"output-dir={tmp_path}"]
    args += ["num-rounds=1", "run-name=keep"]
    assert _cli(capsys, *args)[0] == 0
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    code, _, err = _cli(capsys, *args)
    assert code == 2 and "--overwrite" in err
    code, _, err = _cli(capsys, *args, "seed=1", "--overwrite")
    assert code == 0, err
    saved = json.loads((tmp_path / "keep" / "config.json").read_text())
    assert saved["config"]["seed"] == 1 and "resumed" not in saved["facts"]
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine"


# -- a real SIGKILL of `fedmerge run`, then `fedmerge run --resume` (both engines) ----------
SLOW_ROUNDS = [
    "num-rounds=6",
    "num-clients=3",
    "model=mlp",
    "mlp-hidden=32",
    "local-epochs=15",
    "save-model=false",
]


def _fedmerge(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "fedmerge"), "run", "-q", *args]


def _checkpoint_round(run_dir: Path) -> int:
    try:
        return int(torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)["round"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return -1


def _sigint_at_default() -> None:
    """A child's ``preexec_fn``: SIGINT at its default, as a terminal's foreground command has
    it. A test harness started in the background of a non-interactive shell ignores SIGINT and
    its children inherit that (Python then installs no KeyboardInterrupt handler), so a test
    that interrupts a child must not depend on how the suite was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _processes_with(text: str) -> list[int]:
    """Live processes (zombies aside) whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _kill_mid_run_then_resume(tmp_path: Path, engine: str, *extra: str) -> None:
    # TMPDIR of the runs: flwr-home and Ray's session, so everything they start is found by
    # path. Short: Ray's socket paths must fit in 107 bytes, pytest's tmp_path does not.
    scratch = Path(tempfile.mkdtemp(prefix="fm-resume-"))
    env = dict(os.environ, TMPDIR=str(scratch), OMP_NUM_THREADS="1")
    common = [*SLOW_ROUNDS, *extra, f"output-dir={tmp_path}", "--engine", engine]
    try:
        proc = subprocess.Popen(
            _fedmerge(*common, "run-name=cut"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        run_dir = tmp_path / "cut"
        deadline = time.monotonic() + 400
        while _checkpoint_round(run_dir) < 2:
            assert proc.poll() is None, f"ended before round 2: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint of round 2 in time"
            time.sleep(0.05)
        if engine == "local":  # the engine and its worker processes (forks: same cmdline)
            workers = int(dict(a.split("=") for a in extra).get("workers", "1"))
            assert len(_processes_with(f"output-dir={tmp_path}")) == 1 + (workers > 1) * workers
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of round 3
        proc.wait()
        if engine == "local":  # no worker outlives the engine
            gone_by = time.monotonic() + 10
            while _processes_with(f"output-dir={tmp_path}") and time.monotonic() < gone_by:
                time.sleep(0.05)
            assert _processes_with(f"output-dir={tmp_path}") == []
        killed_at = _checkpoint_round(run_dir)
        assert 2 <= killed_at < 6, killed_at
        resumed = subprocess.run(
            _fedmerge("--resume", str(run_dir), "--engine", engine),
            env=env,
            capture_output=True,
            text=True,
            timeout=500,
            check=False,
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        full = subprocess.run(
            _fedmerge(*common, "run-name=full"),
            env=env,
            capture_output=True,
            text=True,
            timeout=500,
            check=False,
        )
        assert full.returncode == 0, full.stderr[-3000:]
    finally:
        stop_superlink(scratch)  # whatever this test's runs left (nothing, when all went well)
        shutil.rmtree(scratch, ignore_errors=True)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == list(range(7))
    assert comparable(rows) == comparable(read_metrics(tmp_path / "full"))
    assert not (run_dir / CHECKPOINT_FILE).exists()
    (resumption,) = json.loads((run_dir / "config.json").read_text())["facts"]["resumed"]
    # Flower's engine: the orphaned ServerApp may finish a round while it stops.
    assert killed_at <= resumption["after-round"] < 6


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigkill_then_resume_on_the_local_engine(tmp_path, workers):
    # workers=2: the resumed run also equals the whole run, and no worker survives the kill.
    _kill_mid_run_then_resume(tmp_path, "local", f"workers={workers}")


@pytest.mark.slow
def test_sigkill_then_resume_on_the_flower_engine(tmp_path):
    # The killed run's ServerApp lives on in Flower's detached SuperLink: it notices its
    # launcher is gone and stops (with that SuperLink); --resume waits for the folder's lock.
    _kill_mid_run_then_resume(tmp_path, "flower")


def test_already_finished_is_its_own_error(tmp_path):
    run_dir = run(cfg_for(tmp_path, "done", num_rounds=1), "local")
    with pytest.raises(AlreadyFinished):
        resume_config(run_dir)
