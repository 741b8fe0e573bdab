"""Block expansion on a Hugging Face ``PreTrainedModel``: copies of chosen layers inserted after them, each
with the projections that write into the residual stream zeroed, so the copy adds 0 to the stream and the
model computes the same function (LLaMA Pro's construction, exact for pre-norm blocks).

Which projections write into the stream is read from the captured graph, not from the family's module
names: the layer's output is followed back along its residual adds (the operand that depends on fewer of
the layer's parameters is the stream, the other a branch), and every branch is followed back through ops
that keep a zero zero to the linear maps producing it.  A block whose output is normalized after the add
(post-norm: BERT, OPT-350m-style) would not be the identity; it is refused with that reason.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..core.deepen import select_names
from ..core.report import GrowthReport
from ..errors import InvalidArgumentError, UnsupportedModelError, first_line
from ..fx.engine import count_params
from .capture import ModelOutputs, as_inputs, capture, input_names, rebuilt

_PREFIX = "model."  # the capture wrapper's attribute
# ops through which a zero stays zero when the named operand is zero (the others are read as constants)
_PASS_FIRST = {"reshape", "view", "expand", "to", "contiguous", "transpose", "permute", operator.getitem,
               torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
               F.dropout, torch.sum, "sum"}
_ZERO_IF_ANY = {operator.mul, torch.mul, operator.truediv, torch.div}
_SUMS = {operator.add, torch.add, operator.sub, torch.sub}
_LINEAR = {F.linear: (1, 2), torch.addmm: (2, 0), torch.matmul: (1, None)}
_NORMS = {F.layer_norm, F.rms_norm, F.group_norm}


def decoder_layers(model: nn.Module):
    """(path, ModuleList) of the model's repeated layers: the one ModuleList as long as num_hidden_layers."""
    n = getattr(model.config, "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise UnsupportedModelError(f"{type(model).__name__}: {len(found)} module lists hold num_hidden_layers={n} "
                                    "layers; block expansion needs exactly one")
    return found[0]


def chosen_layers(path: str, n: int, after) -> list:
    """Indices of the layers ``after`` chooses (a regex matching whole paths such as ``model.layers.3``, or a list
    of exact paths), by the rule every deepening uses (:func:`graphgrow.core.deepen.select_names`)."""
    names = {f"{path}.{i}": [i] for i in range(n)}
    return sorted(i for _, i in select_names(names, after, f"layer (the layers are {path}.0 ... {path}.{n - 1})"))


def _in_layer(node: fx.Node, layer: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    full = _PREFIX + layer
    return any(p == full or p.startswith(full + ".") for p, _ in stack.values())


def _param_deps(gm: fx.GraphModule, prefix: str) -> dict:
    """node -> the parameters under ``prefix`` it depends on."""
    deps: dict = {}
    for n in gm.graph.nodes:
        own = {n.target} if n.op == "get_attr" and n.target.startswith(prefix) else set()
        deps[n] = own.union(*(deps[a] for a in n.all_input_nodes)) if n.all_input_nodes else own
    return deps


def _through(n, reshapes: bool = False):
    """``n`` past casts, dropout, the first item of a tuple (and, for a layer's output, reshapes)."""
    while isinstance(n, fx.Node) and (n.target in ("to", "contiguous", F.dropout)
                                      or n.target is operator.getitem and n.args[1] == 0
                                      or reshapes and n.target in ("reshape", "view")):
        n = n.args[0]
    return n


def _zero_targets(node, deps, prefix: str, found: set) -> None:
    """Parameters whose zeroing makes ``node`` zero (the linear maps ending a branch)."""
    if node.target in _LINEAR:
        w_pos, b_pos = _LINEAR[node.target]
        w = node.args[w_pos] if len(node.args) > w_pos else None
        if isinstance(w, fx.Node) and w.op == "get_attr" and w.target.startswith(prefix):
            found.add(w.target)
            b = node.args[b_pos] if b_pos is not None and len(node.args) > b_pos else None
            if isinstance(b, fx.Node) and b.op == "get_attr":
                found.add(b.target)
            return
    if node.op == "get_attr" and node.target.startswith(prefix):  # a bias or a layer scale added last
        found.add(node.target)
        return
    if node.target is F.rms_norm:  # RMSNorm(0) = 0: its input is the branch's value
        return _zero_targets(node.args[0], deps, prefix, found)
    if node.target in _PASS_FIRST:
        return _zero_targets(node.args[0], deps, prefix, found)
    if node.target in _SUMS:
        for a in node.args[:2]:
            if isinstance(a, fx.Node) and deps[a]:
                _zero_targets(a, deps, prefix, found)
        return
    if node.target in _ZERO_IF_ANY:
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and deps[a]]
        if operands:  # the operand carrying more of the layer's parameters is the branch's value
            return _zero_targets(max(operands, key=lambda a: len(deps[a])), deps, prefix, found)
    raise UnsupportedModelError(f"the branch ending at node {node.name!r} ({getattr(node.target, '__name__', node.target)}) "
                                "is not a linear map of the layer's parameters: its copy cannot be made to add 0")


def _residual_terms(node, deps, layer_nodes) -> list:
    """The terms of the sum ``node`` computes through the layer's adds (the residual chain, parallel branches)."""
    node = _through(node, reshapes=True)
    if isinstance(node, fx.Node) and node in layer_nodes and node.target in (operator.add, torch.add) and \
            all(isinstance(a, fx.Node) for a in node.args[:2]):
        return [t for a in node.args[:2] for t in _residual_terms(a, deps, layer_nodes)]
    return [node]


def branch_outputs(gm: fx.GraphModule, layer) -> set:
    """The state_dict keys to zero so that a copy of ``layer`` adds nothing to the residual stream: the layer's
    output is a sum (through its residual adds) of one term that does not depend on the layer's parameters
    (the stream) and branches that do; every branch is followed back to the linear maps that produce it.
    ``layer=None``: ``gm`` is the captured block alone (keys relative to it)."""
    if layer is None:  # the graph is the block itself
        prefix, nodes = "", [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        exits = [next(n for n in gm.graph.nodes if n.op == "output").args[0]]
        layer = "the block"
    else:
        prefix = layer + "."
        nodes = [n for n in gm.graph.nodes if _in_layer(n, layer)]
        if not nodes:
            raise UnsupportedModelError(f"no op of the captured graph belongs to {layer!r}")
        exits = [n for n in nodes if any(u not in set(nodes) for u in n.users)]
    deps = _param_deps(gm, prefix)
    inside = set(nodes)
    out = _through(exits[-1], reshapes=True)
    if out.target in _NORMS or out.target is torch.rsqrt or out.target == "mean":
        raise UnsupportedModelError(f"{layer} normalizes after its residual add (a post-norm block): a copy "
                                    "with zeroed projections would not be the identity")
    terms = _residual_terms(out, deps, inside)
    stream = [t for t in terms if not deps.get(t)]
    branches = [t for t in terms if deps.get(t)]
    if len(terms) < 2 or len(stream) != 1:
        last = getattr(out.target, "__name__", out.target)
        raise UnsupportedModelError(f"{layer} does not end in a residual add of its input and its branches (it ends "
                                    f"in {last}): block copy needs one")
    found: set = set()
    for branch in branches:
        b = _through(branch)
        if b.target in _NORMS and b.target is not F.rms_norm:
            raise UnsupportedModelError(f"{layer}: a branch ends in a norm with a bias: a zeroed copy would not add 0")
        _zero_targets(b, deps, prefix, found)
    return found


class LayerCopies:
    """Where each key goes when copies of the ``chosen`` layers of ``path`` are inserted after them: the
    copies' branch outputs (``zeroed``: layer -> keys) are zero, the later layers renumbered."""

    def __init__(self, path: str, n: int, chosen: list, zeroed: dict):
        self.head, self.zeroed = path + ".", zeroed
        self.index, k = {}, 0
        for i in range(n):
            self.index[i] = [k] + ([k + 1] if i in chosen else [])
            k += 1 + (i in chosen)

    def targets(self, key: str) -> list:
        """[(new key, zero?)] for one key of the original state_dict."""
        if not key.startswith(self.head):
            return [(key, False)]
        idx, _, rest = key[len(self.head):].partition(".")
        first, *copies = self.index[int(idx)]
        return [(f"{self.head}{first}.{rest}", False)] + \
            [(f"{self.head}{c}.{rest}", key in self.zeroed.get(int(idx), ())) for c in copies]

    def state(self, state: dict) -> dict:
        return {new: (torch.zeros_like(t) if zero else t.clone() if new != key else t)
                for key, t in state.items() for new, zero in self.targets(key)}


def deepened_config(config, n: int, chosen: list):
    """num_hidden_layers grown; every per-layer list (layer_types, ...) gets the copied layer's entry."""
    new = copy.deepcopy(config)
    new.num_hidden_layers = n + len(chosen)
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == n and key != "architectures":
            grown = []
            for i, v in enumerate(value):
                grown.extend([v, v] if i in chosen else [v])
            setattr(new, key, grown)
    return new


def deepen_pretrained(model, *, after, block: str = "copy", example_inputs, seed: int = 0, verify: str = "torch",
                      atol=None, rtol=None):
    """:func:`graphgrow.deepen` for a ``transformers.PreTrainedModel``: block expansion (``block="copy"``)."""
    if block != "copy":
        raise InvalidArgumentError(f"block={block!r} on a transformers model: use block='copy' (a copy of the layer "
                                   "with its output projections zeroed, stated by num_hidden_layers)")
    inputs = as_inputs(example_inputs)
    path, layers = decoder_layers(model)
    n = len(layers)
    chosen = chosen_layers(path, n, after)
    gm = capture(model, inputs)
    zeroed = {i: branch_outputs(gm, f"{path}.{i}") for i in chosen}
    state = LayerCopies(path, n, chosen, zeroed).state(model.state_dict())
    config = deepened_config(model.config, n, chosen)
    try:
        result = rebuilt(model, config, state)
    except RuntimeError as exc:  # the family builds the copy's position differently (a dense first layer, ...)
        raise UnsupportedModelError(f"{type(model).__name__} builds layer {chosen[0] + 1} differently from layer "
                                    f"{chosen[0]}, so a copy does not fit there: {first_line(exc)}") from None
    report = GrowthReport([], params_before=count_params(model), params_after=count_params(result))
    report.notes.append(f"config num_hidden_layers: {n} -> {n + len(chosen)}")
    for i in chosen:
        report.notes.append(f"{path}.{i} copied after itself, zeroed: {', '.join(sorted(zeroed[i]))}")
    if verify != "none":
        from ..api import verify_growth

        names = input_names(inputs)
        verify_growth(ModelOutputs(model, names), ModelOutputs(result, names), inputs, report, "deepened", verify, atol,
                      rtol, seed)
    result.graphgrow_report = report
    return result
