"""Net2WiderNet on a Hugging Face ``PreTrainedModel``: a model of the same class whose config states the
new sizes.

The captured graph (:mod:`.capture`) is analysed and widened by the fx frontend like any other; its new
parameters are the grown state_dict.  The model itself is rebuilt by transformers from a config solved
for those shapes (:mod:`.config`), so ``save_pretrained``/``from_pretrained``, the KV cache and
``generate`` are the family's own code, and the result is checked against the original before it is
returned.  Literal sizes the graph carried (view shapes, norm shapes) need no rewriting here: the family
derives them from the config.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..core import arithmetic as ar
from ..core.arithmetic import scale_affine
from ..core.growth import check_factor, check_options, kept_head_notes, require_head_widths, require_reachable, \
    space_reports, widen_targets
from ..core.report import GrowthReport, record_growth
from ..core.sites import GrowOptions
from ..errors import UnsupportedModelError, VerificationError, first_line
from ..fx.engine import FxAnalysis, count_params, plan_and_apply
from ..fx.transformer import norm_eps, param_array, param_through_offset
from .capture import ModelOutputs, as_inputs, capture, input_names, rebuilt, tied_groups
from .family_axes import ambiguous_blocks, mark_family_axes
from .config import ConfigMismatch, eps_fields, fixed_eps_modules, head_coupling, shape_words, solve_config


def _key(owner: str, attr: str) -> str:
    return f"{owner}.{attr}" if owner else attr


def _norm_eps(an: FxAnalysis, run) -> dict:
    """old epsilon -> new epsilon of every norm fill + rescale changed; the gains of written-out norms are
    rescaled in ``run.updates`` on the way (the family's code cannot take an inserted ``x d'/d``)."""
    changes: dict = {}
    for node, (args, kwargs) in run.arg_updates.items():
        if node.target in (F.layer_norm, F.rms_norm):
            old, new = norm_eps(node.target, node.args, node.kwargs)[1], norm_eps(node.target, args, kwargs)[1]
            if isinstance(old, float) and new != old:
                changes[old] = new
    kept_eps = set()  # epsilons of norms fill + rescale left alone (over head_dim, over a stream it did not fill)
    for node in an.gm.graph.nodes:
        if node.target in (F.layer_norm, F.rms_norm) and node not in run.arg_updates:
            kept_eps.add(norm_eps(node.target, node.args, node.kwargs)[1])
        elif node.target in (torch.mean, "mean") and node not in run.mean_scales:
            kept_eps.add(_written_out_rms(node)[0])
    for mean, ratio in run.mean_scales.items():
        eps, gain = _written_out_rms(mean)
        if eps is None:
            raise FillNotStated(f"the mean at node {mean.name!r} is not followed by '+ eps', rsqrt and a "
                                "gain: its fill + rescale cannot be written into the config")
        gain, offset = gain
        owner, _, attr = gain.target.rpartition(".")
        upd = run.updates.get(owner)
        if upd is None or attr not in upd.tensors:
            raise FillNotStated(f"the gain {gain.target!r} of a filled norm did not grow with its stream")
        # mean over d' channels = mean over d x d/d': dividing eps by d'/d and the gain by its root keeps the output
        # (Gemma's gain 1 + w: the sum is divided)
        upd.tensors[attr] = scale_affine(upd.tensors[attr], 1 / math.sqrt(ratio), offset)
        changes[eps] = eps / ratio
    shared = [eps for eps in changes if eps in kept_eps]
    if shared:
        exc = SharedEpsilon(f"fill + rescale needs the filled stream's norms to take epsilon {shared[0]:g} x d/d', "
                            "but the config holds one epsilon for them and for norms that keep their width")
        exc.eps = shared[0]
        raise exc
    return changes


def _filled_norm_paths(run) -> dict:
    """old epsilon -> module paths (relative to the model) of the norms fill + rescale changed, read from the
    capture's ``nn_module_stack`` (the wrapper's ``model.`` prefix dropped); norms without one are left out."""
    nodes = [(n, norm_eps(n.target, n.args, n.kwargs)[1]) for n in run.arg_updates
             if n.target in (F.layer_norm, F.rms_norm)] + [(m, _written_out_rms(m)[0]) for m in run.mean_scales]
    out: dict = {}
    for node, eps in nodes:
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        if isinstance(eps, float) and stack and stack[-1][0].startswith("model."):
            out.setdefault(eps, set()).add(stack[-1][0][len("model."):])
    return out


def _require_config_eps(model, run, eps_changes: dict) -> None:
    """Raise :class:`FixedEpsilon` where a filled norm keeps its epsilon when the config field holding it changes
    (the family's code fixes it): the config cannot state the grown epsilon for it."""
    paths = _filled_norm_paths(run)
    for old in eps_changes:
        for field in eps_fields(model.config, old):
            fixed = sorted(paths.get(old, set()) & fixed_eps_modules(type(model), model.config, field, old))
            if fixed:
                raise FixedEpsilon(old, field, fixed)


class FillNotStated(UnsupportedModelError):
    """A norm's fill + rescale cannot be written into the family's config or code (the widening is redone
    without fill + rescale)."""


class SharedEpsilon(FillNotStated):
    """The config's one norm epsilon cannot be rescaled for some norms and kept for others."""


class UnstatedEpsilon(FillNotStated):
    """The filled norms' epsilon must become eps x d/d', but no config field holds it (the family's code fixes it)."""

    def __init__(self, eps: float):
        super().__init__(f"fill + rescale needs the filled stream's norms to take epsilon {eps:g} x d/d', but the "
                         "config has no field holding it")
        self.eps = eps


class FixedEpsilon(FillNotStated):
    """A filled norm does not read the config field holding its epsilon: the field cannot state its grown value."""

    def __init__(self, eps: float, field: str, paths: list):
        super().__init__(f"fill + rescale needs the filled stream's norms to take epsilon {eps:g} x d/d', but "
                         f"{paths[0]} does not read {field} (the family's code fixes it at {eps:g})")
        self.eps, self.field, self.paths = eps, field, paths


def _written_out_rms(mean: fx.Node):
    """(eps, (gain get_attr node, its offset)) of ``gain * (x * rsqrt(mean + eps))`` after ``mean`` (a gain
    ``1 + w`` has offset 1), or (None, None)."""
    add = next(iter(mean.users), None)
    if len(mean.users) != 1 or add.target is not operator.add:
        return None, None
    eps = next((a for a in add.args if isinstance(a, float)), None)
    n = add
    for _ in range(6):
        if len(n.users) != 1:
            return None, None
        n = next(iter(n.users))
        params = [p for a in n.args if isinstance(a, fx.Node) for p in [param_through_offset(a)] if p[0] is not None]
        if n.target is operator.mul and params:
            return eps, params[0]
    return None, None


def grown_values(model, run) -> dict:
    """state_dict key -> new value (an array, or a recipe when planned without weights) of every grown
    tensor; tied keys share one value."""
    keys = set(model.state_dict(keep_vars=True))
    groups = tied_groups(model)
    out = {}
    for owner, upd in run.updates.items():
        for attr, value in upd.tensors.items():
            key = _key(owner, attr)
            if key not in keys:
                raise UnsupportedModelError(f"the graph's parameter {key!r} is not in the model's state_dict")
            for alias in groups.get(key, [key]):
                out[alias] = value
    return out


def _head_ratio(an, plan, role: str) -> float:
    """new / old count of the query (or key) heads, the same in every attention layer (the config has one)."""
    firsts = an.constraints.head_firsts.get(role, set())
    by_space: dict = {}
    for c in firsts:
        by_space.setdefault(int(an.table.space_ids_of(np.asarray([c]))[0]), []).append(c)
    ratios = {plan.head_count(cs) / len(cs) for cs in by_space.values()}
    ratios.discard(1.0) if len(ratios) > 1 and 1.0 in ratios else None
    if len(ratios) > 1:
        names = [an.table.spaces[sid].name for sid in by_space]
        raise ConfigMismatch(f"attention layers grew their {role} heads by different factors ({sorted(ratios)}): "
                             "one config cannot state their heads", names)
    return ratios.pop() if ratios else 1.0


def _known_fields(model, an, plan, shapes: dict, eps_changes: dict) -> dict:
    """The standard config fields the widening measured: stream width, heads, epsilon."""
    cfg = model.config
    try:
        emb = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # vision/audio models without token embeddings (ConvNeXt, ResNet)
        emb = None
    known = {}
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:  # (a vision model's patch embedding: probed instead)
        key = next(k for k, v in model.state_dict(keep_vars=True).items() if v is weight)
        if weight.shape[1] == getattr(cfg, "hidden_size", weight.shape[1]):  # (ALBERT's embedding_size: probed)
            known["hidden_size"] = int(shapes[key][1])
    ratios = {"query": _head_ratio(an, plan, "query"), "key": _head_ratio(an, plan, "key")}
    for field in head_fields(cfg):  # (an encoder-decoder's encoder/decoder head counts grow like the query heads)
        heads = getattr(cfg, field, None)
        if isinstance(heads, int):
            known[field] = int(round(heads * ratios["key" if field in KEY_HEAD_FIELDS else "query"]))
    head_dims = {an.constraints.unit_size.get(sp.id) for sp in an.produced if an.constraints.heads_of.get(sp.id)}
    per_stage = isinstance(getattr(cfg, "num_attention_heads", None), (list, tuple))  # Swin: heads per stage
    if len(head_dims) == 1 and None not in head_dims and not per_stage:
        # families that read config.head_dim (else hidden_size // heads) keep their heads' size when the stream
        # and the heads grow by different factors; the others ignore the field
        known["head_dim"] = head_dims.pop()
    for old, new in eps_changes.items():
        for field in eps_fields(cfg, old):
            known[field] = float(new)
    return known


def _unread_keys(model, an, values: dict) -> list:
    """state_dict keys the captured graph never reads (Wav2Vec2's masked_spec_embed: training-time masking only)."""
    read = {n.target for n in an.gm.graph.nodes if n.op == "get_attr"}
    groups = tied_groups(model)
    return [k for k in model.state_dict(keep_vars=True) if k not in values
            and not read & set(groups.get(k, [k]))]


def _unread_values(model, config, unread: list, values: dict) -> list:
    """New values of the parameters no forward reads whose size the new config changes: the old entries repeated
    along each grown axis (nothing checks them; they only have to exist at the family's sizes). Returns notes."""
    if not unread:
        return []
    from .config import meta_shapes

    shapes, state, grown = meta_shapes(type(model), config), model.state_dict(keep_vars=True), []
    for key in unread:
        value, old = param_array(state[key]), tuple(state[key].shape)
        new = shapes.get(key, old)
        if new == old:
            continue
        if len(new) != len(old):
            raise ConfigMismatch(f"{key!r}, which the forward pass never reads, would change rank in the grown config",
                                 [key])
        for axis, (a, b) in enumerate(zip(old, new)):
            if a != b:
                value = ar.gather(value, axis, np.arange(b) % a)
        values[key] = value
        grown.append(key)
    return [f"not read by the forward pass, their old entries repeated to the new sizes: {', '.join(grown)}"] \
        if grown else []


def _touching(spaces, keys, grown: set) -> list:
    """Names of the grown spaces that one of the parameters ``keys`` (or its module's) produces or consumes."""
    owners = {k.rsplit(".", 1)[0] for k in keys}
    return [sp.name for sp in spaces if sp.name in grown
            and any(p in keys or p.rsplit(".", 1)[0] in owners for p in sp.producers + sp.consumers)]


def _why_kept(name: str, exc: ConfigMismatch, an, plan, config) -> str | None:
    """The disagreeing parameter that touches space ``name``, after the config fields the solver set to its grown
    width (ELECTRA: "embedding_size 64: 'embeddings_project.weight' would be absent ...")."""
    sp = next(s for s in an.produced if s.name == name)
    keys = [k for k in exc.keys if _touching([sp], [k], {name})]
    if not keys or keys[0] not in exc.bad:
        return None
    fields = []
    if exc.config is not None:
        old, new = config.to_dict(), exc.config.to_dict()
        # (a field that sized this space and was set to its grown width)
        fields = [f"{f} {v}" for f, v in new.items()
                  if old.get(f) == sp.size and v == plan.new_size(sp) != sp.size]
    return ": ".join([", ".join(fields)] * bool(fields) + [shape_words(keys[0], *exc.bad[keys[0]])])


def _name_multi_query(cfg, an) -> None:
    """A single key/value head fused with the queries (GPT-BigCode, Falcon-7B) is the config's ``multi_query``:
    the family cannot state a second one, which the reason names (class (b))."""
    if getattr(cfg, "multi_query", None) is not True:
        return
    why = f"{type(cfg).__name__} cannot state it grown (multi_query=True: one key/value head)"
    for sp in an.table.spaces:
        sp.frozen_reasons[:] = [f"{r}; {why}" if "multi-query attention's single" in r and why not in r else r
                                for r in sp.frozen_reasons]


# the key/value head counts (stated at the key heads' ratio): Falcon's num_kv_heads shapes no parameter of its
# per-head [q | k | v] layout (new_decoder_architecture=False), yet its forward reads it
KEY_HEAD_FIELDS = ("num_key_value_heads", "num_kv_heads")


def head_fields(cfg) -> list:
    """The config's head counts: shapes cannot tell them (q_proj is heads x head_dim either way), so every one
    is stated at the heads' ratio: num_attention_heads / num_key_value_heads, and an encoder-decoder's
    encoder_attention_heads, decoder_attention_heads, T5's num_heads..."""
    fields = ["num_attention_heads", *KEY_HEAD_FIELDS]
    for name, value in cfg.to_dict().items():
        if isinstance(value, int) and not isinstance(value, bool) and value > 0 and name not in fields \
                and (name.endswith("attention_heads") or name in ("num_heads", "n_head", "n_heads")):
            fields.append(name)
    return fields


@dataclass
class Widening:
    """A planned widening of a transformers model: the analysis, the plan, the new values by state_dict key
    and the config stating the new shapes."""

    an: FxAnalysis
    plan: object
    targets: dict
    rounds: int
    values: dict  # state_dict key -> new array or Recipe
    config: object
    kept: list  # spaces kept because the config cannot state them grown
    notes: list

    def report(self, model, params_after: int, preserving: bool = True) -> GrowthReport:
        rep = GrowthReport(space_reports(self.an.produced, self.plan, self.targets),
                           params_before=count_params(model), params_after=params_after,
                           function_preserving=preserving, rounds=self.rounds)
        rep.notes.extend(config_notes(model.config, self.config) + self.notes
                         + kept_head_notes(self.an.produced, self.an.constraints, self.plan))
        if self.kept:
            rep.notes.append(f"kept at their width because {type(model.config).__name__} cannot state them "
                             f"grown: {', '.join(self.kept)}")
        return rep


def plan_widening(model, inputs: tuple, factor, *, widths=None, only=None, exclude=None, divisor: int = 1,
                  options: GrowOptions, fill: bool = True, strict: bool = False, progress=None,
                  keep_heads: str | None = None) -> Widening:
    """Capture, analyse, plan and apply (on real or weightless parameters), and solve the new config.
    Spaces the family's config cannot state at their planned width keep it (the nearest widening it states)."""
    gm = capture(model, inputs)
    asked = False  # (the family asked which axes of its fused reshapes grow: graphgrow.hf.family_axes)
    kept: list = []
    kept_why: dict = {}  # kept space -> the rule or the parameter the config cannot state
    fill_note = fill_why = None
    for _ in range(6):
        an = FxAnalysis(gm, inputs)
        if not asked and ambiguous_blocks(an.constraints):
            asked = True
            if mark_family_axes(gm, model, inputs):
                an = FxAnalysis(gm, inputs)
        _name_multi_query(model.config, an)
        targets = widen_targets(an.produced, an.constraints, factor, widths, only, exclude, divisor,
                                what="parameter")
        for sp in an.produced:
            if keep_heads and an.constraints.heads_of.get(sp.id):
                an.constraints.freeze_space(sp, keep_heads)
            if sp.name in kept:
                an.constraints.freeze_space(sp, f"{type(model.config).__name__} cannot state it grown"
                                                + (f" ({kept_why[sp.name]})" if kept_why.get(sp.name) else ""))
                targets.pop(sp.id, None)
        plan, run, rounds = plan_and_apply(an, targets, options, options.seed, progress, fill=fill)
        if strict:
            require_reachable(an.produced, plan, targets)
        require_head_widths(an.produced, plan, an.constraints, widths)
        try:
            eps_changes = _norm_eps(an, run)
            unstated = [old for old in eps_changes if not eps_fields(model.config, old)]
            if unstated:  # (Pegasus, BART: nn.LayerNorm's default eps, no config field: the rebuilt model keeps it)
                raise UnstatedEpsilon(unstated[0])
            _require_config_eps(model, run, eps_changes)
        except FillNotStated as exc:
            if not fill:
                raise
            fill, fill_note = False, f"normalized streams kept to whole factors: {exc}"
            if isinstance(exc, (SharedEpsilon, UnstatedEpsilon)):  # (a config rule: reason (b), named)
                fields = eps_fields(model.config, exc.eps) or ["norm epsilon field"]
                fill_why = (f"no fill + rescale: {type(model.config).__name__} cannot state it grown ("
                            + (f"one {fields[0]} for the filled stream's norms and for norms that keep their width)"
                               if isinstance(exc, SharedEpsilon) else "no norm epsilon field: the family's code "
                               f"fixes it at {exc.eps:g})"))
            elif isinstance(exc, FixedEpsilon):  # (JetMoE: the layer norms' eps is the code's, not rms_norm_eps)
                fill_why = (f"no fill + rescale: {type(model.config).__name__} cannot state it grown ({exc.field} "
                            f"is not read by {exc.paths[0]}, whose epsilon {exc.eps:g} the family's code fixes)")
            continue
        values = grown_values(model, run)
        shapes = {k: tuple(values[k].shape) if k in values else tuple(v.shape)
                  for k, v in model.state_dict().items()}
        unread = _unread_keys(model, an, values)
        shapes.update({k: None for k in unread})  # (their size follows the config, whatever it is)
        known: dict = {}
        try:
            known = _known_fields(model, an, plan, shapes, eps_changes)
            config = solve_config(type(model), model.config, shapes, known)
            if fill_why:
                for sid, note in list(plan.notes.items()):
                    if "whole integer factors only" in note:
                        plan.notes[sid] = f"{note}; {fill_why}"
            notes = [fill_note] if fill_note else []
            notes += _unread_values(model, config, unread, values)
            return Widening(an, plan, targets, rounds, values, config, kept, notes)
        except ConfigMismatch as exc:
            names = {sp.name for sp in an.produced}
            heads = [sp.name for sp in an.produced if an.constraints.heads_of.get(sp.id)]
            rule = head_coupling(type(model), model.config, known)
            if rule and widths:
                raise ConfigMismatch(f"the requested widths cannot be stated: {rule}", exc.keys) from None
            # the heads first (the stream matters more), then the other spaces the config cannot state, then
            # the grown spaces a disagreeing parameter reads or writes (ELECTRA's embeddings_project vanishes when
            # embedding_size grows to hidden_size: its key names the stream, the embedding space reads into it)
            grown = {sp.name for sp in an.produced if plan.new_size(sp) != sp.size}
            candidates = ([k for k in exc.keys if k in heads], [k for k in exc.keys if k in grown],
                          _touching(an.produced, exc.keys, grown), heads)
            more = next(([k for k in keys if k in names and k not in kept] for keys in candidates
                         if [k for k in keys if k in names and k not in kept]), [])
            if not more or widths:
                raise
            kept.extend(more)
            for name in more:
                kept_why[name] = ((rule if name in heads else None) or _why_kept(name, exc, an, plan, model.config)
                                  or rule or first_line(exc).split(": ", 1)[-1])
    raise UnsupportedModelError(f"no widening of {type(model).__name__} its config can state was found")


def widen_pretrained(model, factor=1.41, *, example_inputs, widths=None, only=None, exclude=None, divisor: int = 1,
                     init: str = "net2net", noise: float = 0.0, noise_mode: str = "exact", seed: int = 0,
                     verify: str = "torch", atol=None, rtol=None, fill: bool = True, strict: bool = False,
                     progress=None, _keep_heads: str | None = None):
    """:func:`graphgrow.widen` for a ``transformers.PreTrainedModel`` (same arguments; same class returned)."""
    factor = check_factor(factor, widths)
    check_options(init, noise_mode, divisor, noise)
    inputs = as_inputs(example_inputs)
    fill = bool(fill) and init == "net2net"
    options = GrowOptions(noise=noise, noise_mode=noise_mode, init=init, seed=seed)
    w = plan_widening(model, inputs, factor, widths=widths, only=only, exclude=exclude, divisor=divisor,
                      options=options, fill=fill, strict=strict, progress=progress, keep_heads=_keep_heads)
    state = dict(model.state_dict())
    for key, value in w.values.items():
        state[key] = torch.from_numpy(np.ascontiguousarray(value)).to(state[key].dtype)
    result = rebuilt(model, w.config, state)
    preserving = init == "net2net" and not (noise > 0 and noise_mode == "paper")
    report = w.report(model, count_params(result), preserving)
    if preserving and verify != "none":
        from ..verify import verify_growth

        def widen64():  # the same widening of a float64 copy (same plan, same draws): decides a float32/bf16 doubt
            double = copy.deepcopy(model).double()
            return ModelOutputs(widen_pretrained(double, factor, example_inputs=inputs, widths=widths, only=only,
                                                 exclude=exclude, divisor=divisor, init=init, noise=noise,
                                                 noise_mode=noise_mode, seed=seed, verify="none", fill=fill,
                                                 strict=strict, _keep_heads=_keep_heads), names)

        names = input_names(inputs)
        dtype = next(model.parameters()).dtype
        reference, candidate, redo64 = ModelOutputs(model, names), ModelOutputs(result, names), widen64
        if dtype in (torch.float16, torch.bfloat16):
            # the new weights are rounded to the model's dtype: both models are compared in float32, within
            # that dtype's rounding (graphgrow.hf.stream.TOLERANCE), unless rtol says otherwise
            from .stream import TOLERANCE

            reference = ModelOutputs(copy.deepcopy(model).float(), names)
            candidate = ModelOutputs(copy.deepcopy(result).float(), names)
            rtol, redo64 = TOLERANCE[dtype] if rtol is None else rtol, None
            report.notes.append(f"checked in float32 within {dtype} rounding (rtol {rtol:g})")
        try:
            verify_growth(reference, candidate, inputs, report, "widened", verify, atol, rtol, seed, redo64)
        except VerificationError as exc:
            heads_grew = any(w.plan.new_size(sp) > sp.size for sp in w.an.produced
                             if w.an.constraints.heads_of.get(sp.id))
            if heads_grew and not _keep_heads and not widths:
                # the graph's widening was consistent, the family's code at the grown config is not: its heads
                # are laid out in a way the captured graph does not show (CodeGen's fixed mp_num=4 blocks of q, v
                # and k, read as per-head blocks by the export). Exact with its heads kept, or refused. With
                # fill + rescale in the plan either may be the cause: heads kept (fill kept) is tried first.
                why = (f"{type(model).__name__} at the grown head count lays its fused heads out differently from "
                       f"the captured graph ({first_line(exc)}): the heads keep their number")
                try:
                    return widen_pretrained(model, factor, example_inputs=inputs, widths=widths, only=only,
                                            exclude=exclude, divisor=divisor, init=init, noise=noise,
                                            noise_mode=noise_mode, seed=seed, verify=verify, atol=atol, rtol=rtol,
                                            fill=fill, strict=strict, progress=progress, _keep_heads=why)
                except VerificationError:
                    if not w.plan.fills:
                        raise
            if not w.plan.fills:
                raise
            result = widen_pretrained(model, factor, example_inputs=inputs, widths=widths, only=only,
                                      exclude=exclude, divisor=divisor, init=init, noise=noise, noise_mode=noise_mode,
                                      seed=seed, verify=verify, atol=atol, rtol=rtol, fill=False, strict=strict,
                                      _keep_heads=_keep_heads)
            result.graphgrow_report.notes.append(f"fill + rescale did not verify ({first_line(exc)}); normalized "
                                                 "streams kept their width")
            return result
    result.graphgrow_report = report
    return record_growth(result, widen_pretrained, factor=factor, example_inputs=example_inputs, widths=widths, only=only,
                         exclude=exclude, divisor=divisor, init=init, noise=noise, noise_mode=noise_mode, seed=seed,
                         fill=fill, strict=strict, _keep_heads=_keep_heads)


def config_notes(old, new, prefix: str = "") -> list:
    a, b = (old if isinstance(old, dict) else old.to_dict()), (new if isinstance(new, dict) else new.to_dict())
    out = []
    for k in sorted(b):
        if k in a and a[k] != b[k] and k != "transformers_version":
            out += config_notes(a[k], b[k], f"{prefix}{k}.") if isinstance(a[k], dict) and isinstance(b[k], dict) \
                else [f"config {prefix}{k}: {a[k]} -> {b[k]}"]  # (a nested config: DBRX's ffn_config, by field)
    return out
