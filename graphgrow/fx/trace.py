"""Capture a model as a torch.fx graph that still maps onto the user's modules.

Symbolic tracing first.  When a submodule cannot be traced (data-dependent
control flow, "same" padding computed from the input size, ...), that
submodule becomes a leaf of the graph and tracing is retried; the analysis
then treats the leaf as an op it does not understand, so the channels it
touches stay frozen.  When the model's own forward cannot be traced, a
:class:`TraceError` names the line.
"""

from __future__ import annotations

import copy
import os
import traceback

import torch
import torch.fx as fx

from ..errors import TraceError

_TORCH_DIR = os.path.dirname(torch.__file__)


class _LeafRetryTracer(fx.Tracer):
    def __init__(self, leaves):
        super().__init__()
        self.leaves = set(leaves)
        self.stack: list = []
        self.failed_stack: list | None = None

    def is_leaf_module(self, m, qualname):
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.stack.append(qualname)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_stack is None:
                self.failed_stack = list(self.stack)
            raise
        finally:
            self.stack.pop()


def _user_line(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if not fr.filename.startswith(_TORCH_DIR) and "graphgrow" not in fr.filename:
            return f"{fr.filename}:{fr.lineno} ({(fr.line or '').strip()})"
    return "an unknown line"


def trace_module(model: torch.nn.Module, max_leaves: int = 64) -> tuple:
    """Return ``(GraphModule, leaves)``; ``leaves`` lists submodules kept opaque.

    A GraphModule is not traced again: its own graph is copied (node names and ``meta`` kept, notably
    ``nn_module_stack``, which still says which container of the original model each node came from).
    """
    if isinstance(model, fx.GraphModule):
        return fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__), []
    leaves: list = []
    for _ in range(max_leaves + 1):
        tracer = _LeafRetryTracer(leaves)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            stack = tracer.failed_stack or []
            if not stack or stack[-1] in leaves:
                raise TraceError(
                    f"torch.fx cannot trace {type(model).__name__}.forward at {_user_line(exc)}: {first}"
                ) from None
            leaves.append(stack[-1])
            continue
        name = type(model).__name__
        return fx.GraphModule(tracer.root, graph, name), leaves
    raise TraceError(f"torch.fx cannot trace {type(model).__name__}: more than {max_leaves} submodules fail to trace")
