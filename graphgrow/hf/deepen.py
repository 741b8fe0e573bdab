"""Block expansion on a Hugging Face ``PreTrainedModel``: copies of chosen layers inserted after them, each
with the projections that write into the residual stream zeroed, so the copy adds 0 to the stream and the
model computes the same function (LLaMA Pro's construction, exact for pre-norm blocks).

``block="stack"`` is the other depth operator the literature compares: G_stack (Du et al., NeurIPS 2024), the
whole stack of layers repeated ``times`` times (layers 0..L-1, 0..L-1, ...), every copy holding its layer's
weights unchanged.  The second pass applies the layers again to a stream that already holds their output, so it
is NOT function-preserving: labelled so, its measured deviation reported, nothing refused for it.

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
from .stacks import Stack, deepened_config, layer_stacks, signature, stacked_config  # noqa: F401 - Stack re-exported


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


class StackCopies(LayerCopies):
    """Where each key goes when whole stacks are repeated ``times`` times (G_stack): layer i of a stack of n layers
    is also layer i + n, i + 2n, ...; nothing zeroed."""

    def __init__(self, stacks: list, times: int):  # noqa: D107 - the parent's bookkeeping, no insertion
        self.zeroed, self.left_out = {}, frozenset()
        self.index = {s.path + ".": {i: [i + r * s.n for r in range(times)] for i in range(s.n)} for s in stacks}


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
                      atol=None, rtol=None, times: int = 2):
    """:func:`graphgrow.deepen` for a ``transformers.PreTrainedModel``: block expansion (``block="copy"``), or
    G_stack (``block="stack"``: the layer stack repeated ``times`` times, not function-preserving)."""
    if block == "stack":
        return stack_pretrained(model, after=after, times=times, example_inputs=example_inputs, seed=seed,
                                verify=verify)
    if block != "copy":
        raise InvalidArgumentError(f"block={block!r} on a transformers model: use block='copy' (a copy of the layer "
                                   "with its output projections zeroed, stated by num_hidden_layers) or block='stack' "
                                   "(G_stack: the whole layer stack repeated, not function-preserving)")
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


def stacked_layers(stacks: list, after) -> list:
    """The stacks G_stack repeats: every stack (``after=None``), or those whose every layer ``after`` matches; a
    stack ``after`` matches in part is refused (G_stack repeats whole stacks, never single layers)."""
    if after is None:
        return list(stacks)
    chosen = chosen_layers(stacks, after)
    for s in stacks:
        if 0 < len(chosen[s.path]) < s.n:
            raise InvalidArgumentError(f"block='stack' repeats whole stacks of layers (G_stack), but after={after!r} "
                                       f"matches {len(chosen[s.path])} of the {s.n} layers of {s.path}: pass "
                                       f"after=None or a pattern matching all of them ({s.path}\\.\\d+)")
    return [s for s in stacks if chosen[s.path]]


def stack_moved(model: nn.Module, deeper: nn.Module, stacks: list, times: int) -> str:
    """How the repeated config builds a layer's repeat differently from the layer ("" where it does not)."""
    for s in stacks:
        for i in range(s.n):
            old = signature(model.get_submodule(f"{s.path}.{i}"))
            for r in range(1, times):
                new = signature(deeper.get_submodule(f"{s.path}.{i + r * s.n}"))

                def differs(a, b):  # a per-layer list each layer keeps whole grew with the stack
                    return a != b and not (isinstance(a, tuple) and isinstance(b, tuple)
                                           and (len(a), len(b)) == (s.n, s.n * times))

                diff = next((k for k in sorted(set(old) | set(new), key=str) if differs(old.get(k), new.get(k))), None)
                if diff is not None:
                    what = ".".join(x for x in diff if x)
                    return (f"the repeated config builds {s.path}.{i + r * s.n} differently from {s.path}.{i} "
                            f"({what} {old.get(diff, 'absent')} -> {new.get(diff, 'absent')})")
    return ""


def stack_pretrained(model, *, after=None, times: int = 2, example_inputs, seed: int = 0, verify: str = "torch"):
    """G_stack: each chosen stack of layers repeated ``times`` times, every repeat holding its layer's weights
    (bit-identical).  Not function-preserving: ``report.function_preserving`` is False and ``report.deviation``
    the measured max_rel of the outputs against ``model`` on ``example_inputs`` (``verify="none"``: not measured)."""
    if isinstance(times, bool) or not isinstance(times, int) or times < 2:
        raise InvalidArgumentError(f"times must be an integer >= 2 (how many times the layer stack is repeated), not "
                                   f"{times!r}")
    stacks = stacked_layers(layer_stacks(model), after)
    config = stacked_config(model.config, stacks, times)
    copies = StackCopies(stacks, times)
    state = copies.state(model.state_dict())
    with torch.device("meta"):
        deeper = type(model)(copy.deepcopy(config))
    built = {k: tuple(v.shape) for k, v in deeper.state_dict().items()}
    wrong = sorted(set(built) ^ set(state)) or sorted(k for k in built if built[k] != tuple(state[k].shape))
    moved = stack_moved(model, deeper, stacks, times)
    if moved or wrong:
        why = moved or (f"for {wrong[0]!r} the repeated config "
                        + ("does not build it" if wrong[0] not in built else f"builds {list(built[wrong[0]])}, the "
                           f"repeat {'holds no such tensor' if wrong[0] not in state else list(state[wrong[0]].shape)}"))
        raise UnsupportedModelError(f"{type(model).__name__} cannot repeat its layer stack: {why}")
    result = rebuilt(model, config, state)
    report = GrowthReport([], params_before=count_params(model), params_after=count_params(result),
                          function_preserving=False, not_preserving="block=stack (G_stack)")
    report.notes.extend(f"config {s.label}: {s.n} -> {s.n * times}; {s.path} repeated {times} times (layer i is "
                        f"also layer i + {s.n}" + (", ..." if times > 2 else "") + ")" for s in stacks)
    report.notes.append("NOT function-preserving: each repeat applies its layer again to a stream that already "
                        "holds that layer's output")
    if verify != "none":
        from ..verify import check

        names = input_names(as_inputs(example_inputs))
        rep = check(ModelOutputs(model, names), ModelOutputs(result, names), as_inputs(example_inputs),
                    backend=verify, batches=1, seed=seed, float64=False)
        report.deviation = float(rep.worst.max_rel) if rep.worst is not None else None
        report.notes.append(f"outputs differ from the original's by max_rel {report.deviation:.3g} on the example "
                            "inputs")
    result.graphgrow_report = report
    return result
