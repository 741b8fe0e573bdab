"""The stacks of repeated layers block copy inserts into, each with the config field that states its depth, and
the deeper config that states the copies.

A stack is the ModuleList that grows by one layer when its depth field grows by one: ``num_hidden_layers``
(an encoder-decoder's per-stack fields; ALBERT's ``inner_group_num``), or one entry of a per-stage list
(``depths``: Swin's and ConvNeXt's blocks inside a stage).  Where the field's value names exactly one list
(the usual case) that list is the stack; where several lists happen to be as long (Wav2Vec2's conv feature
extractor, Speech2Text's conv subsampler) or none is, the config is probed on the meta device: the list that
grows with the field is the stack, the others are not.

The deeper config also keeps each layer's kind at its new position: per-layer lists (``layer_types``) get the
copied layer's entry, and position rules move with the layers (``first_k_dense_replace``: a copy of a dense
prefix layer is dense, so the prefix grows; ``mlp_only_layers``: indices renumbered).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import UnsupportedModelError

# the config fields stating each stack's depth in an encoder-decoder (BART/Marian/M2M100/Whisper, T5), in order
STACK_FIELDS = (("encoder", ("encoder_layers", "num_layers")), ("decoder", ("decoder_layers", "num_decoder_layers")))
# fields that state the depth of a stack only where probing shows it (no fast path): ALBERT's layers per shared
# group; per-stage depths of hierarchical vision families (one stack per entry)
_PROBED_INT_FIELDS = ("inner_group_num",)
_PROBED_LIST_FIELDS = ("depths",)


@dataclass
class Stack:
    """One stack of repeated layers: its ModuleList's path, depth and the config field (``index``: the entry of a
    per-stage list) stating the depth."""

    path: str
    n: int
    field: str
    index: int | None = None
    keep: frozenset = frozenset()  # lists of length n that are not per-layer (Wav2Vec2's conv_dim): not extended

    @property
    def label(self) -> str:
        return self.field if self.index is None else f"{self.field}[{self.index}]"


def _outermost(found: list) -> list:
    return [p for p in found if not any(p.startswith(q + ".") for q in found)]


def _lists(model: nn.Module) -> dict:
    return {name: len(m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}


def _meta_built(model: nn.Module, config):
    """``type(model)(config)`` on the meta device; None where the family cannot build it."""
    try:
        with torch.device("meta"):
            return type(model)(config)
    except Exception:  # noqa: BLE001 - a config the family rejects or cannot build: nothing learned from it
        return None


def _grown_lists(model: nn.Module, grown, n: int) -> list:
    """The ModuleLists of length ``n`` that hold ``n + 1`` layers in ``grown`` ([] where it was not built)."""
    if grown is None:
        return []
    old, new = _lists(model), _lists(grown)
    return _outermost([p for p, k in old.items() if k == n and new.get(p) == n + 1])


# attributes that number a layer (for its cache slot): every layer's differs from every other's
_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_index", "block_idx", "idx", "layer_number")


def _simple(v) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_simple(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def _training_only(sub: nn.Module, attr: str) -> bool:
    """Dropout and stochastic-depth rates (Swin's per-position drop_path schedule): they act in training only."""
    return "Drop" in type(sub).__name__ or "dropout" in attr or attr.startswith("drop_")


def signature(module: nn.Module) -> dict:
    """How a module is built: (submodule, attribute) -> each plain attribute (a Swin block's shift_size, a layer's
    attention type) and each parameter's or buffer's shape."""
    out = {}
    for name, sub in module.named_modules():
        for k, v in vars(sub).items():
            if not k.startswith("_") and k not in ("training", *_INDEX_ATTRS) and _simple(v) \
                    and not _training_only(sub, k):
                out[(name, k)] = tuple(v) if isinstance(v, list) else v
        for k, t in list(sub._parameters.items()) + list(sub._buffers.items()):
            out[(name, k)] = None if t is None else tuple(t.shape)
    return out


def _probed(model: nn.Module, field: str, n: int, index) -> list:
    """The stacks that grow with ``field`` (see the module docstring).  The lists as long as the stack are left
    as they are where the family builds the deeper config without them (they may state the lists that made the
    stack ambiguous: Wav2Vec2's conv_dim, conv_stride, conv_kernel), grown where it needs them."""
    cfg = model.config
    per_layer = () if index is not None else frozenset(
        k for k, v in cfg.to_dict().items() if isinstance(v, list) and len(v) == n and k != "architectures")

    def grown(keep):
        probe = Stack("", n, field, index, frozenset(keep))
        return _grown_lists(model, _meta_built(model, deepened_config(cfg, [probe], {"": [n - 1]})), n)

    found, keep = grown(per_layer), per_layer
    if not found:
        found, keep = grown(()), frozenset()
    return [Stack(p, n, field, index, keep if len(found) == 1 else frozenset()) for p in found]


def _stack_of(model: nn.Module, field: str, n: int, index=None, role: str = "", fast: bool = True) -> list:
    """The stacks ``field`` states: the one list of length ``n`` (``fast``), else the lists that grow with it."""
    found = _outermost([p for p, k in _lists(model).items() if k == n and (not role or role in p.split("."))])
    if fast and len(found) == 1:
        return [Stack(found[0], n, field, index)]
    return _probed(model, field, n, index)


def layer_stacks(model: nn.Module) -> list:
    """The model's stacks of repeated layers (see the module docstring); UnsupportedModelError where the config
    states none."""
    cfg, name = model.config, type(model).__name__
    if getattr(cfg, "is_encoder_decoder", False):
        stacks = []
        for role, fields in STACK_FIELDS:
            field = next((f for f in fields if isinstance(getattr(cfg, f, None), int)), None)
            if field is None:
                raise UnsupportedModelError(f"{name}: the config states no {role} depth ({' or '.join(fields)}), so "
                                            "a deeper model cannot be stated")
            found = _stack_of(model, field, getattr(cfg, field), role=role)
            if len(found) != 1:
                raise UnsupportedModelError(f"{name}: {len(found)} {role} module lists grow with {field}="
                                            f"{getattr(cfg, field)}; block expansion needs exactly one")
            stacks += found
        return stacks
    stacks = []
    n = getattr(cfg, "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        found = _stack_of(model, "num_hidden_layers", n)
        stacks += found if len(found) == 1 else []
    for field in _PROBED_INT_FIELDS:
        v = getattr(cfg, field, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            found = _stack_of(model, field, v, fast=False)
            stacks += found if len(found) == 1 else []
    for field in _PROBED_LIST_FIELDS:
        for i, v in enumerate(getattr(cfg, field, None) or ()):
            if isinstance(v, int) and v > 0:
                stacks += _stack_of(model, field, v, index=i, fast=False)[:1]
    # a list of stages holding stacks of blocks is not itself a stack of layers (a stage downsamples)
    stacks = [s for s in stacks if not any(t.path.startswith(s.path + ".") for t in stacks)]
    if not stacks:
        raise UnsupportedModelError(f"{name}: no module list grows with num_hidden_layers={n} (the config states no "
                                    "stack of repeated layers), so a deeper model cannot be stated")
    return stacks


def _renumber(chosen: list, i: int) -> int:
    """Old layer index -> its new index when copies of ``chosen`` are inserted after each of them."""
    return i + sum(1 for c in chosen if c < i)


def _position_rules(config, new, stack: Stack, chosen: list) -> None:
    """Fields that say which layers are built how, moved with the layers (each copy is built as its layer)."""
    k = getattr(config, "first_k_dense_replace", None)
    if isinstance(k, int) and not isinstance(k, bool):  # layers [0, k) dense: a copy of one of them is dense too
        new.first_k_dense_replace = k + sum(1 for c in chosen if c < k)
    only = getattr(config, "mlp_only_layers", None)
    if isinstance(only, (list, tuple)) and all(isinstance(i, int) for i in only):  # dense layers by index
        new.mlp_only_layers = sorted({_renumber(chosen, i) for i in only} |
                                     {_renumber(chosen, i) + 1 for i in only if i in chosen})


def deepened_config(config, stacks: list, chosen: dict):
    """Each stack's depth field grown; for one stack stated by an int field, every per-layer list (layer_types,
    ...; a list as long as the stack, unless the stack keeps it) gets the copied layer's entry and the position
    rules move with the layers."""
    new = copy.deepcopy(config)
    for s in stacks:
        if s.index is None:
            setattr(new, s.field, s.n + len(chosen[s.path]))
        else:
            entries = list(getattr(new, s.field))
            entries[s.index] = s.n + len(chosen[s.path])
            setattr(new, s.field, entries)
    if len(stacks) == 1 and stacks[0].index is None:
        (s,) = stacks
        for key, value in config.to_dict().items():
            if isinstance(value, list) and len(value) == s.n and key != "architectures" and key not in s.keep:
                grown = []
                for i, v in enumerate(value):
                    grown.extend([v, v] if i in chosen[s.path] else [v])
                setattr(new, key, grown)
        _position_rules(config, new, s, chosen[s.path])
    return new


def stacked_config(config, stacks: list, times: int):
    """The config of the layer stacks repeated ``times`` times (G_stack): each depth field multiplied; for one
    stack stated by an int field, every per-layer list (layer_types, ...) repeated with the layers and
    ``mlp_only_layers`` renumbered into each repeat.  UnsupportedModelError where a position rule cannot state
    the repeat (``first_k_dense_replace``: a dense prefix repeated is no longer a prefix)."""
    new = copy.deepcopy(config)
    for s in stacks:
        if s.index is None:
            setattr(new, s.field, s.n * times)
        else:
            entries = list(getattr(new, s.field))
            entries[s.index] = s.n * times
            setattr(new, s.field, entries)
    if len(stacks) == 1 and stacks[0].index is None:
        (s,) = stacks
        for key, value in config.to_dict().items():
            if isinstance(value, list) and len(value) == s.n and key != "architectures" and key not in s.keep:
                setattr(new, key, list(value) * times)
        k = getattr(config, "first_k_dense_replace", None)
        if isinstance(k, int) and not isinstance(k, bool) and 0 < k < s.n:
            raise UnsupportedModelError(f"{type(config).__name__} builds its first {k} layers dense "
                                        "(first_k_dense_replace): the repeated stack would need dense layers after "
                                        "sparse ones, which the config cannot state")
        only = getattr(config, "mlp_only_layers", None)
        if isinstance(only, (list, tuple)) and all(isinstance(i, int) for i in only):
            new.mlp_only_layers = sorted(i + r * s.n for i in only for r in range(times))
    return new
