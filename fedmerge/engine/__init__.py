"""Runners of the Flower apps: the in-process local engine and Flower's simulation engine."""
