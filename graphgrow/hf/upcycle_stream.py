"""Upcycling (dense -> mixture of experts) and expert-count growth of a checkpoint DIRECTORY, in bounded memory.

The dense (or MoE) model is built from config.json on the meta device (:func:`.stream.meta_model`, which checks
the stored names and shapes), the per-tensor plan is made on it exactly as in memory (:func:`.upcycle.plan_upcycle`
/ :func:`.upcycle.plan_grow_experts`: one :class:`~graphgrow.core.moe.Piece` per tensor of the twin), and the
twin's tensors stream through :func:`.checkpoint.rewrite_checkpoint`, each piece computed once from the stored
tensors it reads, rounded once to the stored dtype: the bytes ``upcycle_pretrained`` + ``save_pretrained`` give.

Stored layout: transformers keeps the experts stacked in the model (``experts.gate_up_proj [E, 2I, H]``) but
writes and reads them in the family's stored layout (Mixtral: ``experts.N.w1.weight`` ...; GraniteMoE:
``input_linear.weight [E, 2I, H]``), by its own conversion rules (``revert_weight_conversion``); the twin is
written in that layout, so ``from_pretrained`` of the twin class loads it.  Where the stored layout is one tensor
per expert, each expert's tensor is a view of the dense block (computed once for all experts): a layer's unit
holds its dense gate, up and down tensors and their rounded blocks, not E copies.  Where the family stores the
stacked tensor (GraniteMoE), that tensor is E x the dense MLP tensor and is materialised once while written.

Writer units: a piece is announced under (written in the shard of) the last of its sources in storage order, so
gate and up of one layer are computed by one task; pieces with no source (routers, a shared expert's gate) ride
with their layer's MLP sources.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ..core.moe import MoEReport, apply_piece, copy_sets, source_expert
from ..errors import InvalidArgumentError
from .checkpoint import Checkpoint, rewrite_checkpoint
from .layout import revert_conversion, row_ranges
from .moe_plan import layer_of, layers_prefix
from .stream import check_mode, meta_model, output_check
from .upcycle import plan_grow_experts, plan_upcycle

_STACKED_OPS = ("experts", "repeat", "zeros")  # 3-D expert stacks a per-expert layout can take as views


def _numpy(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


def _stored_split(twin, key: str, shape: tuple) -> list:
    """[(stored name, shape)] of twin parameter ``key`` in the family's stored layout (transformers' conversion
    run on a meta tensor)."""
    revert = revert_conversion()
    if revert is None:
        return [(key, tuple(shape))]
    out = revert(twin, {key: torch.empty(tuple(shape), device="meta")})
    return [(name, tuple(t.shape)) for name, t in out.items()]


class _MoEStream:
    """The writer's plan (see rewrite_checkpoint): each source tensor -> the twin's stored tensors announced under
    it; a unit = the source tensors one layer's sparse block reads (plus the pieces with no source)."""

    def __init__(self, src: Checkpoint, layout, cls, config, pieces: list, meta_twin):
        self.src, self.layout, self.cls, self.config = src, layout, cls, config
        self._twin = meta_twin
        order = {name: i for i, name in enumerate(src.names())}
        self.pieces = {p.key: p for p in pieces}
        self.stored_of = {}  # source model key -> its stored names
        for p in pieces:
            for k in p.sources:
                self.stored_of[k] = list(layout.pieces[k]) if k in layout.pieces else [k]
        self.skipped = [p.key for p in pieces if p.op == "copy" and not all(
            n in order for n in self.stored_of[p.sources[0]])]  # (a tied weight the checkpoint does not store)
        self.split, self.views, self.announce = {}, {}, {}  # twin key -> stored split / per-expert views / source
        self.dtype = {}
        prefix = layers_prefix(self.pieces)
        anchors: dict = {}  # layer -> the last source name of its non-copied pieces
        for p in pieces:
            if p.key in self.skipped:
                continue
            names = [n for k in p.sources for n in self.stored_of[k]]
            if names:
                self.announce[p.key] = max(names, key=order.__getitem__)
                if p.op != "copy":
                    layer = layer_of(p.key, prefix)
                    best = anchors.get(layer)
                    if best is None or order[self.announce[p.key]] > order[best]:
                        anchors[layer] = self.announce[p.key]
        first = src.names()[0]
        for p in pieces:
            if p.key not in self.announce and p.key not in self.skipped:
                self.announce[p.key] = anchors.get(layer_of(p.key, prefix), first)
        self.unit_of = {name: name for name in src.names()}
        for p in pieces:  # union of the sources a piece reads, and of a sourceless piece with its anchor
            names = [n for k in p.sources for n in self.stored_of[k]] + ([self.announce[p.key]]
                                                                       if p.key in self.announce else [])
            for n in names[1:]:
                self._join(names[0], n)
        self.unit_of = {name: self._root(name) for name in src.names()}
        for p in pieces:
            if p.key in self.skipped:
                continue
            self.dtype[p.key] = src.dtype(self.announce[p.key])
            self.split[p.key] = _stored_split(meta_twin, p.key, p.shape)
            if p.op in _STACKED_OPS and len(p.shape) == 3 and (p.op != "repeat" or p.axis == 0) and \
                    len(self.split[p.key]) > 1:
                self.views[p.key] = row_ranges(meta_twin, p.key, p.shape)
        self.announced: dict = {}  # source name -> twin keys announced under it
        for key, name in self.announce.items():
            self.announced.setdefault(name, []).append(key)
        self.needed: dict = {}  # source stored name -> how many announced pieces still read it
        for key, name in self.announce.items():
            for n in {n for k in self.pieces[key].sources for n in self.stored_of[k]} - {name}:
                self.needed[n] = self.needed.get(n, 0) + 1
        self.cache: dict = {}

    def _root(self, name):
        while self.unit_of[name] != name:
            self.unit_of[name] = self.unit_of[self.unit_of[name]]
            name = self.unit_of[name]
        return name

    def _join(self, a, b):
        ra, rb = self._root(a), self._root(b)
        if ra != rb:
            self.unit_of[max(ra, rb)] = min(ra, rb)

    def __getstate__(self):  # (sent to the writer's processes: the meta twin is rebuilt there where needed)
        return {**self.__dict__, "_twin": None, "cache": {}}

    def twin(self):
        if self._twin is None:
            with torch.device("meta"):
                self._twin = self.cls(self.config)
        return self._twin

    # --- the writer's interface
    def unit(self, name):
        return self.unit_of[name]

    def outputs(self, name):
        return [(stored, shape, self.dtype[key]) for key in self.announced.get(name, ())
                for stored, shape in self.split[key]]

    def compute(self, name, tensor):
        keys = self.announced.get(name, ())
        if self.needed.get(name):
            self.cache[name] = tensor
        out = {}
        for key in keys:
            out.update(self._stored(key, lambda n: tensor if n == name else self.cache[n]))
        for key in keys:  # sources read for the last time
            for n in {n for k in self.pieces[key].sources for n in self.stored_of[k]} - {name}:
                self.needed[n] -= 1
                if not self.needed[n]:
                    self.cache.pop(n, None)
        return out

    # --- the values
    def _source(self, key: str, read) -> torch.Tensor:
        """Dense/MoE model tensor ``key`` as stored (assembled from its stored pieces where the layout cuts it)."""
        if key in self.layout.pieces:
            return self.layout.assemble(key, self.layout.model.state_dict()[key].shape, read)
        return read(key)

    def _stored(self, key: str, read) -> dict:
        p, dtype, split = self.pieces[key], self.dtype[key], self.split[key]
        if p.op == "copy" and len(split) == 1 and p.sources[0] not in self.layout.pieces:
            return {split[0][0]: read(p.sources[0])}  # bit-identical (renamed where the layout renames it)
        views = self.views.get(key)
        if views is not None:  # one (A, B) block per expert, each stored tensor a row range of it: views
            expert = self._expert_block(p, dtype, read)
            return {name: expert(e)[r0:r0 + a] for name, (e, r0, a) in views.items()}
        value = self._value(p, dtype, read)
        if len(split) == 1 and split[0][0] == key:
            return {key: value}
        return dict(revert_conversion()(self.twin(), {key: value}))

    def _expert_block(self, p, dtype, read):
        if p.op == "zeros":
            block = torch.zeros(p.shape[1:], dtype=dtype)
            return lambda e: block
        if p.op == "repeat":  # expert e of the grown stack is a source expert (x scale, rounded once)
            stack = self._source(p.sources[0], read)
            n = stack.shape[0]
            if p.scale == 1.0:
                return lambda e: stack[source_expert(e, n, p.copies, p.groups)]
            # (scaled one expert at a time: a float64 copy of the whole stack would be 4x a bf16 stack)
            return lambda e: self._round(_numpy(stack[source_expert(e, n, p.copies, p.groups)]).astype(np.float64)
                                         * p.scale, dtype)
        if p.noise > 0:  # noise differs per expert: the stack is materialised
            stack = self._value(p, dtype, read)
            return lambda e: stack[e]
        one = type(p)(p.key, (1, *p.shape[1:]), p.op, p.sources, scale=p.scale, copies=1, seed=p.seed)
        block = self._round(apply_piece(one, lambda k: _numpy(self._source(k, read))), dtype)[0]
        return lambda e: block

    def _value(self, p, dtype, read) -> torch.Tensor:
        """The twin's model tensor of piece ``p`` (as ``upcycle.materialize`` computes it)."""
        if p.op == "copy":
            return self._source(p.sources[0], read)
        if p.op == "experts" and p.noise == 0:  # the same block for every expert: a stride-0 view
            one = type(p)(p.key, (1, *p.shape[1:]), p.op, p.sources, scale=p.scale, copies=1, seed=p.seed)
            block = self._round(apply_piece(one, lambda k: _numpy(self._source(k, read))), dtype)
            return block.expand(*p.shape)
        return self._round(apply_piece(p, lambda k: _numpy(self._source(k, read))), dtype)

    @staticmethod
    def _round(arr, dtype) -> torch.Tensor:
        with warnings.catch_warnings():  # (a broadcast view is read-only; the writer only reads it)
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)


def _checker(src, model, plan, check, seed, figures, check_progress):
    """stream.output_check, told that the routed experts are copies (see layer_check: each is then run)."""
    m = plan.experts[1] // max(plan.experts[0], 1)  # (upcycled: all E experts copies; grown: m of each)
    copies = copy_sets(plan.experts[0], m, plan.groups)
    return output_check(src, model, check_mode(check), seed, figures, check_progress, copies=copies)


def _inexact_needs_no_check(check, what: str) -> None:
    if check_mode(check) != "none":
        raise InvalidArgumentError(f"{what} is not function-preserving, so the written checkpoint cannot pass the "
                                   "check: pass check='none' (--no-check) to write it unverified")


def _write(src, model, plan, out_dir, report, *, check, seed, overwrite, progress, check_progress, workers,
           executor) -> dict:
    with torch.device("meta"):
        meta_twin = plan.cls(plan.config)
    stream = _MoEStream(src, model.graphgrow_layout, plan.cls, plan.config, plan.pieces, meta_twin)
    report.params_before = sum(math.prod(t.shape) for t in model.parameters())
    report.params_after = sum(math.prod(t.shape) for t in meta_twin.parameters())
    config = plan.config.to_diff_dict()
    config["architectures"] = [plan.cls.__name__]
    figures: dict = {}
    rewrite_checkpoint(src, out_dir, config, stream, overwrite=overwrite, progress=progress, workers=workers,
                       executor=executor, verify=_checker(src, model, plan, check, seed, figures, check_progress))
    return {"report": report, "config": plan.config, "check": figures or None}


def upcycle_checkpoint(path, out_dir, experts: int = 8, top_k: int = 2, *, router: str = "zero", shared=None,
                       layers=None, seed: int = 0, noise: float = 0.0, router_std=None, moe_config=None, check=True,
                       allow_pickle: bool = False, overwrite: bool = False, progress=None, check_progress=None,
                       workers=None, executor=None) -> dict:
    """:func:`graphgrow.upcycle` of the checkpoint directory ``path`` into ``out_dir`` (the twin's class, its
    stored layout, the input's dtype), streamed; returns {"report": MoEReport, "config", "check"}.  ``check``:
    "layers" (True), "full" or "none" (:func:`.stream.output_check`); ``noise`` > 0 (inexact) only with "none"."""
    check_mode(check)
    if noise:
        _inexact_needs_no_check(check, "noise inside the experts")
    src = Checkpoint.open(path, allow_pickle=allow_pickle)
    model = meta_model(src)
    stored = {src.dtype(n) for n in src.names()}  # (the meta model's parameters are float32)
    plan = plan_upcycle(model, experts, top_k, router=router, shared=shared, layers=layers, seed=seed, noise=noise,
                        router_std=router_std, moe_config=moe_config,
                        dtype=torch.float64 if torch.float64 in stored else torch.float32)
    report = MoEReport(type(model).__name__, plan.cls.__name__, *plan.experts, *plan.top_k, router, plan.shared,
                       plan.sparse, function_preserving=not noise, down_scale=plan.routed_scale,
                       notes=list(plan.notes))
    if noise:
        report.notes.append(f"noise {noise:g} x std inside every routed expert: NOT function-preserving; written "
                            "unverified")
    return _write(src, model, plan, out_dir, report, check=check, seed=seed, overwrite=overwrite, progress=progress,
                  check_progress=check_progress, workers=workers, executor=executor)


def grow_experts_checkpoint(path, out_dir, factor: int = 2, *, keep_top_k: bool = False, check=True, seed: int = 0,
                            allow_pickle: bool = False, overwrite: bool = False, progress=None, check_progress=None,
                            workers=None, executor=None) -> dict:
    """:func:`graphgrow.grow_experts` of the checkpoint directory ``path`` into ``out_dir``, streamed (as
    :func:`upcycle_checkpoint`); ``keep_top_k`` (inexact) only with check "none"."""
    check_mode(check)
    if keep_top_k:
        _inexact_needs_no_check(check, "keeping top-k")
    src = Checkpoint.open(path, allow_pickle=allow_pickle)
    model = meta_model(src)
    plan = plan_grow_experts(model, factor, keep_top_k=keep_top_k)
    report = MoEReport(type(model).__name__, plan.cls.__name__, *plan.experts, *plan.top_k, "copied", None,
                       plan.sparse, function_preserving=not keep_top_k, down_scale=plan.routed_scale,
                       notes=list(plan.notes))
    if keep_top_k:
        report.notes.append(f"top-k kept at {plan.top_k[0]}: NOT function-preserving; written unverified")
    return _write(src, model, plan, out_dir, report, check=check, seed=seed, overwrite=overwrite, progress=progress,
                  check_progress=check_progress, workers=workers, executor=executor)


__all__ = ["grow_experts_checkpoint", "upcycle_checkpoint"]
