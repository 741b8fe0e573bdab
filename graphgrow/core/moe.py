"""Mixture-of-experts growth as per-tensor recipes: dense -> MoE upcycling and expert-count growth.

Every tensor of the grown model is a :class:`Piece`: which stored tensors it reads, and one small operation
on them (a copy, the dense MLP stacked once per expert and scaled, zeros, small random router rows, every
expert repeated m times).  A piece depends on nothing but its sources, so an in-memory rewrite and a
streamed checkpoint writer compute the same bytes: the writer reads ``piece.sources``, calls
:func:`apply_piece` and writes ``piece.key`` (random rows are drawn from ``piece.seed``, not from a shared
generator).  The family-specific parts (which keys, which scale) are decided by the frontend
(graphgrow.hf.upcycle); the arithmetic is here, in numpy.  The constructions and why they are exact are in
docs/maths.md ("Mixtures of experts").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OPS = ("copy", "concat", "experts", "zeros", "normal", "repeat")


@dataclass(frozen=True)
class Piece:
    """One tensor of the grown model.

    ``op``: ``"copy"`` sources[0] as stored (bit-identical); ``"concat"`` the sources concatenated along axis 0,
    x scale (one source: a scaled copy); ``"experts"``
    the sources concatenated along axis 0 (gate rows then up rows), stacked ``copies`` times along a new
    leading axis, x scale, plus ``noise`` x (the block's std) Gaussian noise per expert when noise > 0
    (inexact); ``"zeros"``; ``"normal"`` N(0, std) rows drawn from ``seed``; ``"repeat"`` sources[0] with
    every entry of axis ``axis`` repeated ``copies`` times in place (expert e -> experts e*m .. e*m + m - 1),
    x scale (``groups`` > 1: each group's experts repeated as a block, see :func:`source_expert`)."""

    key: str
    shape: tuple
    op: str
    sources: tuple = ()
    scale: float = 1.0
    copies: int = 1
    std: float = 0.0
    seed: int = 0
    noise: float = 0.0
    axis: int = 0  # "repeat": the experts' axis
    groups: int = 1  # "repeat" of experts routed in groups: each group's experts repeated as a block (see source_expert)

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown piece op {self.op!r}")

    def to_dict(self) -> dict:
        return {"key": self.key, "shape": list(self.shape), "op": self.op, "sources": list(self.sources),
                "scale": self.scale, "copies": self.copies, "std": self.std, "seed": self.seed, "noise": self.noise,
                "axis": self.axis, "groups": self.groups}


def apply_piece(piece: Piece, read) -> np.ndarray:
    """The value of ``piece``; ``read(key)`` returns a stored source tensor as a numpy array.  Scaled values are
    computed in float64 (the caller rounds once to the model's dtype); copies keep the source's dtype."""
    if piece.op == "copy":
        return read(piece.sources[0])
    if piece.op == "zeros":
        return np.zeros(piece.shape, dtype=np.float64)
    if piece.op == "normal":
        return np.random.default_rng(piece.seed).normal(0.0, piece.std, piece.shape)
    src = [np.asarray(read(k)) for k in piece.sources]
    if piece.op == "concat":
        out = np.concatenate(src, axis=0)
        return out.astype(np.float64) * piece.scale if piece.scale != 1.0 else out
    if piece.op == "repeat":
        n = src[0].shape[piece.axis]
        index = [source_expert(e, n, piece.copies, piece.groups) for e in range(n * piece.copies)]
        out = np.take(src[0], index, axis=piece.axis)
        return out.astype(np.float64) * piece.scale if piece.scale != 1.0 else out
    block = np.concatenate(src, axis=0)  # "experts": (rows, cols) -> (copies, rows, cols)
    out = np.broadcast_to(block, (piece.copies, *block.shape))
    if piece.scale != 1.0 or piece.noise > 0:
        out = out.astype(np.float64) * piece.scale
    if piece.noise > 0:  # per-expert noise: breaks the copies' symmetry, and the exactness (the report says so)
        std = float(np.std(block.astype(np.float64))) or 1.0
        out = out + np.random.default_rng(piece.seed).normal(0.0, piece.noise * std, out.shape)
    out = np.ascontiguousarray(out)
    if tuple(out.shape) != tuple(piece.shape):
        raise ValueError(f"{piece.key}: built shape {tuple(out.shape)}, planned {tuple(piece.shape)}")
    return out


def source_expert(e: int, n: int, copies: int, groups: int = 1) -> int:
    """The source expert of expert ``e`` of a stack of ``n`` experts grown ``copies`` times.  Ungrouped: in place,
    expert i -> i*m .. i*m + m - 1.  Routed in ``groups`` (group-limited routing scores each group): group g's
    experts, as a block, once per copy, so the grown stack holds ``groups`` x m groups, each a copy of one
    source group (its score, its choice within)."""
    if groups <= 1:
        return e // copies
    per = n // groups
    return e // (copies * per) * per + e % per


def copy_sets(n: int, copies: int, groups: int = 1) -> list:
    """The experts of the grown stack (``n`` source experts x ``copies``) that copy one source expert, per source
    expert: [[grown indices]]."""
    sets: dict = {}
    for e in range(n * copies):
        sets.setdefault(source_expert(e, n, copies, groups), []).append(e)
    return [sets[i] for i in range(n)]


def weight_sum_scale(weight_sum: float) -> float:
    """The down-projection scale that makes copies exact when the router's chosen weights sum to
    ``weight_sum`` for every token (a zero router: k/E unnormalised, 1 renormalised, 1/E + 1/(E-1) for
    PhiMoE's sparsemixer): computed in float64 from the weights the family's own router gives."""
    return 1.0 / float(weight_sum)


@dataclass
class MoEReport:
    """What an upcycling (or an expert-count growth) did, measured."""

    source: str  # class of the input model
    target: str  # class of the result
    experts_before: int
    experts: int
    top_k_before: int
    top_k: int
    router: str  # "zero", "random" or "copied" (expert growth)
    shared: str | None
    sparse_layers: list
    params_before: int = 0
    params_after: int = 0
    function_preserving: bool = True
    down_scale: float = 1.0  # the routed experts' down-projection scale (E/k, 1/(weight sum), 0 or 1)
    deviation: float | None = None  # measured max_rel of an inexact result (noise, fixed top-k)
    check: object = None  # the CheckReport of the verification
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        line = (f"{self.source} -> {self.target}: experts {self.experts_before} -> {self.experts}, top-k "
                f"{self.top_k_before} -> {self.top_k}, {len(self.sparse_layers)} sparse layers, router {self.router}"
                + (f", shared expert {self.shared}" if self.shared else "")
                + f"; params {self.params_before:,} -> {self.params_after:,}")
        if self.check is not None:
            line += f"; {self.check.summary()}"
        if not self.function_preserving:
            line += (" (NOT function-preserving" + (f": measured max_rel {self.deviation:.3g}"
                                                    if self.deviation is not None else "") + ")")
        return line

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "check"}
        out["sparse_layers"] = list(self.sparse_layers)
        out["check"] = self.check.to_dict() if self.check is not None and hasattr(self.check, "to_dict") else None
        return out

    def __str__(self) -> str:
        return self.summary()
