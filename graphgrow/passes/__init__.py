"""Rewrite passes over torch.fx GraphModules (``PassBase`` -> ``PassResult``)."""

from .widen import WidenPass

__all__ = ["WidenPass"]
