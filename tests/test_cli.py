"""The fedmerge command: runs, listings, partitions, and one clear line per bad input."""

from __future__ import annotations

import pytest

from fedmerge.cli import main
from fedmerge.results import read_metrics


def run_cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_prints_rounds_and_summary(capsys, tmp_path):
    code, out, _ = run_cli(
        capsys,
        "run",
        "num-rounds=2",
        "num-clients=3",
        "model=mlp",
        f"output-dir={tmp_path}",
        "run-name=cli",
    )
    assert code == 0
    assert "round   2/2  test-accuracy" in out
    assert "final accuracy" in out and "best" in out
    assert len(read_metrics(tmp_path / "cli")) == 3


def test_run_with_config_file_and_override(capsys, tmp_path):
    conf = tmp_path / "exp.toml"
    conf.write_text('num-rounds = 5\nnum-clients = 3\nmodel = "mlp"\n')
    code, _, _ = run_cli(
        capsys,
        "run",
        "--config",
        str(conf),
        "num-rounds=1",
        f"output-dir={tmp_path}",
        "run-name=f",
        "-q",
    )
    assert code == 0
    assert len(read_metrics(tmp_path / "f")) == 2  # the command line wins over the file


def test_real_fashion_mnist_run(capsys, tmp_path, shared_data_root):
    code, _, err = run_cli(
        capsys,
        "run",
        "dataset=fashion-mnist",
        f"data-root={shared_data_root}",
        "partition=dirichlet",
        "partition-beta=0.5",
        "num-rounds=3",
        "max-train-samples=3000",
        "batch-size=32",
        "lr=0.05",
        "local-epochs=2",  # set: fashion-mnist's default is NIID-Bench's 10
        f"output-dir={tmp_path}",
        "run-name=fm",
    )
    assert code == 0, err
    rows = read_metrics(tmp_path / "fm")
    assert rows[-1]["test-accuracy"] > 0.3  # 10 classes: chance is 0.1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["nm-rounds=3"], "config key 'nm-rounds'.*did you mean num-rounds"),
        (["dataset=imagenet"], "config key 'dataset'.*one of: cifar10"),
        (["strategy=fedx"], "config key 'strategy'.*fedavg"),
        (["model=gpt"], "config key 'model'.*cnn"),
        (["partition=weird"], "config key 'partition'.*dirichlet"),
        (["num-rounds=many"], "config key 'num-rounds'.*an integer"),
        (["lr=fast"], "config key 'lr'.*a number"),
        (["partition-beta=0"], "config key 'partition-beta'.*> 0"),
        (["dataset=synthetic", "synthetic-alpha=-1"], "config key 'synthetic-alpha'"),
        (["num-clients=5000"], "config key 'num-clients'.*training samples"),
        (
            ["partition=label-quantity", "partition-k=11"],
            "config key 'partition-k'.*number of classes",
        ),
        (["dataset=mnist", "data-root=/nonexistent/data"], "mnist.*/nonexistent/data.*download"),
        (["dataset=synthetic", "model=cnn"], "config key 'model'.*mlp"),
        (["num-rounds"], "key=value"),
        (["--config", "/nonexistent.toml"], "'--config'"),
    ],
)
def test_bad_input_is_one_clear_message(capsys, tmp_path, args, expected):
    code, out, err = run_cli(capsys, "run", *args, f"output-dir={tmp_path}")
    assert code == 2
    assert "Traceback" not in err + out
    assert "error:" in err
    import re

    assert re.search(expected, " ".join(err.split()), re.S), err
    assert not any(tmp_path.iterdir())  # nothing written for a run that never started


def test_listings(capsys):
    for command, must in [
        ("strategies", ["fedavg", "fedprox", "fedyogi", "fedtrimmedavg"]),
        (
            "datasets",
            ["digits", "fashion-mnist", "cifar100", "synthetic", "embedded", "NIID-Bench"],
        ),
        ("models", ["mlp", "cnn", "vgg9", "resnet20"]),
    ]:
        code, out, _ = run_cli(capsys, command)
        assert code == 0
        for word in must:
            assert word in out


def test_partitions_prints_counts_and_saves_heatmap(capsys, tmp_path):
    png = tmp_path / "p.png"
    code, out, _ = run_cli(
        capsys, "partitions", "partition=label-quantity", "partition-k=2", "--out", str(png)
    )
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client_rows = [
        line for line in out.splitlines() if line.strip().startswith("│ ") and "total" not in line
    ]
    # one table row per client, each holding exactly two non-zero label counts
    data_rows = [r for r in client_rows if r.split("│")[1].strip().isdigit()]
    assert len(data_rows) == 10
    for row in data_rows:
        counts = [c.strip() for c in row.split("│")[2:-2]]
        assert sum(1 for c in counts if c != "0") == 2


def test_options_and_overrides_mix_freely(capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        "run",
        "num-rounds=1",
        "-q",
        "model=mlp",
        "--engine",
        "local",
        f"output-dir={tmp_path}",
        "num-clients=3",
        "run-name=2024",
    )
    assert code == 0, err
    assert len(read_metrics(tmp_path / "2024")) == 2


def test_unavailable_device_fails_before_anything_is_written(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device=cuda is valid here")
    code, _, err = run_cli(capsys, "run", "device=cuda", f"output-dir={tmp_path}")
    assert code == 2 and "config key 'device'" in err
    assert not any(tmp_path.iterdir())
