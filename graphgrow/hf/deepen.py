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
from ..errors import InvalidArgumentError, UnsupportedModelError, first_line
from ..fx.branches import branch_outputs
from ..fx.engine import count_params
from ..verify import verify_growth
from .capture import ModelOutputs, as_inputs, capture, input_names, rebuilt
from .stacks import Stack, deepened_config, layer_stacks, signature  # noqa: F401 - Stack re-exported for callers


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
        head = max((h for h in self.index if key.startswith(h)), key=len, default=None)
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


@dataclass
class CopyPlan:
    """Block expansion of one model: its stacks, the chosen layers, what each copy zeroes, the new config."""

    stacks: list
    chosen: dict
    zeroed: dict
    config: object
    left_out: frozenset = frozenset()  # copies' keys the family does not build at the copy's position
    built: dict = field(default_factory=dict)  # key -> shape of the family built from ``config``
    fresh: frozenset = frozenset()  # keys the family builds at a copy's position that the copied layer lacks
    moved: str = ""  # how the deeper config builds a layer differently at its new position ("" where it does not)
    deeper: object = field(default=None, repr=False)  # the family built from ``config`` on the meta device
    old_config: object = field(default=None, repr=False)

    @property
    def copies(self) -> LayerCopies:
        return LayerCopies(self.stacks, self.chosen, self.zeroed, self.left_out)

    def notes(self) -> list:
        out = [f"config {s.label}: {s.n} -> {s.n + len(self.chosen[s.path])}" for s in self.stacks
               if self.chosen[s.path]]
        out += [f"{layer} copied after itself, zeroed in the copy: {', '.join(sorted(keys))}"
                for layer, keys in self.zeroed.items()]
        if self.old_config is not None:
            old = self.old_config.to_dict()
            # the depth fields (and their aliases: DBRX's n_layers) are noted above
            depth = [s.field for s in self.stacks] + [(s.n, s.n + len(self.chosen[s.path])) for s in self.stacks]
            out += [f"config {k}: {old.get(k)} -> {v} (each layer built as before at its new position)"
                    for k, v in self.config.to_dict().items()
                    if old.get(k) != v and k not in depth and (old.get(k), v) not in depth]
        if self.fresh:
            out.append(f"built fresh in the copies, at the family's initial values (the copied layer has none; the "
                       f"family builds them at the copy's position): {', '.join(sorted(self.fresh))}")
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
    plan = CopyPlan(stacks, chosen, zeroed, deepened_config(model.config, stacks, chosen), old_config=model.config)
    with torch.device("meta"):
        plan.deeper = type(model)(copy.deepcopy(plan.config))
    plan.built = {k: tuple(v.shape) for k, v in plan.deeper.state_dict().items()}
    # a parameter the family builds only in its first layer (T5's relative position bias, which the later
    # layers receive from it) is not built in a copy of that layer: left out; one it builds at the copy's
    # position only (ModernBERT's attn_norm, an Identity in layer 0) starts at its initial value; verification
    # decides both
    copied = {new for key in model.state_dict() for new, _ in plan.copies.targets(key)[1:]}
    plan.left_out = frozenset(k for k in copied if k not in plan.built)
    at_copies = tuple(f"{s.path}.{c}." for s in stacks for i in chosen[s.path]
                      for c in plan.copies.index[s.path + "."][i][1:])
    plan.fresh = frozenset(k for k in plan.built if k.startswith(at_copies) and k not in copied)
    with torch.device("meta"):  # built afresh as the deeper one is (Swin's forward resets its shift_size)
        plan.moved = moved_differently(type(model)(copy.deepcopy(model.config)), plan)
    return plan


def moved_differently(model: nn.Module, plan: CopyPlan) -> str:
    """How the deeper config builds one of the model's layers differently at its new position ("" where every
    layer is built as before): a family whose layers alternate by position (Swin's shifted windows) has no
    place for a copy before a layer of the other kind."""
    for s in plan.stacks:
        depths = (s.n, s.n + len(plan.chosen[s.path]))

        def differs(a, b):  # a per-layer list a layer keeps whole (GPT-Neo's attention_layers) grew with the stack
            return a != b and not (isinstance(a, tuple) and isinstance(b, tuple) and (len(a), len(b)) == depths)

        for i, (j, *_) in plan.copies.index[s.path + "."].items():
            old, new = (signature(m.get_submodule(f"{s.path}.{k}")) for m, k in ((model, i), (plan.deeper, j)))
            diff = next((k for k in sorted(set(old) | set(new), key=str) if differs(old.get(k), new.get(k))), None)
            if diff is not None:
                sub, attr = diff
                what = ".".join(x for x in (sub, attr) if x)
                return (f"the deeper config builds {s.path}.{i} differently at its new position {j} ({what} "
                        f"{old.get(diff, 'absent')} -> {new.get(diff, 'absent')})")
    return ""


def fresh_values(model: nn.Module, plan: CopyPlan) -> dict:
    """The family's initial values of ``plan.fresh`` (its own ``_init_weights`` on just those modules)."""
    dtype = next(model.parameters()).dtype
    out = {}
    for key in sorted(plan.fresh):
        path, _, attr = key.rpartition(".")
        module = plan.deeper.get_submodule(path)
        if getattr(module, attr).is_meta:
            module.to_empty(device="cpu", recurse=False)
            try:
                with torch.no_grad():
                    plan.deeper._init_weights(module)
            except Exception as exc:  # noqa: BLE001 - the family's own init: any failure is one sentence
                raise UnsupportedModelError(f"the copies need {key!r}, which the copied layer does not hold, and "
                                            f"{type(model).__name__}'s initialization of it fails: {first_line(exc)}"
                                            ) from None
        out[key] = getattr(module, attr).detach().to(dtype).clone()
    return out


def require_fits(model: nn.Module, plan: CopyPlan, shapes: dict) -> None:
    """UnsupportedModelError (one sentence) unless the deeper config builds exactly the planned tensors
    (``shapes``: new key -> shape): a family that builds a layer differently from the one before it (DeepSeek's
    dense first layers) has no place for a copy there; from_pretrained would start such a tensor at random."""
    heads = tuple(s.path + "." for s in plan.stacks)
    wrong = sorted(k for k in shapes if plan.built.get(k) != tuple(shapes[k])) + \
        sorted(k for k in plan.built if k not in shapes and k.startswith(heads) and k not in plan.fresh)
    first = next(f"{p}.{idx[0]}" for p, idx in plan.chosen.items() if idx)
    if plan.moved:
        raise UnsupportedModelError(f"{type(model).__name__} cannot hold a copy after {first}: {plan.moved}, so the "
                                    "layers after the copy would compute something else")
    if wrong:
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
    state.update(fresh_values(model, plan))
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
