"""Experiments built on the library, never under it: the one-shot merge table
(:mod:`.one_shot`), linear mode connectivity (:mod:`.connectivity`) and the weight-averaging
analyses (:mod:`.analysis`).

The library core (datasets, partitions, models, permutations, matching, merging, npmerge,
scopes, training) imports nothing from here, nor from the bench, the engines, the strategies or
Flower (``tests/test_layers.py``).
"""
