"""Flower strategies and the ServerApp (installed as ``fedmerge.strategies``)."""
