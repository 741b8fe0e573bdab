"""The config of a grown Hugging Face model, read from the grown weights' shapes, never from a family's
private attributes.

The measured quantities set the standard config names (``hidden_size``, ``num_attention_heads``,
``num_key_value_heads``, the norm epsilon: transformers maps each family's own spelling onto them through
``attribute_map``).  Every other size (``intermediate_size``, GPT-2's ``n_inner``, OPT's ``ffn_dim``, ...) is
found by probing: each integer field is doubled on a weightless (meta device) model, which shows the shapes
it drives and how (sizes are linear in a field), so the value giving the grown shapes follows.  A config
that still cannot give the grown shapes is refused with the parameters that disagree.
"""

from __future__ import annotations

import copy
import math

import torch

from ..errors import UnsupportedModelError


class ConfigMismatch(UnsupportedModelError):
    """The family's config cannot give the grown shapes; ``keys`` lists the parameters that disagree."""

    def __init__(self, message: str, keys: list, bad: dict | None = None, config=None):
        super().__init__(message)
        self.keys = keys
        self.bad = bad or {}  # key -> (shape the config gives or None: absent, shape the widening gives)
        self.config = config  # the nearest config the solver found (its fields name what disagrees)

# fields that never describe a width (probing them would only cost time)
_NOT_WIDTHS = ("vocab_size", "max_position_embeddings", "num_hidden_layers", "n_positions", "type_vocab_size")


def meta_shapes(model_cls, config) -> dict:
    """state_dict key -> shape of ``model_cls(config)``, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = model_cls(copy.deepcopy(config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _int_fields(config) -> list:
    return [k for k, v in config.to_dict().items()
            if isinstance(v, int) and not isinstance(v, bool) and v > 0 and not k.endswith("token_id")
            and k not in _NOT_WIDTHS]


# list fields that never hold widths (stage depths, strides, kernels, image sizes)
_NOT_WIDTH_LISTS = ("depths", "out_indices", "conv_stride", "conv_kernel", "strides", "kernel_sizes", "patch_sizes",
                    "image_size", "patch_size", "window_size", "dilations", "tdnn_kernel", "tdnn_dilation")


def _list_items(config) -> list:
    """(field, index) of each entry of a list of sizes (ConvNeXt's hidden_sizes, Swin's num_heads, Wav2Vec2's
    conv_dim): vision/audio families state one width per stage, probed entry by entry like an int field."""
    return [(k, i) for k, v in config.to_dict().items() if isinstance(v, (list, tuple)) and v
            and all(isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in v) and k not in _NOT_WIDTH_LISTS
            for i in range(len(v))]


def _sub_fields(config) -> list:
    """(sub-config attribute, field) of each int field of a nested config (DBRX's ffn_config.ffn_hidden_size and
    attn_config.kv_n_heads; its ffn_config.hidden_size, which DbrxConfig copies from d_model only when built)."""
    return [(name, k) for name, sub in vars(config).items()
            if callable(getattr(sub, "to_dict", None)) and hasattr(sub, "attribute_map") for k in _int_fields(sub)]


def _get(config, field):
    if isinstance(field, tuple) and isinstance(field[1], str):
        return getattr(getattr(config, field[0]), field[1])
    return getattr(config, field[0])[field[1]] if isinstance(field, tuple) else getattr(config, field)


def _set(config, field, value) -> None:
    if isinstance(field, tuple) and isinstance(field[1], str):  # a nested config's field: a copy of it changed
        sub = copy.deepcopy(getattr(config, field[0]))
        setattr(sub, field[1], value)
        setattr(config, field[0], sub)
        return
    if isinstance(field, tuple):  # a list entry: a new list (the config's own is shared with its copies' origin)
        old = getattr(config, field[0])
        items = list(old)
        items[field[1]] = value
        value, field = type(old)(items), field[0]
    setattr(config, field, value)


def _mismatch(shapes: dict, target: dict) -> dict:
    """key -> (shape the config gives, shape wanted) for every key that differs or is missing on either side."""
    return {k: (shapes.get(k), target.get(k)) for k in set(target) | set(shapes)
            if shapes.get(k) != target.get(k) and not (target.get(k, 0) is None and k in shapes)}


def _probe(model_cls, config, field, base: dict, target: dict):
    """The value of ``field`` that gives ``target`` on the dims it drives, or None."""
    value = _get(config, field)
    trial = copy.deepcopy(config)
    try:
        _set(trial, field, 2 * value)
        doubled = meta_shapes(model_cls, trial)
    except Exception:  # noqa: BLE001 - a value the family rejects: the field is not a free width
        return None
    wanted = set()
    for key, shape in base.items():  # (a field that also adds or removes parameters is judged on the shared ones)
        other, goal = doubled.get(key), target.get(key)
        if other is None:
            continue
        if other == shape or goal is None or len(goal) != len(shape):
            continue
        for s, s2, t in zip(shape, other, goal):
            if s2 != s:  # size = a * value + b on this dim
                new = value + (t - s) * value / (s2 - s)
                wanted.add(int(new) if float(new).is_integer() and new > 0 else None)
    return wanted.pop() if len(wanted) == 1 and None not in wanted else None


def solve_config(model_cls, config, target: dict, known: dict):
    """A copy of ``config`` whose model has the ``target`` shapes (state_dict key -> shape), with the
    ``known`` standard fields set first (hidden_size, num_attention_heads, ..., eps). Raises
    :class:`UnsupportedModelError` naming a parameter whose grown shape the config cannot give."""
    try:  # parameters the family builds that the model was built without (BertModel without its pooler)
        absent = set(meta_shapes(model_cls, config)) - set(target)
    except Exception:  # noqa: BLE001
        absent = set()
    target = {**target, **{k: None for k in absent}}
    new = copy.deepcopy(config)
    for field, value in known.items():
        if value is not None and (hasattr(new, field) or field == "head_dim"):
            try:
                setattr(new, field, value)
            except AttributeError:  # a derived property (Falcon's head_dim = hidden_size // num_attention_heads)
                pass
    deferred: dict = {}
    try:
        shapes = meta_shapes(model_cls, new)
    except Exception as exc:  # noqa: BLE001 - the family rejects the combination (keys unknown: the heads)
        # a family that checks one size against another (Data2Vec-vision: hidden_size % num_attention_heads) before
        # the other is probed: the known fields it rejects wait until the probed ones follow, then must hold
        new, deferred = _known_that_build(model_cls, config, known)
        if not deferred or new is None:
            raise ConfigMismatch(f"{type(config).__name__} rejects the grown sizes "
                                 f"({', '.join(f'{k}={v}' for k, v in known.items())}): {exc}", []) from None
        shapes = meta_shapes(model_cls, new)
    fixed = set(known) - set(deferred)
    for _ in range(8 + len(_list_items(new))):  # each round settles one more field (or list entry)
        bad = _mismatch(shapes, target)
        if not bad and all(_get(new, f) == v for f, v in deferred.items()):
            _loadable(new)
            return new
        # the field that settles the most parameters wins the round (DeepSeek-V2's moe_intermediate_size sizes its
        # routed and its shared experts; n_shared_experts, tried first, settles only the shared one and would
        # leave the routed experts unstatable)
        best = None
        for field in _int_fields(new) + _list_items(new) + _sub_fields(new):
            if field in fixed:
                continue
            value = _probe(model_cls, new, field, shapes, target)
            if value is None or value == _get(new, field):
                continue
            trial = copy.deepcopy(new)
            _set(trial, field, value)
            try:
                trial_shapes = meta_shapes(model_cls, trial)
            except Exception:  # noqa: BLE001 - a value the family rejects
                continue
            left = len(_mismatch(trial_shapes, target))
            if left < (best[0] if best else len(bad)):  # progress, counting parameters added or lost
                best = (left, field, trial, trial_shapes)
                if left == 0:
                    break
        if best is None:
            break
        _, field, new, shapes = best
        fixed.add(field)
    bad = _mismatch(shapes, target)
    if not bad:
        raise ConfigMismatch(f"{type(config).__name__} rejects the grown sizes "
                             f"({', '.join(f'{k}={v}' for k, v in deferred.items())}) with the others", [])
    key, (got, want) = sorted(bad.items())[0]
    raise ConfigMismatch(f"{type(config).__name__} cannot express the grown shapes: {shape_words(key, got, want)}",
                         sorted(bad), bad, new)


def shape_words(key: str, got, want) -> str:
    return f"{key!r} would be {list(got) if got else 'absent'} where the widening gives {list(want) if want else 'none'}"


def _known_that_build(model_cls, config, known: dict):
    """``(config with the known fields the family builds with, {field: value} of those it rejects for now)``."""
    new, deferred = copy.deepcopy(config), {}
    for field, value in known.items():
        if value is None or not (hasattr(new, field) or field == "head_dim"):
            continue
        trial = copy.deepcopy(new)
        try:
            setattr(trial, field, value)
            meta_shapes(model_cls, trial)
        except Exception:  # noqa: BLE001 - rejected with the sizes not yet probed
            deferred[field] = value
            continue
        new = trial
    try:
        meta_shapes(model_cls, new)
    except Exception:  # noqa: BLE001
        return None, deferred
    return new, deferred


def _loadable(config) -> None:
    """The config as from_pretrained will read it back (its class's validation runs there, not on setattr)."""
    try:
        type(config).from_dict(config.to_dict())
    except Exception as exc:  # noqa: BLE001 - the family's own validation: the keys are unknown (the heads)
        raise ConfigMismatch(f"{type(config).__name__} would not load the grown config: {exc}", []) from None


def eps_fields(config, old_eps: float) -> list:
    """Config fields holding the norm epsilon ``old_eps`` (layer_norm_eps, rms_norm_eps, layer_norm_epsilon, ...)."""
    out = []
    for k, v in config.to_dict().items():
        if isinstance(v, float) and "eps" in k and math.isclose(v, old_eps, rel_tol=1e-6):
            out.append(k)
    return out


def fixed_eps_modules(model_cls, config, field: str, old_eps: float) -> set:
    """Module paths of ``model_cls(config)`` that keep epsilon ``old_eps`` when ``field`` changes: their norms take
    it from the family's code, not from the config (JetMoE's layer RMSNorms use their default 1e-6 and only the
    final norm reads rms_norm_eps). Probed on the meta device with ``field`` set to another value; a module
    holding no float ``*eps*`` attribute says nothing (the check of the grown model decides for it)."""
    probe = copy.deepcopy(config)
    setattr(probe, field, old_eps * 3.0 + 1e-3)  # any value no code holds by default
    with torch.device("meta"):
        model = model_cls(probe)
    return {path for path, mod in model.named_modules()
            for k, v in vars(mod).items()
            if "eps" in k and isinstance(v, float) and math.isclose(v, old_eps, rel_tol=1e-6)}


def head_coupling(model_cls, config, known: dict) -> str | None:
    """The config rule ``head_dim = hidden_size / num_attention_heads`` when the family derives its heads' size
    from the stream (GPT-NeoX, GPT-J, BLOOM, ...: doubling ``num_attention_heads`` alone changes no parameter)
    and the grown sizes in ``known`` break it (head_dim kept: heads are copied whole); else None."""
    old_hidden, old_heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    # (a stream that keeps its width, ELECTRA's: it reaches the output, still fixes the heads' size)
    hidden, heads = known.get("hidden_size") or old_hidden, known.get("num_attention_heads")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, heads, old_hidden, old_heads)):
        return None
    head_dim = known.get("head_dim") or old_hidden // old_heads
    if hidden == heads * head_dim or old_hidden != old_heads * head_dim:
        return None
    try:
        trial = copy.deepcopy(config)
        trial.num_attention_heads = 2 * old_heads
        if meta_shapes(model_cls, trial) != meta_shapes(model_cls, config):
            return None  # (the family reads head_dim from its config: the stream and the heads are independent)
    except Exception:  # noqa: BLE001 - the family rejects the probe: no rule to name
        return None
    return (f"{type(config).__name__} derives head_dim = hidden_size / num_attention_heads, and the "
            f"{'grown ' if hidden != old_hidden else ''}hidden_size {hidden} is not {heads} heads x {head_dim}")
