"""Results sinks: TensorBoard event files true to metrics.json, resumes without duplicates,
clear errors, and a user's own sink."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_resume import run_interrupted

from fedmerge import sinks
from fedmerge.config import RunConfig
from fedmerge.errors import ConfigError
from fedmerge.results import read_metrics
from fedmerge.runner import resume_config, run
from fedmerge.sinks import SINKS, BaseSink, FileSink, ResultsSink, TensorBoardSink

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)

SMALL = {
    "dataset": "digits",
    "num-rounds": 2,
    "model": "mlp",
    "mlp-hidden": "16",
    "num-clients": 4,
    "local-epochs": 1,
    "max-train-samples": 600,
    "save-model": False,
}


def cfg_for(tmp_path: Path, name: str, **over: Any) -> RunConfig:
    values = {**SMALL, "output-dir": str(tmp_path), "run-name": name}
    values.update({k.replace("_", "-"): v for k, v in over.items()})
    return RunConfig.from_mapping(values)


def events(run_dir: Path) -> EventAccumulator:
    """TensorBoard's own reader over the run's event files (purging orphaned data, as it does)."""
    acc = EventAccumulator(str(run_dir / TensorBoardSink.folder))
    acc.Reload()
    return acc


def steps_and_values(acc: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    scalars = acc.Scalars(tag)
    return [s.step for s in scalars], [s.value for s in scalars]


# -- TensorBoard -------------------------------------------------------------------------
def test_tensorboard_scalars_are_the_metrics_of_every_round(tmp_path):
    run_dir = run(cfg_for(tmp_path, "tb", log="files,tensorboard"), "local")
    rows = read_metrics(run_dir)
    acc = events(run_dir)
    steps, values = steps_and_values(acc, "test-accuracy")
    assert steps == [r["round"] for r in rows] == [0, 1, 2]
    np.testing.assert_array_equal(
        np.float32(values), np.float32([r["test-accuracy"] for r in rows])
    )
    # A list-valued metric: one scalar per element, from round 1 (the clients' rounds).
    last = rows[-1]
    assert isinstance(last["scope-mu"], list) and last["scope-mu"]
    for i, value in enumerate(last["scope-mu"]):
        steps, values = steps_and_values(acc, f"scope-mu/{i}")
        assert steps == [1, 2] and np.float32(values[-1]) == np.float32(value)
    assert "round" not in acc.Tags()["scalars"]
    assert "config/text_summary" in acc.Tags()["tensors"]  # the run-config, as text
    assert (run_dir / "metrics.json").is_file()  # files are written too


def test_files_only_by_default_writes_no_event_files(tmp_path):
    run_dir = run(cfg_for(tmp_path, "plain", num_rounds=1), "local")
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1]
    assert not (run_dir / TensorBoardSink.folder).exists()


@pytest.mark.parametrize("saved", [True, False], ids=["after-checkpoint", "before-checkpoint"])
def test_a_resumed_run_logs_every_round_once(tmp_path, monkeypatch, saved):
    cfg = cfg_for(tmp_path, "cut", num_rounds=4, log="files,tensorboard")
    run_dir = run_interrupted(monkeypatch, cfg, 2, saved=saved)
    assert steps_and_values(events(run_dir), "test-accuracy")[0] == [0, 1, 2]
    run(resume_config(run_dir), "local")
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert len(list((run_dir / TensorBoardSink.folder).glob("events.out.tfevents.*"))) == 2
    acc = events(run_dir)
    for tag in ("test-accuracy", "train-loss", "scope-mu/0"):
        steps, values = steps_and_values(acc, tag)
        expected = [r for r in rows if tag.split("/")[0] in r]
        assert steps == [r["round"] for r in expected], tag
        got = [r[tag] if "/" not in tag else r["scope-mu"][0] for r in expected]
        np.testing.assert_array_equal(np.float32(values), np.float32(got))
    facts = json.loads((run_dir / "config.json").read_text())["facts"]
    assert facts["resumed"][0]["after-round"] == (2 if saved else 1)


def test_tensorboard_can_be_added_when_resuming_and_overwrite_clears_its_events(
    tmp_path, monkeypatch
):
    cfg = cfg_for(tmp_path, "late", num_rounds=3)  # files only
    run_dir = run_interrupted(monkeypatch, cfg, 1, saved=True)
    resumed = resume_config(run_dir, {"log": "files,tensorboard"})
    assert resumed.log == "files,tensorboard"
    run(resumed, "local")
    steps, _ = steps_and_values(events(run_dir), "test-accuracy")
    assert steps == [2, 3]  # the rounds run after the resume
    from fedmerge.results import clear_run_dir

    assert "tensorboard" in clear_run_dir(run_dir)
    assert not (run_dir / TensorBoardSink.folder).exists()


# -- errors --------------------------------------------------------------------------------
def test_an_unknown_sink_is_refused_naming_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping({"log": "files,wandb"})
    message = str(info.value)
    assert "'log'" in message and "wandb" in message and "files, tensorboard" in message


def test_a_missing_tensorboard_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # find_spec: not installed
    with pytest.raises(ConfigError, match=r'pip install "fedmerge\[tensorboard\]"') as info:
        RunConfig.from_mapping({"log": "tensorboard"})
    assert "'log'" in str(info.value)
    RunConfig.from_mapping({"log": "files"})  # files alone needs nothing
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ConfigError, match=r'pip install "fedmerge\[tensorboard\]"'):
        TensorBoardSink()


def test_sink_names_put_files_first_once():
    assert sinks.sink_names("files") == ("files",)
    assert sinks.sink_names("") == ("files",)
    assert sinks.sink_names(" tensorboard , files,tensorboard") == ("files", "tensorboard")


# -- a user's own sink ---------------------------------------------------------------------
class Recording(BaseSink):
    """Records every call it gets."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_at = fail_at

    def start(self, config, run_dir, rows):
        super().start(config, run_dir, rows)
        self.calls.append(("start", (dict(config), Path(run_dir), list(rows))))

    def round(self, row):
        if row["round"] == self.fail_at:
            raise RuntimeError("sink failed")
        self.calls.append(("round", dict(row)))

    def close(self):
        self.calls.append(("close", None))


def test_a_custom_sink_gets_start_every_row_and_close(tmp_path, monkeypatch):
    mine = Recording()
    assert isinstance(mine, ResultsSink) and isinstance(FileSink(), ResultsSink)
    monkeypatch.setitem(SINKS, "mine", lambda: mine)
    run_dir = run(cfg_for(tmp_path, "mine", log="files,mine"), "local")
    kinds = [kind for kind, _ in mine.calls]
    assert kinds == ["start", "round", "round", "round", "close"]
    config, folder, rows = mine.calls[0][1]
    assert config["log"] == "files,mine" and folder == run_dir and rows == []
    assert [row for kind, row in mine.calls if kind == "round"] == read_metrics(run_dir)


def test_sinks_are_closed_when_the_run_fails(tmp_path, monkeypatch):
    mine = Recording(fail_at=1)
    monkeypatch.setitem(SINKS, "mine", lambda: mine)
    with pytest.raises(RuntimeError, match="sink failed"):
        run(cfg_for(tmp_path, "fails", log="mine"), "local")
    assert [kind for kind, _ in mine.calls] == ["start", "round", "close"]


def test_the_file_sink_keeps_a_resumed_runs_rows_and_appends(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps([{"round": r} for r in range(4)]))
    sink = FileSink()
    sink.start({}, tmp_path, [{"round": 0}, {"round": 1, "scope-mu": [0.5, 0.25]}])
    assert read_metrics(tmp_path) == [{"round": 0}, {"round": 1, "scope-mu": [0.5, 0.25]}]
    sink.round({"round": 2, "test-accuracy": 0.5})
    sink.close()
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "round,scope-mu,test-accuracy"


@pytest.mark.slow
def test_the_tensorboard_sink_runs_on_flowers_engine(tmp_path):
    # The ServerApp runs in a process of Flower's SuperLink: the sink is built, fed and
    # closed there (the event file is complete once the run returns).
    run_dir = run(cfg_for(tmp_path, "flower", num_rounds=1, log="files,tensorboard"), "flower")
    rows = read_metrics(run_dir)
    steps, values = steps_and_values(events(run_dir), "test-accuracy")
    assert steps == [r["round"] for r in rows] == [0, 1]
    np.testing.assert_array_equal(
        np.float32(values), np.float32([r["test-accuracy"] for r in rows])
    )
