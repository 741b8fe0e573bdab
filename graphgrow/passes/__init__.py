"""Rewrite passes over torch.fx GraphModules (``PassBase`` -> ``PassResult``)."""

from .deepen import DeepenPass
from .widen import WidenPass

__all__ = ["WidenPass", "DeepenPass"]
