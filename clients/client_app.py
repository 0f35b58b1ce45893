"""The Flower ClientApp: local training and evaluation on this node's Non-IID shard.

The shard is recomputed from the run-config and the node's ``partition-id`` /
``num-partitions`` (cached per process). What the server sends in the train instruction's
config decides the extra loss terms: ``proximal-mu`` (Flower's FedProx) adds the proximal
term, FedWSA's target the WSA term (both read by :class:`fedmerge.client_side.RequestedTerms`,
the helper a user's own ClientApp uses too). So one ClientApp serves every strategy.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedmerge.client_side import (
    FEDMA_PHASE,
    RequestedTerms,
    fedma_epochs,
    fedma_frozen,
    fedma_metrics,
)
from fedmerge.config import RunConfig
from fedmerge.errors import ConfigError
from fedmerge.federation import DataSpec, client_seed, client_shard, load_data, make_model
from fedmerge.fedma import fit_model
from fedmerge.scopes import scope_names, scope_of
from fedmerge.training import SGDSettings, TrainResult, evaluate, resolve_device, train
from fedmerge.vectorised import ClientJob, can_vectorise, train_many

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
    if "data-root" in context.node_config:  # this SuperNode keeps its data at its own path
        cfg = cfg.replace(data_root=str(context.node_config["data-root"]))
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


def _cached_model(cfg: RunConfig, spec: DataSpec) -> nn.Module:
    key = (spec.dataset, cfg.model, cfg.model_width, cfg.model_norm, cfg.mlp_hidden)
    if key not in _models:
        _models[key] = make_model(cfg, load_data(spec))
    return _models[key]


def _scalar(config: ConfigRecord, key: str, default: float) -> int | float | str | bytes:
    """``config[key]`` (``default`` when absent) for ``int()`` / ``float()``; a list is refused."""
    value = config.get(key, default)
    if isinstance(value, list):
        raise TypeError(f"config {key!r}: expected a number, got a list")
    return value


def _model(cfg: RunConfig, spec: DataSpec, state: dict[str, torch.Tensor]) -> nn.Module:
    """The cached model with ``state`` loaded, or a resized copy when ``state`` has other
    widths (a FedMA global model that grew)."""
    return fit_model(_cached_model(cfg, spec), state)


def _start(
    cfg: RunConfig, spec: DataSpec, pid: int, server_round: int, msg: Message
) -> dict[str, torch.Tensor]:
    """What a client trains from: the server's arrays, or (``client-init = independent``, round
    1) its own initialisation, seeded by (seed, partition id) as no round's training is."""
    if cfg.client_init == "independent" and server_round == 1:
        return make_model(cfg, load_data(spec), seed=client_seed(cfg.seed, pid, 0)).state_dict()
    return msg.content.array_records["arrays"].to_torch_state_dict()


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's shard and reply with the result."""
    cfg, spec, pid = _setup(context)
    config = msg.content.config_records["config"]
    server_round = int(_scalar(config, "server-round", 0))
    device = resolve_device(cfg.device)
    x, y = client_shard(spec, pid, str(device))
    received = _start(cfg, spec, pid, server_round, msg)
    model = _model(cfg, spec, received).to(device)
    # FedMA's matching phases: the matched layers stay frozen, the others retrain.
    frozen = fedma_frozen(config)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    result = train(
        model,
        x,
        y,
        SGDSettings.of(
            cfg,
            epochs=fedma_epochs(msg, cfg.local_epochs),
            lr=float(_scalar(config, "lr", cfg.lr)),
        ),
        seed=client_seed(cfg.seed, pid, server_round),
        device=device,
        regularizers=RequestedTerms.of(config).regularizers(model, device),
    )
    for p in model.parameters():
        p.requires_grad_(True)  # the cached model (also the vectorised path's template)
    state = model.state_dict()
    parameters = {name for name, _ in model.named_parameters()}
    for name in (frozen & set(state)) - parameters:
        state[name] = received[name]  # frozen buffers (BatchNorm statistics) are kept as sent
    reply = _train_reply(msg, cfg, state, result)
    if FEDMA_PHASE in config:  # FedMA averages the output layer with the class counts
        counts = fedma_metrics(msg, y, int(load_data(spec).num_classes))
        for key, value in counts.items():
            reply.content.metric_records["metrics"][key] = value
    return reply


def _train_reply(msg: Message, cfg: RunConfig, state: dict, result: TrainResult) -> Message:
    """The reply to a train instruction: trained arrays, FedAvg weight, training metrics."""
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
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


_fallback_logged: set[str] = set()


def train_batch(messages: list[Message], contexts: list[Context]) -> list[Message] | None:
    """Train several nodes' instructions together (vectorised); None = use the ClientApp.

    The local engine calls this with all train instructions of a round when ``vectorise`` is
    on. Each reply is what :func:`train_handler` would have sent for that node (same arrays to
    float tolerance, same metrics), so a strategy cannot tell the two paths apart. Returns
    None, and the engine calls the ClientApp node by node, when the instructions differ in
    run-config or learning rate, or the model cannot be vectorised exactly (dropout,
    BatchNorm; see ``fedmerge.vectorised``).
    """
    setups = [_setup(ctx) for ctx in contexts]
    cfg, spec, _ = setups[0]
    if not cfg.vectorise or any(s[0] != cfg or s[1] != spec for s in setups):
        return None
    configs = [m.content.config_records["config"] for m in messages]
    if any("fedma-phase" in c for c in configs):
        return None  # FedMA: per-client widths and frozen layers, trained one by one
    lrs = {float(_scalar(c, "lr", cfg.lr)) for c in configs}
    if len(lrs) != 1:
        return None
    device = resolve_device(cfg.device)
    template = _cached_model(cfg, spec)  # a stateless template: train_many never writes it
    ok, reason = can_vectorise(template)
    if not ok:
        if cfg.model not in _fallback_logged:
            _fallback_logged.add(cfg.model)
            log.warning("vectorise: %s; training clients one by one", reason)
        return None
    jobs = []
    for msg, config, (_, _, pid) in zip(messages, configs, setups, strict=True):
        terms = RequestedTerms.of(config)
        x, y = client_shard(spec, pid, str(device))
        server_round = int(_scalar(config, "server-round", 0))
        jobs.append(
            ClientJob(
                state=_start(cfg, spec, pid, server_round, msg),
                x=x,
                y=y,
                seed=client_seed(cfg.seed, pid, server_round),
                proximal_mu=terms.proximal_mu,
                wsa_target=terms.wsa_target,
                wsa_lambda=terms.wsa_lambda,
                wsa_reverse=terms.wsa_reverse,
            )
        )
    results = train_many(
        template,
        jobs,
        SGDSettings.of(cfg, lr=lrs.pop()),
        device=device,
    )
    return [
        _train_reply(msg, cfg, state, result)
        for msg, (state, result) in zip(messages, results, strict=True)
    ]


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's own shard (local-data accuracy)."""
    cfg, spec, pid = _setup(context)
    device = resolve_device(cfg.device)
    x, y = client_shard(spec, pid, str(device))
    model = _model(cfg, spec, msg.content.array_records["arrays"].to_torch_state_dict())
    loss, acc = evaluate(model, x, y, batch_size=cfg.eval_batch_size, device=device)
    metrics = MetricRecord({"num-examples": len(y), "eval-loss": loss, "eval-accuracy": acc})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
