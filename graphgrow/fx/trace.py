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

from ..errors import TraceError, first_line

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
    ``nn_module_stack``, which still says which container of the original model each node came from), and only
    its calls to modules that symbolic tracing would enter (a ``Sequential`` put there by a rewrite) are
    inlined; those that do not inline into one graph stay leaves.
    """
    if isinstance(model, fx.GraphModule):
        gm = fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and
                 not _STANDARD_LEAF.is_leaf_module(gm.get_submodule(n.target), n.target)]
        leaves = [n.target for n in calls if inline_call(gm, n) is None]
        gm.recompile()
        return gm, list(dict.fromkeys(leaves))
    leaves: list = []
    for _ in range(max_leaves + 1):
        tracer = _LeafRetryTracer(leaves)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported
            stack = tracer.failed_stack or []
            if not stack or stack[-1] in leaves:
                raise TraceError(
                    f"torch.fx cannot trace {type(model).__name__}.forward at {_user_line(exc)}: {first_line(exc)}"
                ) from None
            leaves.append(stack[-1])
            continue
        name = type(model).__name__
        return fx.GraphModule(tracer.root, graph, name), leaves
    raise TraceError(f"torch.fx cannot trace {type(model).__name__}: more than {max_leaves} submodules fail to trace")


def trace_with_leaves(model: torch.nn.Module, leaves) -> fx.GraphModule:
    """Symbolic tracing that keeps the submodules ``leaves`` (paths) as single ``call_module`` nodes."""
    tracer = _LeafRetryTracer(leaves)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported
        raise TraceError(f"torch.fx cannot trace {type(model).__name__}.forward at {_user_line(exc)}: "
                         f"{first_line(exc)}") from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


_STANDARD_LEAF = fx.Tracer()


def _stack_path(key, val) -> str:
    return val[0] if isinstance(val, tuple) and val and isinstance(val[0], str) else str(key).split("@")[0]


def inline_call(gm: fx.GraphModule, node: fx.Node):
    """Replace the ``call_module`` ``node`` by the traced body of its module, in place; return the node that now
    holds its value, or None (and change nothing) when the module does not trace into one tensor-valued graph
    (several outputs, ``*args``, a missing argument).

    This is what symbolic tracing of the whole model would have given for a module that is no leaf (a
    ``Sequential`` put into a graph by a rewrite): ``call_module`` targets and ``get_attr`` paths get the
    module's path as prefix, and each new node's ``nn_module_stack`` is the call's stack followed by the
    module's inner calls, so container names keep resolving.  The caller recompiles.
    """
    path = node.target
    mod = gm.get_submodule(path)
    try:
        sub, _leaves = trace_module(mod)
    except TraceError:
        return None
    phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
    out = next(n for n in sub.graph.nodes if n.op == "output")
    if not isinstance(out.args[0], fx.Node) or len(node.args) > len(phs) or any(p.target.startswith("*") for p in phs):
        return None
    env = {}
    for i, ph in enumerate(phs):
        if i < len(node.args):
            env[ph] = node.args[i]
        elif ph.target in node.kwargs:
            env[ph] = node.kwargs[ph.target]
        elif ph.args:
            env[ph] = ph.args[0]
        else:
            return None
    if set(node.kwargs) - {ph.target for ph in phs[len(node.args):]}:
        return None
    outer = dict(node.meta.get("nn_module_stack") or {})
    if not outer or _stack_path(*list(outer.items())[-1]) != path:
        outer[path] = (path, type(mod))
    taken = {k for n in gm.graph.nodes for k in (n.meta.get("nn_module_stack") or {})}
    keys: dict = {}

    def inner_key(key) -> str:
        if key not in keys:
            base, k = f"{path}.{key}", 1
            name = base
            while name in taken:
                name, k = f"{base}@{k}", k + 1
            taken.add(name)
            keys[key] = name
        return keys[key]

    with gm.graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            target = f"{path}.{n.target}" if n.op in ("call_module", "get_attr") else n.target
            new = gm.graph.create_node(n.op, target, fx.node.map_arg(n.args, env.__getitem__),
                                       fx.node.map_arg(n.kwargs, env.__getitem__), type_expr=n.type)
            stack = dict(outer)
            for key, val in (n.meta.get("nn_module_stack") or {}).items():
                stack[inner_key(key)] = (f"{path}.{_stack_path(key, val)}", val[1] if isinstance(val, tuple) and
                                         len(val) > 1 else None)
            new.meta["nn_module_stack"] = stack
            env[n] = new
    result = env[out.args[0]]
    node.replace_all_uses_with(result)
    gm.graph.erase_node(node)
    return result
