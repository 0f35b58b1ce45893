"""Flower strategies and the ServerApp (installed as ``fedmerge.strategies``).

The library surface for a user's own ServerApp::

    from fedmerge.strategies import FedMatch, FedNPMerge, FedWSA, FedAvgFineTuned

Each is Flower's ``FedAvg`` with the aggregation replaced by a merge function
(:class:`MergeStrategy`), built from a template model (any ``nn.Module``), optional server
proxy data and keyword options (:mod:`fedmerge.options`, defaults = the run-config's).
"""

from fedmerge.npmerge import NPOptions
from fedmerge.options import FedMAOptions, FineTuneOptions, MatchOptions, WSAOptions

from .base import MergeStrategy
from .fedma import FedMA
from .fedmatch import FedMatch
from .finetune import FedAvgFineTuned, FedAvgRepaired, FedMatchFineTuned
from .merges import (
    FineTunedAverage,
    MatchedMerge,
    MergeFn,
    NPMerge,
    RepairedAverage,
    fedavg_average,
)
from .npmerge import FedNPMerge
from .validation import validated
from .wsa import FedWSA

__all__ = [
    "FedAvgFineTuned",
    "FedAvgRepaired",
    "FedMA",
    "FedMAOptions",
    "FedMatch",
    "FedMatchFineTuned",
    "FedNPMerge",
    "FedWSA",
    "FineTuneOptions",
    "FineTunedAverage",
    "MatchOptions",
    "MatchedMerge",
    "MergeFn",
    "MergeStrategy",
    "NPMerge",
    "NPOptions",
    "RepairedAverage",
    "WSAOptions",
    "fedavg_average",
    "validated",
]
