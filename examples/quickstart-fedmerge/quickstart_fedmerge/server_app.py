"""quickstart-fedmerge: the ServerApp (FedAvg, or one of fedmerge's merging strategies)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from fedmerge.strategies import (
    FedMA,
    FedMAOptions,
    FedMatch,
    FedNPMerge,
    FedWSA,
    MatchOptions,
    NPOptions,
    WSAOptions,
)
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedmerge.client_side import load_arrays
from quickstart_fedmerge.task import Net, load_proxy, load_test, test

app = ServerApp()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Two random samples let fedmerge trace Net's structure and check what it found.
EXAMPLE_INPUT = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def make_strategy(cfg: dict, proxy) -> FedAvg:
    """The strategy named by the run-config key ``strategy`` (each one is a FedAvg)."""
    name, seed = cfg["strategy"], int(cfg["seed"])
    sampling = {
        "fraction_train": float(cfg["fraction-train"]),
        "fraction_evaluate": float(cfg["fraction-evaluate"]),
        "min_train_nodes": 2,
        "min_available_nodes": 2,
    }
    if name == "fedavg":
        return FedAvg(**sampling)
    match = MatchOptions.from_run_config(cfg)  # the match-* keys
    common = {"model": Net(), "example_input": EXAMPLE_INPUT, "proxy": proxy, "seed": seed}
    if name == "fedmatch":
        return FedMatch(options=match, **common, **sampling)
    if name == "fednpmerge":
        np_options = NPOptions.from_run_config(cfg)  # the np-* keys
        return FedNPMerge(match=match, options=np_options, device=DEVICE, **common, **sampling)
    if name == "fedma":
        fedma_options = FedMAOptions.from_run_config(cfg)  # the fedma-* keys
        return FedMA(
            model=Net(), example_input=EXAMPLE_INPUT, options=fedma_options, seed=seed, **sampling
        )
    if name == "fedwsa":
        wsa_options = WSAOptions.from_run_config(cfg)  # the wsa-* keys
        return FedWSA(options=wsa_options, match=match, **common, **sampling)
    raise ValueError(f"strategy = {name!r}: expected fedavg, fedmatch, fednpmerge, fedwsa or fedma")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation and write the central test metrics of every round."""
    cfg = dict(context.run_config)
    seed = int(cfg["seed"])
    random.seed(seed)  # FedAvg samples nodes with Python's random
    torch.manual_seed(seed)  # the initial model
    initial = ArrayRecord(Net().state_dict())
    proxy = load_proxy(str(cfg["data-root"]), int(cfg["proxy-size"]), seed)
    strategy = make_strategy(cfg, proxy)

    testloader = load_test(str(cfg["data-root"]))
    results_file = Path(str(cfg["results-file"]))
    results: dict = {"strategy": cfg["strategy"], "rounds": []}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Central evaluation on MNIST's test split; the results file is rewritten each round."""
        state = arrays.to_torch_state_dict()  # wider than Net's when FedMA's model grew
        net = load_arrays(Net(), state, example_input=EXAMPLE_INPUT)
        loss, accuracy = test(net, testloader, DEVICE)
        results["rounds"].append({"round": server_round, "accuracy": accuracy, "loss": loss})
        results_file.write_text(json.dumps(results, indent=2))
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(cfg["num-server-rounds"]),
        timeout=float(cfg["round-timeout"]),
        train_config=ConfigRecord({"lr": float(cfg["lr"])}),
        evaluate_fn=evaluate,
    )
    results["train"] = {r: dict(m) for r, m in result.train_metrics_clientapp.items()}
    results["evaluate"] = {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()}
    results["final"] = results["rounds"][-1]
    results_file.write_text(json.dumps(results, indent=2))
