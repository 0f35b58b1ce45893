"""quickstart-fedmerge: a Flower app (PyTorch, MNIST) aggregated by fedmerge's strategies."""
