"""The Flower ClientApp: local training and evaluation on this node's Non-IID shard.

The shard is recomputed from the run-config and the node's ``partition-id`` /
``num-partitions`` (cached per process). What the server sends in the train instruction's
config decides the extra loss terms: ``proximal-mu`` (Flower's FedProx) adds the proximal
term; later strategies add their own keys. So one ClientApp serves every strategy.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedmerge.config import RunConfig
from fedmerge.errors import ConfigError
from fedmerge.federation import DataSpec, client_seed, client_shard, load_data, make_model
from fedmerge.scopes import WSARegularizer, scope_names, scope_of, target_from_config
from fedmerge.training import Regularizer, evaluate, proximal_term, resolve_device, train

log = logging.getLogger(__name__)

app = ClientApp()


@lru_cache(maxsize=8)
def _parse(items: frozenset) -> RunConfig:
    return RunConfig.from_mapping(dict(items))


def _setup(context: Context) -> tuple[RunConfig, DataSpec, int]:
    """Config, data spec and partition id of this node (parsed once per process)."""
    cfg = _parse(frozenset(context.run_config.items()))
    try:
        pid = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise ConfigError(
            "node-config",
            dict(context.node_config),
            "partition-id and num-partitions",
            'start the SuperNode with --node-config "partition-id=0 num-partitions=10"',
        ) from exc
    if num_partitions != cfg.num_clients:
        log.warning(
            "node num-partitions=%d differs from num-clients=%d; partitioning into %d",
            num_partitions,
            cfg.num_clients,
            num_partitions,
        )
    return cfg, DataSpec.of(cfg, num_clients=num_partitions), pid


# One model object per process and architecture: rebuilding it every round costs more than
# loading a state dict into it.
_models: dict[tuple, nn.Module] = {}


def _model(cfg: RunConfig, spec: DataSpec, state: dict[str, torch.Tensor]) -> nn.Module:
    key = (spec.dataset, cfg.model, cfg.model_width, cfg.model_norm, cfg.mlp_hidden)
    if key not in _models:
        _models[key] = make_model(cfg, load_data(spec))
    model = _models[key]
    model.load_state_dict(state)
    return model


def _regularizers(
    config: ConfigRecord, model: nn.Module, device: torch.device
) -> list[Regularizer]:
    """The loss terms the server asked for in this instruction's config."""
    regs: list[Regularizer] = []
    mu = float(config.get("proximal-mu", 0.0))
    if mu > 0:  # Flower's FedProx
        ref = [p.detach().clone().to(device) for p in model.parameters()]
        regs.append(proximal_term(ref, mu))
    target = target_from_config(config)
    if target is not None and float(config["wsa-lambda"]) > 0:  # fedmerge's FedWSA
        lam, reverse = float(config["wsa-lambda"]), bool(config.get("wsa-reverse", False))
        regs.append(WSARegularizer(target, lam, reverse=reverse, device=device))
    return regs


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's shard and reply with the result."""
    cfg, spec, pid = _setup(context)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    device = resolve_device(cfg.device)
    x, y = client_shard(spec, pid, str(device))
    model = _model(cfg, spec, msg.content["arrays"].to_torch_state_dict()).to(device)
    result = train(
        model,
        x,
        y,
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=float(config.get("lr", cfg.lr)),
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        seed=client_seed(cfg.seed, pid, server_round),
        device=device,
        regularizers=_regularizers(config, model, device),
    )
    state = model.state_dict()
    scope = scope_of(state, scope_names(state, cfg.wsa_layers))  # diagnostics, every strategy
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "train-time": result.seconds,
            "train-steps": result.steps,
            "scope-mu": list(scope.mu),
            "scope-sigma": list(scope.sigma),
        }
    )
    arrays = ArrayRecord(state)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's own shard (local-data accuracy)."""
    cfg, spec, pid = _setup(context)
    device = resolve_device(cfg.device)
    x, y = client_shard(spec, pid, str(device))
    model = _model(cfg, spec, msg.content["arrays"].to_torch_state_dict())
    loss, acc = evaluate(model, x, y, batch_size=cfg.eval_batch_size, device=device)
    metrics = MetricRecord({"num-examples": len(y), "eval-loss": loss, "eval-accuracy": acc})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
