"""fedmerge: model-merging aggregation for federated learning on Non-IID data."""

__version__ = "0.1.0"
