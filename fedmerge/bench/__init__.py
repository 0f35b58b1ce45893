"""Benchmarks of fedmerge's engines (part of the runner layer: they may import Flower).

``python -m fedmerge.bench.throughput`` measures the local engine's training throughput
against a bare PyTorch loop doing the same local training (see that module).
"""
