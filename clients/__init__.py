"""The Flower ClientApp (installed as ``fedmerge.clients``)."""
