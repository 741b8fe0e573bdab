"""Fill + rescale (docs/maths.md §5): widening a pre-norm residual stream by any number of channels.

The plan appends ``F`` new channels to every space of a stream (:func:`~graphgrow.core.plan.solve_plan`);
they carry label ids of their own (shared by the spaces of the stream, so operands of a residual add still
pair) and hold 0 (RMSNorm streams: every writer's new rows are 0) or the mean of the old channels
(LayerNorm streams: every writer's new rows are the mean of its old rows).  A norm over ``d' = d + F``
channels then sees the old mean and ``r = d / d'`` times the old variance (or mean square), so
``gamma' = gamma * sqrt(r)`` and ``eps' = eps * r`` give back the old outputs, and the new channels
leave the norm as 0; consumers read them with zero columns.

This module holds the label side (which slices are filled) and the norm rescale; the weight side is
:func:`~graphgrow.core.arithmetic.gather_fill` and :func:`~graphgrow.core.arithmetic.consume`.
"""

from __future__ import annotations

import numpy as np

from .recipe import along, recorded

from .label_tensor import LabelTensor, match_labels
from .labels import channel_of
from .provenance import Mismatch, RowMatch


def filled_slices(x: LabelTensor, axis: int, fill_start: int) -> np.ndarray | None:
    """Boolean mask of the slices along ``axis`` holding filled channels, or None when there are none."""
    if not len(x.chans) or int(x.chans.max()) < fill_start:
        return None
    chan = np.moveaxis(channel_of(x.a), axis, 0).reshape(x.shape[axis], -1)
    filled = chan >= fill_start
    mask = filled.all(axis=1)
    if (filled.any(axis=1) != mask).any():
        raise Mismatch("channels added by fill + rescale mix with others in one slice")
    return mask


def match_with_fills(old: LabelTensor, new: LabelTensor, axis: int, what: str, fill_start: int) -> RowMatch:
    """:func:`~graphgrow.core.label_tensor.match_labels` where ``new`` may hold filled slices (no old twin)."""
    mask = filled_slices(new, axis, fill_start)
    if mask is None:
        return match_labels(old, new, axis, what)
    keep = np.flatnonzero(~mask)
    sub = match_labels(old, LabelTensor(np.take(new.a, keep, axis=axis)), axis, what)
    content = np.zeros(new.shape[axis], np.int64)
    content[keep] = sub.content
    return RowMatch(content, sub.old_of_content, sub.copies, sub.n_old, fills=mask)


def norm_rescale(m: RowMatch, params: dict, param_axis: int, eps: float | None, kind: str, fill_kind: str):
    """New parameters of a norm whose input gained filled channels (appended after the unchanged old ones):
    ``(params, eps)``. ``params``: name -> array (the gain under "weight"/"scale", the bias otherwise)."""
    d_old, d_new = m.n_old, m.n_new
    if not np.array_equal(m.source()[:d_old], np.arange(d_old)) or not m.fills[d_old:].all():
        raise Mismatch("filled channels are not appended after the original ones")
    if (kind, fill_kind) not in (("rms", "zero"), ("layer", "mean")):
        raise Mismatch(f"a {kind} norm cannot read channels filled with the stream's {fill_kind}")
    r = d_old / d_new
    gains = [k for k in params if params[k] is not None and (k in ("weight", "scale", 1) or str(k).endswith("weight"))]
    if not gains:
        raise Mismatch("the norm has no affine gain to absorb the rescale")
    out = {key: _rescaled(c, param_axis, key in gains, d_new, r) for key, c in params.items() if c is not None}
    return out, (None if eps is None else eps * r)


def gainless_ratio(m: RowMatch, kind: str, fill_kind: str) -> float:
    """``r = d/d'`` for a norm without parameters (OLMo's LayerNorm) whose input gained filled channels. No gain
    takes ``sqrt(r)`` and the family's code may fix ``eps``, so the stream itself is scaled instead: writers
    multiply by ``c = 1/sqrt(r)``, the norm then sees the old variance (``c^2 r var = var``) and returns ``c``
    times its old output with ``eps`` unchanged, and every reader divides by ``c`` (docs/maths.md §5)."""
    d_old, d_new = m.n_old, m.n_new
    if not np.array_equal(m.source()[:d_old], np.arange(d_old)) or not m.fills[d_old:].all():
        raise Mismatch("filled channels are not appended after the original ones")
    if (kind, fill_kind) not in (("rms", "zero"), ("layer", "mean")):
        raise Mismatch(f"a {kind} norm cannot read channels filled with the stream's {fill_kind}")
    return d_old / d_new


@recorded(along(0, lambda a, k: a[2]))
def _rescaled(c: np.ndarray, param_axis: int, gain: bool, d_new: int, r: float) -> np.ndarray:
    """A gain times sqrt(r), its new entries the mean gain times sqrt(r); a bias, its new entries 0."""
    moved = np.moveaxis(c.astype(np.float64), param_axis, 0)
    d_old = moved.shape[0]
    if gain:
        new = np.concatenate([moved * np.sqrt(r), np.repeat(moved.mean(axis=0, keepdims=True) * np.sqrt(r),
                                                              d_new - d_old, axis=0)])
    else:
        new = np.concatenate([moved, np.zeros((d_new - d_old,) + moved.shape[1:])])
    return np.moveaxis(new, 0, param_axis).astype(c.dtype)
