"""``FedMA``: federated matched averaging, layer by layer (Wang et al., ICLR 2020, arXiv
2002.06440), as a Flower strategy.

One FedMA round is several Flower rounds, one per *phase*:

- phase 0 (train): the sampled clients train the whole global model (``local-epochs``) and
  send it back;
- phase ``n = 1 .. N`` (N = the hidden layers of the chain): the server matches layer ``n``
  of the models the clients sent by BBP-MAP (:func:`fedmerge.matching.bbp.bbp_map`; the layer
  may grow) and sends each client its model with layers ``1..n`` replaced by the global ones,
  frozen, and its layer ``n+1`` reading its inputs at the global positions its units were
  matched to; the client retrains the layers above ``n`` (``fedma-retrain-epochs``) and sends
  its model back. The frozen entries must come back unchanged (a reply that changed one is
  dropped);
- after phase ``N`` the output layer is averaged with the clients' class counts, and the
  global model is complete; the next Flower round starts the next FedMA round.

With ``fedma-one-shot`` a FedMA round is the train phase alone: the server matches every
hidden layer of the models the clients sent, one after another with no retraining between
layers (:func:`fedmerge.fedma.match_chain`), and averages the output layer (FedMA's one-shot
mode, which is PFNM's extension to deep networks).

The global arrays this strategy returns in phases ``0 .. N-1`` are the last complete global
model (so central evaluation measures what a client would receive); the new one is returned
after phase ``N``.

Clients keep nothing between phases: each phase's instruction carries the client's whole
model, and the reply the whole model back (clients stay stateless, so a run resumes in the
middle of a FedMA round and a client that restarts loses nothing). This sends more than
FedMA's paper counts (the layer matched and the one above it): the round metrics report the
bytes actually sent both ways. A client that misses a phase leaves the FedMA round (counted in
``fedma-dropped``); it trains again from the next round's global model.

Round metrics (per phase): ``fedma-phase``, ``fedma-layer`` (the layer matched, 0 in the
train phase), ``fedma-width-<perm>`` (every layer's global units), ``fedma-units-matched`` and
``fedma-units-new`` (client units that joined an existing global unit or opened one),
``fedma-clients``, ``fedma-dropped``, ``fedma-mb-down`` / ``fedma-mb-up`` (megabytes of arrays
sent to and received from the clients this phase).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log
from torch import nn

from fedmerge.client_side import FEDMA_CLASS_COUNTS as CLASS_COUNTS_KEY
from fedmerge.client_side import FEDMA_EPOCHS as EPOCHS_KEY
from fedmerge.client_side import FEDMA_FROZEN as FROZEN_KEY
from fedmerge.client_side import FEDMA_PHASE as PHASE_KEY
from fedmerge.fedma import average_last, chain_layers, fedma_widths, match_chain, match_layer
from fedmerge.models import model_spec
from fedmerge.options import FedMAOptions
from fedmerge.permutations import State

from .base import MergeStrategy
from .checkpoint import reply_digest
from .replies import client_states, metric_list


def _mb(arrays: ArrayRecord) -> float:
    return sum(a.numpy().nbytes for a in arrays.values()) / 1e6


class FedMA(MergeStrategy):
    """FedMA on Flower: BBP-MAP matching one layer per Flower round, frozen-prefix retraining.

    Parameters
    ----------
    model : torch.nn.Module
        A template of the architecture: a chain of layers (the registry's ``mlp``, ``cnn``,
        ``vgg9``, or a model with such a spec). Not modified.
    options : FedMAOptions, optional
        The ``fedma-*`` options; keyword arguments named as its fields change them.
    example_input : Tensor, optional
        For spec inference when the model declares no ``permutation_spec()``.
    seed : int
        Seeds BBP-MAP's sweeps (plus the Flower round).
    **kwargs
        The option fields above, and FedAvg's (``fraction_train``, ``min_train_nodes``, ...).

    Raises
    ------
    fedmerge.fedma.FedMAError
        A model that is no chain of layers (a residual stream, attention heads), naming the
        permutation.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        options: FedMAOptions | None = None,
        example_input: torch.Tensor | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        changes, rest = FedMAOptions.split(kwargs)
        super().__init__(seed=seed, **rest)
        self.options = FedMAOptions.build(options, **changes)
        self.spec = model_spec(model, example_input)
        self.layers = chain_layers(self.spec)
        self.phase = 0
        self.nodes: list[int] = []  # this FedMA round's clients, in order
        self.outbox: dict[int, dict[str, torch.Tensor]] = {}  # per node: its next model
        self.frozen: list[str] = []  # entries the clients must keep in this phase
        self.complete: dict[str, torch.Tensor] | None = None  # the last complete global model
        self._mb_down = 0.0  # megabytes of this phase's instructions

    @property
    def merge_name(self) -> str:
        return "fedma"

    @property
    def phases(self) -> int:
        """Flower rounds per FedMA round: the train phase and one per hidden layer (one in
        the one-shot mode)."""
        return 1 if self.options.one_shot else len(self.layers) + 1

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> FedMA: %d phases per round, %s", self.phases, self.options)

    # -- checkpoint ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue in the middle of a FedMA round."""
        return {
            "phase": self.phase,
            "nodes": list(self.nodes),
            "outbox": {str(k): v for k, v in self.outbox.items()},
            "frozen": list(self.frozen),
            "complete": self.complete,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.phase = int(state["phase"])
        self.nodes = [int(n) for n in state["nodes"]]
        self.outbox = {int(k): dict(v) for k, v in state["outbox"].items()}
        self.frozen = list(state["frozen"])
        self.complete = state["complete"]

    # -- instructions -------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Phase 0: FedAvg's sampling, the global model to all; later: each node its own."""
        if self.phase == 0 or not self.nodes:
            self.phase = 0
            self.complete = arrays.to_torch_state_dict()
            config = ConfigRecord({**config, PHASE_KEY: 0, FROZEN_KEY: ""})
            messages = list(super().configure_train(server_round, arrays, config, grid))
            self.nodes = [m.metadata.dst_node_id for m in messages]
            self._mb_down = _mb(arrays) * len(messages)
            return messages
        config = ConfigRecord(
            {
                **config,
                "server-round": server_round,
                PHASE_KEY: self.phase,
                FROZEN_KEY: ",".join(self.frozen),
                EPOCHS_KEY: self.options.retrain_epochs,
            }
        )
        messages = []
        self._mb_down = 0.0
        for node in self.nodes:
            record = ArrayRecord(self.outbox[node])
            self._mb_down += _mb(record)
            content = RecordDict({self.arrayrecord_key: record, self.configrecord_key: config})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    # -- aggregation --------------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Match the next layer (or average the output layer) of the clients' models."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        valid = [r for r in valid if r.metadata.src_node_id in self.nodes]
        valid = [r for r in valid if self._kept_frozen(r)]
        # BBP-MAP's result depends on the order of the clients: order them by content, not by
        # arrival or node id, so that any engine (node ids differ) gives the same model.
        valid.sort(key=reply_digest)
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        metrics = metrics if metrics is not None else MetricRecord()
        if CLASS_COUNTS_KEY in metrics:
            del metrics[CLASS_COUNTS_KEY]  # per-client counts; their weighted mean means nothing
        replied = [r.metadata.src_node_id for r in valid]
        if not valid:  # nobody left: the FedMA round ends without a new model
            self.phase, self.nodes, self.outbox, self.frozen = 0, [], {}, []
            return None, None
        states, weights = client_states(valid, self.weighted_by_key)
        with self.merge_resources():
            return self._merge_phase(valid, replied, states, weights, metrics, server_round)

    def _merge_phase(
        self,
        valid: list[Message],
        replied: list[int],
        states: list[State],
        weights: list[float],
        metrics: MetricRecord,
        server_round: int,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The phase's matching (or the output layer's average) and its metrics."""
        phase, layer = self.phase, self.phase + 1
        dropped = len(self.nodes) - len(replied)
        mb_up = sum(_mb(r.content.array_records[self.arrayrecord_key]) for r in valid)
        report: dict[str, float] = {}
        out: dict[str, torch.Tensor] | None
        if self.options.one_shot:  # every layer now, no retraining between them
            chain = match_chain(
                states,
                self.spec,
                weights,
                class_counts=self._class_counts(valid),
                options=self.options,
                seed=self.seed + server_round,
            )
            self.phase, self.nodes, self.outbox, self.frozen = 0, [], {}, []
            self.complete = out = current = chain.state
            report = {
                "fedma-units-matched": sum(chain.matched.values()),
                "fedma-units-new": sum(chain.new_units.values()),
            }
            layer = len(self.layers) + 1  # reported as the output layer's phase: 0
        elif layer <= len(self.layers):
            found = match_layer(
                states,
                self.spec,
                self.layers,
                layer - 1,
                self.options,
                seed=self.seed + server_round,
            )
            self.nodes = replied
            self.outbox = dict(zip(replied, found.states, strict=True))
            self.frozen = found.frozen
            self.phase = layer
            report = {"fedma-units-matched": found.matched, "fedma-units-new": found.opened}
            out, current = self.complete, found.states[0]
        else:  # the output layer: averaged with class counts, the global model complete
            counts = self._class_counts(valid)
            out = average_last(states, self.spec, self.layers, weights, counts)
            self.phase, self.nodes, self.outbox, self.frozen = 0, [], {}, []
            self.complete = current = out
        assert out is not None
        widths = fedma_widths(self.spec, current)
        metrics["fedma-phase"] = phase
        metrics["fedma-layer"] = layer if layer <= len(self.layers) else 0
        for perm, width in widths.items():
            metrics[f"fedma-width-{perm}"] = width
        metrics["fedma-clients"] = len(valid)
        metrics["fedma-dropped"] = dropped
        metrics["fedma-mb-down"] = self._mb_down
        metrics["fedma-mb-up"] = mb_up
        for key, value in report.items():
            metrics[key] = value
        return ArrayRecord(out), metrics

    def _kept_frozen(self, reply: Message) -> bool:
        """Whether a reply sends the frozen entries back as they were sent (else dropped)."""
        if not self.frozen:
            return True
        node = reply.metadata.src_node_id
        sent = self.outbox.get(node, {})
        arrays = reply.content.array_records[self.arrayrecord_key]
        for name in self.frozen:
            if name not in arrays or not np.array_equal(arrays[name].numpy(), sent[name].numpy()):
                log(INFO, "fedma: node %s changed the frozen entry %s: reply dropped", node, name)
                return False
        return True

    def _class_counts(self, replies: list[Message]) -> list[list[float]] | None:
        """The clients' class counts, when every reply has them."""
        counts = []
        for reply in replies:
            metrics = next(iter(reply.content.metric_records.values()), None)
            if metrics is None or CLASS_COUNTS_KEY not in metrics:
                return None
            counts.append([float(c) for c in metric_list(metrics, CLASS_COUNTS_KEY)])
        return counts
