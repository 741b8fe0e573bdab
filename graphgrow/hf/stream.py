"""Growing a checkpoint directory in bounded memory.

The model is built from config.json on the meta device (no weights, no memory) and checked against the
stored shapes; the widening is planned on that model, its parameters entering the apply run as recipes
(:mod:`graphgrow.core.recipe`); block expansion needs only the graph.  The weights then stream, tensor by
tensor, from the input shards to the output shards (:func:`~.checkpoint.rewrite_checkpoint`), each through
its recipe.  Before the output is moved into place it is checked against the input on the same token
sequences: by default layer by layer, in bounded memory (:mod:`.layer_check`), or with both models loaded
whole (``check="full"``); ``check=False`` skips it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.sites import GrowOptions
from ..core.growth import check_factor
from ..errors import InvalidArgumentError, UnsupportedModelError, VerificationError, first_line
from .capture import NamedInputs, tied_groups
from .config_file import build_meta, read_config
from .checkpoint import Checkpoint, rewrite_checkpoint
from .layout import StoredLayout
from . import layer_check
from .deepen import LayerCopies, plan_copies, require_fits
from .stacks import layer_stacks
from .scales import unsaved_keys
from .widen import plan_widening
from ..core.memory import available_memory as _available_memory

# max |grown - original| / max |original| accepted for the stored dtype: a weight divided by its copies or
# rescaled by sqrt(d/d') is rounded to the checkpoint's dtype, which the original weights were not.  float64:
# transformers computes norms (Llama's RMSNorm), router softmaxes and some attention in float32 even in a float64
# model, so a correct growth that changes a width moves the outputs by float32 rounding (measured 7e-8..2e-7);
# 1e-6 still sits two orders of magnitude below the smallest error a wrong mapping makes (maths.md section 7)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def model_class(src: Checkpoint):
    """(the class config.json's architectures names, the transformers config): only classes transformers itself
    defines (never remote code)."""
    import transformers

    config = read_config(src.path, src.config)
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch is None:
        raise InvalidArgumentError(f"{src.path}/config.json has no 'architectures' entry: the model class is unknown")
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise UnsupportedModelError(f"config.json names architecture {arch!r}, which transformers "
                                    f"{transformers.__version__} does not define (custom code is never run)")
    return cls, config


def meta_model(src: Checkpoint):
    """The checkpoint's model class built from its config.json on the meta device, checked to hold exactly
    the stored tensors' names and shapes. Only classes transformers itself defines are used (never remote code)."""
    cls, config = model_class(src)
    arch = cls.__name__
    model = build_meta(cls, config, src.path, src.config).eval()
    computed_buffers(model)
    state = model.state_dict(keep_vars=True)
    groups = tied_groups(model)
    layout = model.graphgrow_layout = StoredLayout(model, src.names())  # (stacked experts stored per expert)
    shapes = {name: shape for key in layout.pieces for name, shape in
              layout.stored_shapes(key, state[key].shape).items()}
    for name in src.names():
        if name not in state and name not in shapes:
            raise InvalidArgumentError(f"{src.path}: the weights hold {name!r}, which {arch} built from "
                                       "config.json does not have")
        given = shapes[name] if name in shapes else tuple(state[name].shape)
        if tuple(given) != tuple(src.shape(name)):
            raise InvalidArgumentError(f"{src.path}: config.json and the weights disagree: {name!r} is stored as "
                                       f"{list(src.shape(name))}, config.json gives {list(given)}")
    # (parameters the family never saves are recomputed by from_pretrained: MarianMTModel's sinusoidal positions)
    stored = set(src.names()) | set(layout.pieces) | unsaved_keys(model)
    missing = [k for k in state if not stored & set(groups.get(k, [k])) and k in dict(model.named_parameters())]
    if missing:
        raise InvalidArgumentError(f"{src.path}: the weights lack {missing[0]!r} ({len(missing)} parameters missing)")
    for key, t in state.items():
        t.graphgrow_key = key  # recipes name the tensor they rewrite
    _stored_values(model, src, layout, groups)
    return model


def _stored_values(model, src: Checkpoint, layout: StoredLayout, groups: dict) -> None:
    """Each meta tensor learns where its value is (``graphgrow_load``, read by fx.shapes only when the graph cannot
    be shaped on the meta device: JetMoE sizes its expert batches by ``.tolist()`` of the routing): the stored
    tensor (assembled from its pieces), or, for what the family computes (rotary tables, MarianMTModel's unsaved
    sinusoidal positions), its own ``_init_weights`` on the CPU, as from_pretrained does."""
    names = set(src.names())
    for module_name, module in model.named_modules():
        for holder in (module._parameters, module._buffers):
            for attr, t in holder.items():
                if t is None or not t.is_meta:
                    continue
                key = f"{module_name}.{attr}" if module_name else attr
                stored = [k for k in groups.get(key, [key]) if k in names or k in layout.pieces]
                if stored and stored[0] in layout.pieces:
                    k = stored[0]
                    t.graphgrow_load = _Load(lambda k=k, t=t: layout.assemble(k, tuple(t.shape), src.get))
                elif stored:
                    t.graphgrow_load = _Load(lambda k=stored[0]: src.get(k))
                else:
                    t.graphgrow_load = _Load(lambda m=module, h=holder, a=attr: _computed(model, m, h, a))


class _Load:
    """A meta tensor's way to its value, used while planning only: pickled (with a plan sent to the writer's
    worker processes) as None."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self):
        return self.fn()

    def __reduce__(self):
        return (type(None), ())


def _computed(model, module, holder: dict, attr: str) -> torch.Tensor:
    """The value the family's ``_init_weights`` gives ``module.<attr>``, computed on the CPU (the meta tensor put
    back after)."""
    meta = holder[attr]
    cpu = torch.empty_like(meta, device="cpu")
    holder[attr] = torch.nn.Parameter(cpu, requires_grad=False) if isinstance(meta, torch.nn.Parameter) else cpu
    try:
        with torch.no_grad():
            model._init_weights(module)
        return holder[attr].detach()
    finally:
        holder[attr] = meta


def computed_buffers(model) -> None:
    """The non-persistent buffers of a meta-device ``model`` (embedding scales such as Gemma's sqrt(hidden),
    rotary frequencies) computed on the CPU by the family's own ``_init_weights``, as from_pretrained does.  The
    analysis reads such constants by value (a width-derived scale is compensated only where its value is known):
    left on the meta device, Gemma's normalizer went uncompensated and only the final check caught it."""
    owners = []
    for module in model.modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            buf = module._buffers.get(name)
            # (one-element constants only: a table left on the meta device keeps the capture on one device)
            if buf is not None and buf.is_meta and buf.numel() == 1:
                module._buffers[name] = torch.empty_like(buf, device="cpu")
                owners.append(module)
    with torch.no_grad():
        for module in dict.fromkeys(owners):
            model._init_weights(module)


def meta_inputs(model) -> tuple:
    """A weightless example input for capturing ``model`` (token ids, or pixels for vision models)."""
    name = getattr(model, "main_input_name", "input_ids")
    cfg = model.config
    if name == "input_ids" and getattr(cfg, "is_encoder_decoder", False):  # the decoder reads its own tokens
        return NamedInputs({"input_ids": torch.zeros((1, 8), dtype=torch.long, device="meta"),
                            "decoder_input_ids": torch.zeros((1, 4), dtype=torch.long, device="meta")})
    if name == "input_ids":
        return (torch.zeros((1, 8), dtype=torch.long, device="meta"),)
    if name == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return (torch.zeros((1, getattr(cfg, "num_channels", 3)) + size, device="meta"),)
    raise UnsupportedModelError(f"{type(model).__name__} reads {name!r}: only token and image models are supported")


class _WidenStream:
    """Each stored tensor through its recipe (float32 arithmetic, stored dtype kept). A parameter stored in pieces
    (``layout``: per-expert files of stacked experts) is assembled, grown and cut once, its pieces kept until
    each is written."""

    def __init__(self, src: Checkpoint, values: dict, layout: StoredLayout | None = None, model=None):
        self.src, self.values, self.layout = src, values, layout
        self.shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()} if model is not None else {}
        self.done: dict = {}  # model key -> its grown pieces not yet written

    def outputs(self, name):
        key = self.layout.owner.get(name) if self.layout else None
        if key is not None:
            v = self.values.get(key)
            shape = self.layout.stored_shapes(key, tuple(v.shape) if v is not None else self.shapes[key])[name]
            return [(name, shape, self.src.dtype(name))]
        v = self.values.get(name)
        return [(name, tuple(v.shape) if v is not None else self.src.shape(name), self.src.dtype(name))]

    def unit(self, name):  # the pieces of one parameter are computed together: one writer task
        return self.layout.owner.get(name, name) if self.layout else name

    def compute(self, name, tensor):
        key = self.layout.owner.get(name) if self.layout else None
        if key is not None:
            if key not in self.done:
                old = self.layout.assemble(key, self.shapes[key], lambda n: tensor if n == name else self.src.get(n))
                self.done[key] = self.layout.split(key, self._grown(key, old))
            pieces = self.done[key]
            out = {name: pieces.pop(name)}
            if not pieces:
                del self.done[key]
            return out
        return {name: self._grown(name, tensor)}

    def _grown(self, key, tensor):
        v = self.values.get(key)
        if v is None:
            return tensor
        arr = v.apply(tensor.float().numpy())
        return torch.from_numpy(np.ascontiguousarray(arr)).to(tensor.dtype)


class _DeepenStream:
    def __init__(self, src: Checkpoint, copies: LayerCopies):
        self.src, self.copies = src, copies

    def outputs(self, name):
        return [(new, self.src.shape(name), self.src.dtype(name)) for new, _ in self.copies.targets(name)]

    def compute(self, name, tensor):
        return {new: torch.zeros_like(tensor) if zero else tensor for new, zero in self.copies.targets(name)}


CHECKS = ("layers", "full", "none")


def check_mode(check) -> str:
    """``check`` as one of :data:`CHECKS` (True: "layers", the default; False: "none")."""
    mode = {True: "layers", False: "none", None: "none"}.get(check, check) if not isinstance(check, str) else check
    if mode not in CHECKS:
        raise InvalidArgumentError(f"check must be one of {', '.join(CHECKS)} (or True/False), not {check!r}")
    return mode


def _tolerance(src: Checkpoint) -> tuple:
    dtype = max((src.dtype(n) for n in src.names()), key=lambda d: TOLERANCE.get(d, 0))
    return TOLERANCE.get(dtype, 1e-4), dtype


def _full_check_bytes(src: Checkpoint, out: Checkpoint) -> int:
    """About what the whole-model check holds: both models in float32, and a quarter more for activations."""
    elements = sum(math.prod(c.shape(n)) for c in (src, out) for n in c.names())
    return int(elements * 4 * 1.25)


def _chain_side(ckpt: Checkpoint, model=None) -> "layer_check.Side":
    model = model if model is not None else meta_model(ckpt)
    return layer_check.Side(ckpt, model.config, type(model), layer_stacks(model), model.graphgrow_layout)


def _full_check(src: Checkpoint, out_dir: str, seed: int) -> float:
    """Both models, loaded by transformers in float32, on 3 batches of random tokens (or pixels): the max
    relative error of their first outputs."""
    import transformers

    cls = getattr(transformers, src.config["architectures"][0])  # (checked by meta_model)
    # the output's own class (an upcycled twin is another class), as its config.json names it
    new_cls = getattr(transformers, (Checkpoint.open(out_dir).config.get("architectures") or [None])[0] or "", cls)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        ref = cls.from_pretrained(src.path, dtype=torch.float32).eval()
        new = new_cls.from_pretrained(out_dir, dtype=torch.float32).eval()
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(3):
        if getattr(ref, "main_input_name", "input_ids") == "pixel_values":
            x = torch.randn((2,) + tuple(meta_inputs(ref)[0].shape[1:]), generator=gen)
        else:
            x = torch.randint(0, ref.config.vocab_size, (2, 12), generator=gen)
        kw = {"decoder_input_ids": x[:, :6]} if getattr(ref.config, "is_encoder_decoder", False) else {}
        with torch.no_grad():
            a, b = (m(x, **kw).to_tuple()[0] for m in (ref, new))
        worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)))
    return worst


class _Verify:
    """The check run on the written directory before it is moved into place.

    "layers" (the default) runs both models one layer at a time (:mod:`.layer_check`): bounded memory, every
    vocabulary row of the head compared; it follows the writer (:meth:`follow`, :meth:`written`), each layer
    checked as soon as its tensors are written.  A family whose layers cannot be run one at a time falls back
    to "full" where both models fit in the memory available, and is refused otherwise.  "full" loads both
    models whole.  Either compares the outputs within the stored dtype's :data:`TOLERANCE`."""

    def __init__(self, src: Checkpoint, model, mode: str, seed: int, report: dict, progress=None, copies=None):
        self.src, self.model, self.mode, self.seed, self.copies = src, model, mode, seed, copies
        self.report, self.progress = report, progress
        self.tolerance, self.dtype = _tolerance(src)
        self.chained = None  # the layer-by-layer check following the writer
        self.unavailable = None  # why it cannot run (layer_check.ChainUnavailable)
        self.stacks = None
        if mode == "layers":
            try:
                self.stacks = layer_check.chain_stacks(layer_stacks(model), type(model).__name__)
            except layer_check.ChainUnavailable as exc:
                self.unavailable = exc

    def order_key(self, name: str) -> tuple:
        """Where the writer puts output tensor ``name`` in its order: shared tensors, then layer by layer in
        the order the check runs them."""
        at = layer_check.layer_of(name, self.stacks) if self.stacks else None
        return (0,) if at is None else (1, *at)

    def follow(self, out_dir: str) -> None:
        """Start the layer-by-layer check on the directory being written (its config and headers in place)."""
        if self.mode != "layers" or self.unavailable is not None:
            return
        try:
            self.chained = layer_check.ChainedCheck(_chain_side(self.src, self.model),
                                                    _chain_side(Checkpoint.open(out_dir)), tolerance=self.tolerance,
                                                    seed=self.seed, progress=self.progress, copies=self.copies)
        except layer_check.ChainUnavailable as exc:
            self.unavailable = exc

    def written(self, names: set) -> None:
        if self.chained is None:
            return
        try:
            self.chained.advance(names)
        except layer_check.ChainUnavailable as exc:
            self.chained, self.unavailable = None, exc

    def __call__(self, out_dir: str) -> None:
        report, tolerance = self.report, self.tolerance
        report.clear()
        report.update(tolerance=tolerance, checked_dtype=str(self.dtype))
        how = self.mode
        if self.mode == "layers":
            if self.chained is None and self.unavailable is None:
                self.follow(out_dir)  # (not followed: the check runs on the complete output)
            try:
                if self.unavailable is not None:
                    raise self.unavailable
                result = self.chained.finish()
                report.update(check="layers", max_rel=result.max_rel, layers=result.layers,
                              vocab_rows=result.rows_checked)
                if result.experts_total:
                    report.update(experts_run=result.experts_run, experts_total=result.experts_total,
                                  rotated_max_rel=result.rotated_max_rel)
            except layer_check.ChainUnavailable as exc:
                out = Checkpoint.open(out_dir)
                need, have = _full_check_bytes(self.src, out), _available_memory()
                if have and need > have:
                    raise UnsupportedModelError(
                        f"the layer-by-layer check does not apply ({first_line(exc)}) and the whole-model check "
                        f"needs about {need / 2 ** 30:.1f} GiB, more than the {have / 2 ** 30:.1f} GiB available: "
                        "pass --check full (check='full') to run it anyway, or --no-check") from None
                how = "full"
                report["note"] = f"layer-by-layer check not applicable ({first_line(exc)}): whole models compared"
            finally:
                self.chained = None
        if how == "full":
            report.update(check="full", max_rel=_full_check(self.src, out_dir, self.seed))
        worst = report["max_rel"]
        if not worst <= tolerance:
            where = "layer by layer" if how == "layers" else "whole models"
            raise VerificationError(f"the grown checkpoint is not equivalent: max relative error {worst:.2e} > "
                                    f"{tolerance:.0e} (stored as {self.dtype}; checked {where})")


def output_check(src: Checkpoint, model, check, seed: int, report: dict, progress=None, copies=None):
    """The check of the written directory (a :class:`_Verify`), or None for ``check`` "none".  ``copies``: the
    sets of the written model's routed experts that are copies of one (upcycling, expert growth:
    :func:`graphgrow.core.moe.copy_sets`), which the layer-by-layer check then runs all (:class:`~.layer_check.ChainedCheck`)."""
    mode = check_mode(check)
    return None if mode == "none" else _Verify(src, model, mode, seed, report, progress, copies)


def widen_checkpoint(path, out_dir, factor=1.41, *, widths=None, only=None, exclude=None, divisor: int = 1,
                     fill: bool = True, strict: bool = False, check=True, seed: int = 0,
                     allow_pickle: bool = False, overwrite: bool = False, progress=None, check_progress=None,
                     workers=None, executor=None) -> dict:
    """Widen the checkpoint directory ``path`` into ``out_dir`` (same layout and dtype); returns a summary
    dict (the GrowthReport, the new config, the check's figures).  ``check``: "layers" (True, the default),
    "full" or "none" (False): see :func:`output_check`; ``workers``/``executor``: who writes the shards
    (:func:`~.checkpoint.rewrite_checkpoint`)."""
    factor = check_factor(factor, widths)
    check_mode(check)
    src = Checkpoint.open(path, allow_pickle=allow_pickle)
    model = meta_model(src)
    args = dict(widths=widths, only=only, exclude=exclude, divisor=divisor, strict=strict, check=check, seed=seed,
                overwrite=overwrite, progress=progress, check_progress=check_progress, workers=workers,
                executor=executor)
    return _widen_streamed(src, model, out_dir, factor, fill=fill, keep_heads=None, **args)


def _widen_streamed(src, model, out_dir, factor, *, fill, keep_heads, **args) -> dict:
    """One widening written and checked; where the check fails, the fallbacks :func:`graphgrow.widen` takes on
    a failed verification (heads kept, then normalized streams kept to whole factors), each written anew."""
    seed, widths = args["seed"], args["widths"]
    w = plan_widening(model, meta_inputs(model), factor, widths=widths, only=args["only"], exclude=args["exclude"],
                      divisor=args["divisor"], options=GrowOptions(seed=seed), fill=fill, strict=args["strict"],
                      keep_heads=keep_heads)
    shapes = {n: tuple(w.values[n].shape) if n in w.values else tuple(src.shape(n)) for n in src.names()}
    report = w.report(model, sum(int(np.prod(s)) for s in shapes.values()))
    figures: dict = {}
    try:
        rewrite_checkpoint(src, out_dir, w.config.to_diff_dict(),
                           _WidenStream(src, w.values, model.graphgrow_layout, model), overwrite=args["overwrite"],
                           progress=args["progress"], workers=args["workers"], executor=args["executor"],
                           verify=output_check(src, model, args["check"], seed, figures, args["check_progress"]))
    except VerificationError as exc:
        heads_grew = any(w.plan.new_size(sp) > sp.size for sp in w.an.produced
                         if w.an.constraints.heads_of.get(sp.id))
        if heads_grew and not keep_heads and not widths:  # (why: see graphgrow.hf.widen.widen_pretrained)
            why = (f"{type(model).__name__} at the grown head count lays its fused heads out differently from "
                   f"the captured graph ({first_line(exc)}): the heads keep their number")
            try:
                return _widen_streamed(src, model, out_dir, factor, fill=fill, keep_heads=why, **args)
            except VerificationError:
                if not w.plan.fills:
                    raise
        if not w.plan.fills:
            raise
        result = _widen_streamed(src, model, out_dir, factor, fill=False, keep_heads=keep_heads, **args)
        result["report"].notes.append(f"fill + rescale did not verify ({first_line(exc)}); normalized streams "
                                      "kept their width")
        return result
    return {"report": report, "config": w.config, "check": figures or None}


def deepen_checkpoint(path, out_dir, *, after, block: str = "copy", check=True, seed: int = 0,
                      allow_pickle: bool = False, overwrite: bool = False, progress=None,
                      check_progress=None, workers=None, executor=None) -> dict:
    """Block expansion of the checkpoint directory ``path`` into ``out_dir`` (``workers``/``executor``: as
    :func:`widen_checkpoint`)."""
    if block != "copy":
        raise InvalidArgumentError(f"--block {block} on a checkpoint directory: use --block copy")
    src = Checkpoint.open(path, allow_pickle=allow_pickle)
    model = meta_model(src)
    from .capture import capture

    plan = plan_copies(model, after, lambda: capture(model, meta_inputs(model)))
    config, copies = plan.config, plan.copies
    planned = {new: tuple(src.shape(name)) for name in src.names() for new, _ in copies.targets(name)}
    require_fits(model, plan, planned)
    if plan.fresh:  # the writer streams the source's tensors; a tensor the source lacks has no values to stream
        raise UnsupportedModelError(f"the copies need {sorted(plan.fresh)[0]!r}, which the copied layer does not hold "
                                    "(the family builds it only at the copy's position): deepen the loaded model "
                                    "with graphgrow.deepen, which starts it at the family's initial value")
    if plan.left_out and check_mode(check) == "none":
        raise UnsupportedModelError(f"the copies leave out {sorted(plan.left_out)[0]!r} (not built at the copy's "
                                    "position): only the check can vouch for that; run without --no-check")
    figures: dict = {}
    rewrite_checkpoint(src, out_dir, config.to_diff_dict(), _DeepenStream(src, copies),
                       overwrite=overwrite, progress=progress, workers=workers, executor=executor,
                       verify=output_check(src, model, check, seed, figures, check_progress))
    notes = plan.notes()
    return {"notes": notes, "config": config, "check": figures or None}
