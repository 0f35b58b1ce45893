"""quickstart-fedmerge: the ClientApp (a Flower user's own training loop)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmerge.client_side import fedma_epochs, fedma_metrics, fedma_model, loss_terms
from quickstart_fedmerge.task import Net, load_data
from quickstart_fedmerge.task import test as test_fn
from quickstart_fedmerge.task import train as train_fn

app = ClientApp()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Lets fedmerge resize Net when FedMA's global model grew (traced like the server's).
EXAMPLE_INPUT = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _setup(msg: Message, context: Context):
    """The received model and this node's data, with torch seeded for the round."""
    cfg, node = context.run_config, context.node_config
    pid, num_partitions = int(node["partition-id"]), int(node["num-partitions"])
    server_round = int(msg.content["config"]["server-round"])
    # the same seed whatever process runs this call: runs are reproducible on any engine
    torch.manual_seed(int(cfg["seed"]) * 1_000_003 + pid * 1_009 + server_round)
    # the received weights; for FedMA also its widths and frozen layers (a no-op otherwise)
    net = fedma_model(msg, Net(), example_input=EXAMPLE_INPUT)
    trainloader, valloader = load_data(
        pid,
        num_partitions,
        str(cfg["data-root"]),
        batch_size=int(cfg["batch-size"]),
        max_train_samples=int(cfg["max-train-samples"]),
        proxy_size=int(cfg["proxy-size"]),
        alpha=float(cfg["dirichlet-alpha"]),
        seed=int(cfg["seed"]),
    )
    return net, trainloader, valloader


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's partition."""
    net, trainloader, _ = _setup(msg, context)
    terms = loss_terms(msg, net)  # what the strategy asks clients to add (FedWSA's scope term)
    loss = train_fn(
        net,
        trainloader,
        fedma_epochs(msg, int(context.run_config["local-epochs"])),  # FedMA's retraining epochs
        float(msg.content["config"]["lr"]),
        DEVICE,
        terms,
    )
    labels = trainloader.dataset.tensors[1]
    metrics = MetricRecord(
        {
            "train-loss": loss,
            "num-examples": len(trainloader.dataset),
            **fedma_metrics(msg, labels, num_classes=10),  # FedMA's class counts, else nothing
        }
    )
    content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this node's held-out 10%."""
    net, _, valloader = _setup(msg, context)
    loss, accuracy = test_fn(net, valloader, DEVICE)
    metrics = MetricRecord(
        {"eval-loss": loss, "eval-accuracy": accuracy, "num-examples": len(valloader.dataset)}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
