"""Norm relations (docs/maths.md §5): LayerNorm, RMSNorm, GroupNorm and means across channels.

A norm reads statistics across its channel axis.  Copying every channel the same number of times
(*uniform replication*) keeps the mean, the variance and the mean square of every row, so the norm's
output is the old output with its channels copied: γ and β are gathered, ε stays.  The analysis ties
the channels of every normalized row together (:meth:`~graphgrow.core.plan.GrowthConstraints.uniform`);
the apply run checks that the widened row is a uniform copy of the original and gathers the parameters.

A mean across channels is the same relation without parameters: its value is unchanged under uniform
replication, so decomposed norms (``x * rsqrt(mean(x**2, -1) + eps)``, ONNX's ReduceMean/Sub/Pow/Sqrt/Div)
need no pattern matching.  Where a row keeps its length (the channels of one attention head) the
norm must see the same rows as before, in any number.
"""

from __future__ import annotations

import numpy as np

from . import arithmetic as ar
from .growth import NotUnderstood
from .label_tensor import LabelTensor, match_labels, reduced_labels, same_labels
from .labels import channel_of
from .fill import filled_slices, gainless_ratio, match_with_fills, norm_rescale
from .provenance import Mismatch, match_rows


def channel_rows(x: LabelTensor, axis: int) -> np.ndarray:
    """Channel ids of every row along ``axis`` (distinct rows, rows x axis length)."""
    f = x.factors()
    if f is not None and axis in f[0]:
        cax, part = f
        grid = channel_of(part.reshape([x.shape[c] for c in cax]))
        rows = np.moveaxis(grid, cax.index(axis), -1)
    else:
        rows = np.moveaxis(channel_of(x.a), axis, -1)
    return np.unique(rows.reshape(-1, x.shape[axis]), axis=0)


def fibers(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.moveaxis(a, axis, -1)
    return m.reshape(-1, m.shape[-1])


def row_match(old: LabelTensor, new: LabelTensor, axis: int, what: str, fill_start: int | None = None):
    """How the rows along ``axis`` changed: None (the same rows, in any number: the axis itself is
    unchanged), or the :class:`RowMatch` of a uniform replication along it.  Raises Mismatch otherwise.
    ``fill_start``: rows made only of channels fill + rescale added are not compared (they are new)."""
    if same_labels(old, new):
        return None
    if old.shape[axis] == new.shape[axis]:
        # the other channel axes may have grown (heads copied): every new row must be an old row
        rows = fibers(new.a, axis)
        if fill_start is not None:
            rows = rows[~(channel_of(rows) >= fill_start).all(axis=1)]
        match_rows(fibers(old.a, axis), rows, 0, what)
        return None
    m = match_labels(old, new, axis, what)
    if not m.unique_old or len(set(m.copies.tolist())) != 1:
        raise Mismatch(f"{what}: channels are not replicated uniformly ({sorted(set(m.copies.tolist()))} copies)")
    return m


class NormRelations:
    """The norm relations of :class:`~graphgrow.core.relations.RelationRun` (a mixin)."""

    # a frontend that can scale a filled stream's writers and readers (fill + rescale under a norm without gain)
    scales_gainless_streams = False

    def _norm_axis(self, x: LabelTensor, old_x: LabelTensor, axes) -> int | None:
        """The one channel axis among the normalized ``axes``; None when they hold only positions."""
        inside = [a for a in (x if self.analysis else old_x).vary if a in set(axes)]
        if len(inside) > 1:
            raise NotUnderstood("it normalizes across several channel axes at once")
        return inside[0] if inside else None

    def norm(self, node, name: str, x: LabelTensor, old_x: LabelTensor, axes, params: dict, param_axis: int,
             groups: int = 1, kind: str | None = None, eps: float | None = None):
        """A norm over ``axes`` (non-negative) with per-element parameters ``params`` (their axis
        ``param_axis`` runs along the channel axis); ``groups``: GroupNorm's groups along that axis; ``kind``
        ("rms" or "layer", with its ``eps``): the norm can be rescaled for channels fill + rescale adds.
        Returns ``(labels, {name: new}, match or None, new eps or None)``."""
        ax = self._norm_axis(x, old_x, axes)
        if ax is None:
            return self.elementwise(node, x), {}, None, None
        if groups > 1 and groups == (x if self.analysis else old_x).shape[ax]:
            # one channel per group (Wav2Vec2's feature-extractor GroupNorm(C, C)): each channel is normalized
            # over its positions alone, a per-channel op whose groups follow the channels
            out, new, match = self.carry(node, name, x, old_x, {k: c for k, c in params.items()
                                                                if c is not None and param_axis == 0}, axis=ax)
            return out, new, match, None
        self.note_roles(x, "carrier", name)
        if self.analysis:
            self.constraints.uniform(channel_rows(x, ax), self.site(node), kind if groups == 1 else None)
            out = self.elementwise(node, x)
            self.norm_outputs.add(id(out))
            return out, {}, None, None
        if self.plan.fills and (fills := self._fill_match(node, old_x, x, ax)) is not None:
            if self.scales_gainless_streams and not any(c is not None for c in params.values()):
                try:
                    r = gainless_ratio(fills, kind, self._stream_fill_kind(x))
                except Mismatch as exc:
                    raise self.conflict(node, str(exc)) from None
                self.stream_scales.append((node, x, r))  # the frontend scales the stream's writers and readers
                return self.elementwise(node, x), {}, fills, eps
            try:
                new, new_eps = norm_rescale(fills, params, param_axis, eps, kind, self._stream_fill_kind(x))
            except Mismatch as exc:
                raise self.conflict(node, str(exc)) from None
            return self.elementwise(node, x), new, fills, new_eps
        try:
            m = row_match(old_x, x, ax, "normalized channels")
            if m is not None and groups > 1:
                per_old, per_new = m.n_old // groups, m.n_new // groups
                if not np.array_equal(m.source() // per_old, np.arange(m.n_new) // per_new):
                    raise Mismatch("a copy left its group")
        except Mismatch as exc:
            raise self.conflict(node, str(exc)) from None
        new = {}
        if m is not None:
            for key, c in params.items():
                if c is not None and c.ndim > param_axis and c.shape[param_axis] == m.n_old:
                    new[key] = ar.gather(c, param_axis, m.source())
        return self.elementwise(node, x), new, m, None

    def _fill_match(self, node, old_x, x, ax):
        """The match of a norm's input that holds channels added by fill + rescale, or None."""
        try:
            if filled_slices(x, ax, self.plan.fill_start) is None:
                return None
            return match_with_fills(old_x, x, ax, "normalized channels", self.plan.fill_start)
        except Mismatch as exc:
            raise self.conflict(node, str(exc)) from None

    def uniform_mean(self, node, x: LabelTensor, old_x: LabelTensor, axes, keepdims: bool, kind: str | None = None):
        """A mean over ``axes`` that include one channel axis: unchanged under uniform replication, so its
        result has no channel structure (a fresh fixed tensor) and must stay as it was. ``kind`` (what it
        averages: "mean_x" the stream, "mean_sq" its squares, "mean_centered" its centred squares) lets
        fill + rescale correct it: over ``d'`` channels the mean of 0-filled terms is ``d / d'`` times the old
        one, so the frontend multiplies it by ``d' / d`` (:attr:`mean_scales`)."""
        ax = self._norm_axis(x, old_x, axes)
        per_row = [a for a in (x if self.analysis else old_x).vary if a != ax]
        if self.analysis:
            self.constraints.uniform(channel_rows(x, ax), self.site(node), kind if not per_row else None)
            if not per_row:
                return self.fixed_outputs(node)
        elif self.plan.fills and (fills := self._fill_match(node, old_x, x, ax)) is not None:
            fill_kind = self._stream_fill_kind(x)
            zero_terms = {"zero": ("mean_x", "mean_sq"), "mean": ("mean_centered",)}[fill_kind]
            if kind not in zero_terms + (("mean_x",) if fill_kind == "mean" else ()):
                raise self.conflict(node, f"a mean of {kind or 'unknown terms'} over a stream filled with its "
                                          f"{fill_kind} cannot be corrected")
            if not np.array_equal(fills.source()[:fills.n_old], np.arange(fills.n_old)):
                raise self.conflict(node, "filled channels are not appended after the original ones")
            if kind in zero_terms:
                self.mean_scales[self.node_key(node)] = fills.n_new / fills.n_old
            return self.old_outputs(node)
        else:
            try:
                row_match(old_x, x, ax, "averaged channels")
            except Mismatch as exc:
                raise self.conflict(node, str(exc)) from None
            if not per_row:
                return self.old_outputs(node)
        # one mean per row (per attention head): the row's first channel names it
        return self.elementwise(node, reduced_labels(x, axes, keepdims))
