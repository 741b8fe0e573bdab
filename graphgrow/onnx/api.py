"""The ONNX Python API: :func:`widen`, :func:`deepen`, :func:`analyze` and :func:`check` on ONNX models.

Each takes an ``onnx.ModelProto`` or the path of an ONNX file and returns a report object (a dataclass with
``summary()`` and ``to_dict()``); the rewriting calls also hold the new model (``.model``) and write it
atomically with ``.save(path)``.  Bad arguments or models raise a :class:`~graphgrow.errors.GraphGrowError`
subclass with one sentence; a rewritten model that is not equivalent raises
:class:`~graphgrow.errors.VerificationError`.  Never imports torch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np

from ..compare import DEFAULT_ATOL, DEFAULT_RTOL, CheckReport
from ..core.deepen import DeepenReport
from ..core.report import GrowthReport
from .checking import DEFAULT_BATCHES, check_batches, check_models, shape_dict
from .deepening import deepen_model
from .engine import analyze_model, widen_model_serialized
from .io import check_output_path, is_binary_onnx, save_model
from .source import model_source

__all__ = ["widen", "deepen", "analyze", "check", "WidenResult", "DeepenResult", "AnalysisResult", "CheckResult"]


def _extended(cls, report, **extra):
    """``report`` (a dataclass instance) as an instance of its subclass ``cls``, with the ``extra`` fields."""
    return cls(**{f.name: getattr(report, f.name) for f in dataclasses.fields(report)}, **extra)


def _load(model_or_path, say) -> tuple:
    if isinstance(model_or_path, (str, os.PathLike)):
        say(f"loading {os.fspath(model_or_path)} ...")
    return model_source(model_or_path)


def _path_of(model_or_path) -> str | None:
    return os.fspath(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else None


def _quiet(msg: str) -> None:
    pass


class _SavesModel:
    """``save(path)`` for results holding a rewritten model (``model``, ``source``, ``serialized``)."""

    def save(self, path) -> list:
        """Write the model to ``path`` atomically (a ``.data`` file beside it when over 2 GB); returns the paths
        written.  Refuses (InvalidArgumentError) a missing folder, a directory, or the file the model came from."""
        source = self.source if self.source is not None and os.path.exists(self.source) else None
        path = check_output_path(path, source)
        return save_model(self.model, path, self.serialized)


@dataclass
class WidenResult(GrowthReport, _SavesModel):
    """What :func:`widen` did to every channel space (a :class:`~graphgrow.core.report.GrowthReport`), the widened
    ``model`` and, with ``check=True``, the onnxruntime comparison in ``check``."""

    model: object = field(default=None, repr=False, compare=False)  # the widened onnx.ModelProto
    source: str | None = None  # the path the input was read from
    serialized: bytes | None = field(default=None, repr=False, compare=False)  # the bytes onnxruntime verified


@dataclass
class DeepenResult(DeepenReport, _SavesModel):
    """The blocks :func:`deepen` inserted (a :class:`~graphgrow.core.deepen.DeepenReport`) and the deepened
    ``model``."""

    model: object = field(default=None, repr=False, compare=False)  # the deepened onnx.ModelProto
    source: str | None = None
    serialized: bytes | None = field(default=None, repr=False, compare=False)


@dataclass
class AnalysisResult(GrowthReport):
    """The channel spaces of a model, which of them can widen, and the groups that must widen together."""

    groups: list = field(default_factory=list)  # sorted names of spaces coupled by ties (add, concat, groups, ...)

    def summary(self) -> str:
        n_frozen = sum(1 for s in self.spaces if s.frozen_reasons)
        return (f"{len(self.spaces)} channel spaces, {len(self.spaces) - n_frozen} widenable, {n_frozen} frozen; "
                f"{len(self.groups)} coupled groups; params {self.params_before:,}")

    def table(self) -> str:
        rows = [f"{'space':48s} {'size':>6s}  {'status':10s} consumers / reason"]
        for s in self.spaces:
            status = "frozen" if s.frozen_reasons else "widenable"
            detail = "; ".join(s.frozen_reasons) if s.frozen_reasons else ", ".join(s.consumers[:3])
            rows.append(f"{s.name[-48:]:48s} {s.old_width:6d}  {status:10s} {detail}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["groups"] = [list(g) for g in self.groups]
        return d

    def to_dot(self) -> str:
        """The spaces (green: widenable, red: frozen), their consumers and couplings, for graphviz."""
        lines = ["graph channel_spaces {", "  node [shape=box, fontsize=10];"]
        ids = {s.name: f"s{i}" for i, s in enumerate(self.spaces)}
        for s in self.spaces:
            color = "tomato" if s.frozen_reasons else "palegreen"
            label = f"{s.name}\\n{s.old_width} ch" + (f"\\n{s.frozen_reasons[0][:60]}" if s.frozen_reasons else "")
            label = label.replace('"', "'")
            lines.append(f'  {ids[s.name]} [label="{label}", style=filled, fillcolor={color}];')
        for g in self.groups:
            for a, b in zip(g, g[1:]):
                lines.append(f"  {ids[a]} -- {ids[b]} [style=dashed];")
        for s in self.spaces:
            for c in s.consumers:
                if c in ids and c != s.name:
                    lines.append(f"  {ids[s.name]} -- {ids[c]};")
        lines.append("}")
        return "\n".join(lines) + "\n"


@dataclass
class CheckResult(CheckReport):
    """The comparison of two models (a :class:`~graphgrow.compare.CheckReport`) and the input shapes used."""

    reference: str | None = None  # the paths compared (None for an in-memory model)
    candidate: str | None = None
    input_shapes: dict = field(default_factory=dict)  # input name -> shape of the random batches

    @property
    def equivalent(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["equivalent"] = bool(self.passed)
        d["reference"] = self.reference
        d["candidate"] = self.candidate
        d["input_shapes"] = {k: [int(x) for x in v] for k, v in self.input_shapes.items()}
        return d


def _coupled_groups(an) -> list:
    """Groups of spaces coupled by ties (add, concat+add, groups, shuffles): they widen together."""
    cls = an.constraints.classes()
    groups: dict = {}
    for sp in an.produced:
        keys = set(np.unique(cls[sp.chan_ids]).tolist())
        groups.setdefault(min(keys), set()).add(sp.name)
        for k in keys:
            groups.setdefault(k, set()).add(sp.name)
    merged = []
    for g in groups.values():
        if len(g) > 1 and g not in merged:
            merged.append(g)
    out: list = []  # union of overlapping sets
    for g in merged:
        for o in out:
            if o & g:
                o |= g
                break
        else:
            out.append(set(g))
    return [sorted(g) for g in out]


def widen(model_or_path, factor: float | None = 1.41, *, widths=None, only=None, exclude=None, divisor: int = 1,
          init: str = "net2net", noise: float = 0.0, noise_mode: str = "exact", seed: int = 0, shapes=None,
          check: bool = True, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, batches: int = DEFAULT_BATCHES,
          providers=None, progress=None, fill: bool = True, strict: bool = False) -> WidenResult:
    """Net2WiderNet on an ONNX model: a wider model computing the same function.

    ``factor``, ``widths`` (``{producer node name: width}``), ``only`` / ``exclude`` (regexes over producer node
    names), ``divisor``, ``init``, ``noise``, ``noise_mode``, ``fill`` and ``strict`` mean what they mean for
    :func:`graphgrow.widen`.  ``shapes``: ``{input name: shape}`` for dynamic dimensions (default 1).  With
    ``check`` the result is compared with the input in onnxruntime on ``batches`` random batches (``providers``:
    None/``"cpu"``, ``"cuda"`` or onnxruntime provider names) and a difference beyond ``atol``/``rtol`` raises
    :class:`~graphgrow.errors.VerificationError`.  The input is never modified.  ``progress``: a callable
    receiving one-line status messages.
    """
    batches, shapes = check_batches(batches), shape_dict(shapes)
    say = progress or _quiet
    model, path = _load(model_or_path, say)
    reference = path if path is not None and is_binary_onnx(path) else None
    out, report, data = widen_model_serialized(
        model, factor, widths=widths, only=only, exclude=exclude, divisor=divisor, init=init, noise=noise,
        noise_mode=noise_mode, seed=seed, shapes=shapes, check=check, atol=atol, rtol=rtol, batches=batches,
        providers=providers, progress=say, reference=reference, fill=fill, strict=strict)
    return _extended(WidenResult, report, model=out, source=path, serialized=data)


def deepen(model_or_path, *, after, block: str = "conv-bn-relu", kernel=3, seed: int = 0, shapes=None,
           check: bool = True, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, batches: int = DEFAULT_BATCHES,
           providers=None, progress=None) -> DeepenResult:
    """Net2DeeperNet on an ONNX model: identity blocks after the node or value names ``after`` picks (a regex
    matching a whole name, or a list of exact names).

    ``block`` and ``kernel`` mean what they mean for :func:`graphgrow.deepen`; each block's output keeps the old
    value name, so consumers and graph outputs are untouched.  ``block="copy"``: ``after`` matches module scopes
    of the exporter (``layers.3``), each copied after itself with its projections into the residual stream zeroed.  Verification, ``shapes`` and ``progress`` as for
    :func:`widen`.
    """
    batches, shapes = check_batches(batches), shape_dict(shapes)
    say = progress or _quiet
    model, path = _load(model_or_path, say)
    if block == "copy":  # block expansion: module scopes (layers.3) copied with their stream projections zeroed
        from .block_copy import copy_blocks

        out, report = copy_blocks(model, after=after, shapes=shapes, check=check, atol=atol, rtol=rtol,
                                  batches=batches, providers=providers, seed=seed, progress=say)
        return _extended(DeepenResult, report, model=out, source=path)
    out, report = deepen_model(model, after=after, block=block, kernel=kernel, seed=seed, shapes=shapes, check=check,
                               atol=atol, rtol=rtol, batches=batches, providers=providers, progress=say)
    return _extended(DeepenResult, report, model=out, source=path)


def analyze(model_or_path, shapes=None, *, progress=None) -> AnalysisResult:
    """The channel spaces of an ONNX model, why each that cannot widen stays, and the coupled groups;
    nothing is changed."""
    shapes = shape_dict(shapes)
    say = progress or _quiet
    model, _ = _load(model_or_path, say)
    say("analysing channel spaces ...")
    report, an = analyze_model(model, shapes)
    return _extended(AnalysisResult, report, groups=_coupled_groups(an))


def check(reference, candidate, *, inputs=None, batches: int = DEFAULT_BATCHES, shapes=None,
          atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, providers=None, seed: int = 0,
          progress=None) -> CheckResult:
    """Run two ONNX models (paths or ModelProtos) in onnxruntime on the same inputs and compare their outputs
    by position.

    ``inputs``: the first batch (an ``.npz`` path or ``{input name: array}``); further batches are random (from
    ``seed``), with dynamic dimensions 1 unless ``shapes`` (``{input name: shape}``) says otherwise.  An output
    passes when max_abs <= ``atol`` or max_rel <= ``rtol``.  Returns the report (``.passed``); a bad file or
    mismatched inputs raise a GraphGrowError.
    """
    report, concrete = check_models(reference, candidate, inputs=inputs, batches=batches, shapes=shapes, atol=atol,
                                    rtol=rtol, providers=providers, seed=seed, progress=progress)
    return _extended(CheckResult, report, reference=_path_of(reference), candidate=_path_of(candidate),
                     input_shapes=concrete)
