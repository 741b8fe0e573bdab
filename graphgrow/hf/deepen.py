"""Block expansion on a Hugging Face ``PreTrainedModel``: copies of chosen layers inserted after them, each
with the projections that write into the residual stream zeroed, so the copy adds 0 to the stream and the
model computes the same function (LLaMA Pro's construction, exact for pre-norm blocks).

Which projections write into the stream is read from the captured graph, not from the family's module
names, by the residual-branch walk of :mod:`graphgrow.core.branches` (the fx reading of each node:
:mod:`graphgrow.fx.branches`).  A block whose output is normalized after the add (post-norm: BERT,
OPT-350m-style) would not be the identity; it is refused with that reason.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..core.deepen import select_names
from ..core.report import GrowthReport
from ..errors import InvalidArgumentError, UnsupportedModelError, first_line
from ..fx.branches import branch_outputs
from ..fx.engine import count_params
from ..verify import verify_growth
from .capture import ModelOutputs, as_inputs, capture, input_names, rebuilt


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
        names = input_names(inputs)
        verify_growth(ModelOutputs(model, names), ModelOutputs(result, names), inputs, report, "deepened", verify, atol,
                      rtol, seed)
    result.graphgrow_report = report
    return result
