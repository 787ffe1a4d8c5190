"""Attributing snippets of standard-library source to their package: a model returning a dataclass (``task``)."""
