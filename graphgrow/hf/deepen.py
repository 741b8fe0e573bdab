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
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..core.deepen import select_names
from ..core.report import GrowthReport
from ..errors import InvalidArgumentError, UnsupportedModelError
from ..fx.branches import branch_outputs
from ..fx.engine import count_params
from ..verify import verify_growth
from .capture import ModelOutputs, as_inputs, capture, input_names, rebuilt
from .config import meta_shapes


# the config fields stating each stack's depth in an encoder-decoder (BART/Marian/M2M100/Whisper, T5), in order
_STACK_FIELDS = (("encoder", ("encoder_layers", "num_layers")), ("decoder", ("decoder_layers", "num_decoder_layers")))


@dataclass
class Stack:
    """One stack of repeated layers: its ModuleList's path, depth and the config field stating the depth."""

    path: str
    n: int
    field: str


def _outermost_lists(model: nn.Module, n: int, role: str = "") -> list:
    """The paths of ModuleLists of length ``n`` (under a path segment ``role`` where given), not nested in
    another such list (a T5 block's own list of sublayers is not a stack)."""
    found = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n
             and (not role or role in name.split("."))]
    return [p for p in found if not any(p.startswith(q + ".") for q in found)]


def layer_stacks(model: nn.Module) -> list:
    """The model's stacks of repeated layers: the one ModuleList as long as num_hidden_layers, or for an
    encoder-decoder the encoder's and the decoder's (each with the config field stating its depth)."""
    cfg, name = model.config, type(model).__name__
    if getattr(cfg, "is_encoder_decoder", False):
        stacks = []
        for role, fields in _STACK_FIELDS:
            field = next((f for f in fields if isinstance(getattr(cfg, f, None), int)), None)
            if field is None:
                raise UnsupportedModelError(f"{name}: the config states no {role} depth ({' or '.join(fields)}), so "
                                            "a deeper model cannot be stated")
            paths = _outermost_lists(model, getattr(cfg, field), role)
            if len(paths) != 1:
                raise UnsupportedModelError(f"{name}: {len(paths)} {role} module lists hold {field}="
                                            f"{getattr(cfg, field)} layers; block expansion needs exactly one")
            stacks.append(Stack(paths[0], getattr(cfg, field), field))
        return stacks
    n = getattr(cfg, "num_hidden_layers", None)
    paths = _outermost_lists(model, n) if isinstance(n, int) else []
    if len(paths) != 1:
        raise UnsupportedModelError(f"{name}: {len(paths)} module lists hold num_hidden_layers={n} layers; block "
                                    "expansion needs exactly one")
    return [Stack(paths[0], n, "num_hidden_layers")]


def chosen_layers(stacks: list, after) -> dict:
    """path -> sorted indices of the layers ``after`` chooses in that stack (a regex matching whole paths such
    as ``model.layers.3``, or a list of exact paths; layers of several stacks at once), by the rule every
    deepening uses (:func:`graphgrow.core.deepen.select_names`)."""
    names = {f"{s.path}.{i}": [(s.path, i)] for s in stacks for i in range(s.n)}
    listed = "; ".join(f"{s.path}.0 ... {s.path}.{s.n - 1}" for s in stacks)
    chosen: dict = {s.path: [] for s in stacks}
    for _, (path, i) in select_names(names, after, f"layer (the layers are {listed})"):
        chosen[path].append(i)
    return {p: sorted(set(v)) for p, v in chosen.items()}


class LayerCopies:
    """Where each key goes when copies of the chosen layers (``chosen``: stack path -> indices) are inserted
    after them: the copies' branch outputs (``zeroed``: layer path -> keys) are zero, later layers renumbered."""

    def __init__(self, stacks: list, chosen: dict, zeroed: dict, left_out=frozenset()):
        self.zeroed, self.left_out = zeroed, left_out
        self.index: dict = {}  # stack head -> old index -> new indices (the layer, then its copy)
        for s in stacks:
            index, k = {}, 0
            for i in range(s.n):
                index[i] = [k] + ([k + 1] if i in chosen[s.path] else [])
                k += 1 + (i in chosen[s.path])
            self.index[s.path + "."] = index

    def targets(self, key: str) -> list:
        """[(new key, zero?)] for one key of the original state_dict."""
        head = next((h for h in self.index if key.startswith(h)), None)
        if head is None:
            return [(key, False)]
        idx, _, rest = key[len(head):].partition(".")
        first, *copies = self.index[head][int(idx)]
        zero = key in self.zeroed.get(f"{head}{idx}", ())
        return [(f"{head}{first}.{rest}", False)] + [(f"{head}{c}.{rest}", zero) for c in copies
                                                     if f"{head}{c}.{rest}" not in self.left_out]

    def state(self, state: dict) -> dict:
        return {new: (torch.zeros_like(t) if zero else t.clone() if new != key else t)
                for key, t in state.items() for new, zero in self.targets(key)}


def deepened_config(config, stacks: list, chosen: dict):
    """Each stack's depth field grown; for one stack, every per-layer list (layer_types, ...) gets the copied
    layer's entry."""
    new = copy.deepcopy(config)
    for s in stacks:
        setattr(new, s.field, s.n + len(chosen[s.path]))
    if len(stacks) == 1:
        (s,) = stacks
        for key, value in config.to_dict().items():
            if isinstance(value, list) and len(value) == s.n and key != "architectures":
                grown = []
                for i, v in enumerate(value):
                    grown.extend([v, v] if i in chosen[s.path] else [v])
                setattr(new, key, grown)
    return new


@dataclass
class CopyPlan:
    """Block expansion of one model: its stacks, the chosen layers, what each copy zeroes, the new config."""

    stacks: list
    chosen: dict
    zeroed: dict
    config: object
    left_out: frozenset = frozenset()  # copies' keys the family does not build at the copy's position
    built: dict = field(default_factory=dict)  # key -> shape of the family built from ``config``

    @property
    def copies(self) -> LayerCopies:
        return LayerCopies(self.stacks, self.chosen, self.zeroed, self.left_out)

    def notes(self) -> list:
        out = [f"config {s.field}: {s.n} -> {s.n + len(self.chosen[s.path])}" for s in self.stacks
               if self.chosen[s.path]]
        out += [f"{layer} copied after itself, zeroed in the copy: {', '.join(sorted(keys))}"
                for layer, keys in self.zeroed.items()]
        if self.left_out:
            out.append(f"left out of the copies (the family does not build them at the copy's position): "
                       f"{', '.join(sorted(self.left_out))}")
        depths = [s.n + len(self.chosen[s.path]) for s in self.stacks]
        if len(depths) == 2 and depths[1] > depths[0]:
            # transformers sizes an encoder-decoder's default decoder cache by num_hidden_layers (the encoder's)
            out.append(f"the decoder ({depths[1]} layers) is now deeper than the encoder ({depths[0]}): generate() "
                       "needs past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()), a cache that "
                       "grows as layers are met")
        return out


def plan_copies(model: nn.Module, after, capture_graph) -> CopyPlan:
    """The :class:`CopyPlan` of ``model`` for ``after``; ``capture_graph()`` gives its lifted capture."""
    stacks = layer_stacks(model)
    chosen = chosen_layers(stacks, after)
    gm = capture_graph()
    zeroed = {f"{p}.{i}": branch_outputs(gm, f"{p}.{i}") for p, idx in chosen.items() for i in idx}
    plan = CopyPlan(stacks, chosen, zeroed, deepened_config(model.config, stacks, chosen))
    # a parameter the family builds only in its first layer (T5's relative position bias, which the later
    # layers receive from it) is not built in a copy of that layer: left out; verification decides
    plan.built = meta_shapes(type(model), plan.config)
    copied = {new for key in model.state_dict() for new, _ in plan.copies.targets(key)[1:]}
    plan.left_out = frozenset(k for k in copied if k not in plan.built)
    return plan


def require_fits(model: nn.Module, plan: CopyPlan, shapes: dict) -> None:
    """UnsupportedModelError (one sentence) unless the deeper config builds exactly the planned tensors
    (``shapes``: new key -> shape): a family that builds a layer differently from the one before it (DeepSeek's
    dense first layers) has no place for a copy there; from_pretrained would start such a tensor at random."""
    heads = tuple(s.path + "." for s in plan.stacks)
    wrong = sorted(k for k in shapes if plan.built.get(k) != tuple(shapes[k])) + \
        sorted(k for k in plan.built if k not in shapes and k.startswith(heads))
    if wrong:
        first = next(f"{p}.{idx[0]}" for p, idx in plan.chosen.items() if idx)
        k = wrong[0]
        have = "does not build it" if k not in plan.built else f"builds it as {list(plan.built[k])}"
        give = "does not hold it" if k not in shapes else f"gives {list(shapes[k])}"
        raise UnsupportedModelError(f"{type(model).__name__} builds the layers after {first} differently from the copy "
                                    f"inserted there: for {k!r} the deeper config {have}, the copy {give}")


def deepen_pretrained(model, *, after, block: str = "copy", example_inputs, seed: int = 0, verify: str = "torch",
                      atol=None, rtol=None):
    """:func:`graphgrow.deepen` for a ``transformers.PreTrainedModel``: block expansion (``block="copy"``)."""
    if block != "copy":
        raise InvalidArgumentError(f"block={block!r} on a transformers model: use block='copy' (a copy of the layer "
                                   "with its output projections zeroed, stated by num_hidden_layers)")
    inputs = as_inputs(example_inputs)
    plan = plan_copies(model, after, lambda: capture(model, inputs))
    state = plan.copies.state(model.state_dict())
    require_fits(model, plan, {k: tuple(v.shape) for k, v in state.items()})
    result = rebuilt(model, plan.config, state)
    report = GrowthReport([], params_before=count_params(model), params_after=count_params(result))
    report.notes.extend(plan.notes())
    if verify != "none":
        names = input_names(inputs)
        verify_growth(ModelOutputs(model, names), ModelOutputs(result, names), inputs, report, "deepened", verify, atol,
                      rtol, seed)
    result.graphgrow_report = report
    return result
