"""Label tensors: the compact forms of the labels that stand in for activations.

Every activation of an analysed graph is shadowed by int64 labels (see :mod:`graphgrow.core.labels`).
:class:`LabelTensor` keeps them in the smallest form that is exact -- one channel id and salt for a tensor
without channel structure, a per-channel part times a position grid for a producer's output, the same
over several channel axes after a reshape that splits a channel axis -- and builds the full array only
when an op needs it.  Both frontends (torch.fx and ONNX) use these forms; the module functions below are
the operations that keep them compact (elementwise, compare, match, reshape, order-keeping transpose,
gather and concatenation along a channel axis).  ``tests/core/test_label_tensor.py`` checks every
shortcut, and chains of them, against the full arrays.
"""

from __future__ import annotations

import numpy as np

from . import sites
from .labels import (CHAN_SHIFT, MAX_POSITIONS, SALT_MASK, SALT_SHIFT, LabelOverflow, channel_label_factors,
                     channel_of, element_labels, mix_salt, resalt, unique_channels, varying_axes)
from .provenance import Mismatch, RowMatch, match_rows


class LabelTensor:
    """Label array standing in for an activation.

    ``like``: an LabelTensor whose labels have the same channel field (an elementwise op's input): the channel
    ids and the axes they vary along, computed once, are shared with it.

    An LabelTensor made by a producer (:meth:`factored`) keeps its labels as two factors, the per-channel
    part along its channel axis and the position grid of the other axes (see
    :func:`~graphgrow.core.labels.channel_label_factors`); the full array ``a`` is built on first use.
    Elementwise ops, comparisons and row matching along the channel axis then work on the
    per-channel part alone (see the module functions below), which is exact: the position grid is
    the same for every channel and its bits never overlap the part's.

    An LabelTensor without channel structure (model inputs, results of opaque or channel-mixing ops:
    :meth:`element`) is one channel id and one salt over every element, its positions numbering
    the elements in C order (:func:`~graphgrow.core.labels.element_labels`); it is kept as those
    two numbers (``elem``), so elementwise ops and reshapes on it cost nothing.

    A reshape that splits a factored channel axis (attention heads: 3 x 768, 12 x 64) leaves labels
    factored over several channel axes (:meth:`multi`): ``mpart`` holds the channel-and-salt part over
    the axes ``cax``, the position grid numbers the other axes in C order. Only moves use this form
    directly; every other op reads the full array ``a``.
    """

    __slots__ = ("_a", "_shape", "_chans", "_vary", "_like", "part", "ax", "elem", "mpart", "cax")

    def __init__(self, a: np.ndarray, like: "LabelTensor | None" = None):
        self._blank(np.shape(a))
        self._a = np.ascontiguousarray(a)
        self._like = like if like is not None and like.shape == self._shape else None

    def _blank(self, shape):
        self._a = self._chans = self._vary = self._like = None
        self.part = self.ax = self.elem = self.mpart = self.cax = None
        self._shape = tuple(int(d) for d in shape)

    @classmethod
    def element(cls, shape, chan_id: int, salt: int) -> "LabelTensor":
        """``LabelTensor(element_labels(shape, chan_id, salt))`` (``salt``: the 16-bit salt field), built on first use."""
        self = cls.__new__(cls)
        self._blank(shape)
        n = int(np.prod(self._shape)) if self._shape else 1
        if n >= MAX_POSITIONS:
            raise LabelOverflow(f"a tensor with {n} elements exceeds the label encoding")
        self.elem = (int(chan_id), int(salt) & SALT_MASK)
        self._chans, self._vary = np.array([chan_id] if n else [], np.int64), []
        return self

    @classmethod
    def factored(cls, shape, axis: int, part: np.ndarray) -> "LabelTensor":
        """Labels ``part`` (along ``axis``) | the position grid of ``shape`` (non-empty shapes only)."""
        self = cls.__new__(cls)
        self._blank(shape)
        self.part, self.ax = part, axis
        return self

    @classmethod
    def multi(cls, shape, cax, mpart: np.ndarray) -> "LabelTensor":
        """Labels ``mpart`` (over the axes ``cax``, in order) | the position grid of the other axes of
        ``shape``; one channel axis gives :meth:`factored`, none :meth:`element`."""
        shape, cax = tuple(int(d) for d in shape), tuple(int(c) for c in cax)
        if len(cax) == 1:
            return cls.factored(shape, cax[0], np.ascontiguousarray(mpart).reshape(-1))
        if len(cax) == 0:
            v = int(np.asarray(mpart).reshape(-1)[0])
            return cls.element(shape, v >> CHAN_SHIFT, (v >> SALT_SHIFT) & SALT_MASK)
        self = cls.__new__(cls)
        self._blank(shape)
        self.mpart, self.cax = np.ascontiguousarray(mpart), cax
        return self

    def factors(self):
        """``(channel axes, their part)`` of a factored or multi-factored LabelTensor, else None."""
        if self.part is not None:
            return (self.ax,), self.part
        if self.mpart is not None:
            return self.cax, self.mpart
        return None

    def bpart(self) -> np.ndarray:
        """The part broadcast to the tensor's rank (size 1 on the position axes)."""
        cax, part = self.factors()
        return part.reshape([self._shape[i] if i in cax else 1 for i in range(len(self._shape))])

    @classmethod
    def channels(cls, shape, axis: int, chan_ids, salt: int) -> "LabelTensor":
        """``LabelTensor(channel_labels(shape, axis, chan_ids, salt))``, factored when the tensor is not empty."""
        part, grid, axis = channel_label_factors(shape, axis, chan_ids, salt)
        if grid.size == 0 or len(part) == 0:
            return cls(part.reshape([-1 if i == axis else 1 for i in range(grid.ndim)]) | grid)
        return cls.factored(shape, axis, part)

    @property
    def a(self) -> np.ndarray:
        if self._a is None and self.elem is not None:
            self._a = element_labels(self._shape, *self.elem)
        elif self._a is None:  # the part | the C-order position grid of the other axes
            cax = self.factors()[0]
            other = [d for i, d in enumerate(self._shape) if i not in cax]
            grid = np.arange(int(np.prod(other)) if other else 1, dtype=np.int64).reshape(
                [1 if i in cax else d for i, d in enumerate(self._shape)])
            self._a = np.ascontiguousarray(self.bpart() | grid)
        return self._a

    @property
    def shape(self):
        return self._shape

    @property
    def ndim(self) -> int:
        return len(self._shape)

    def grid_key(self):
        """Shape of the position grid (the shape with the channel axis left out) and that axis."""
        return tuple(d for i, d in enumerate(self._shape) if i != self.ax), self.ax

    def _shared(self, slot, compute):
        node, chain = self, []
        while getattr(node, slot) is None and node._like is not None:
            chain.append(node)
            node = node._like
        if getattr(node, slot) is None:
            setattr(node, slot, compute(node))
        for n in chain:
            setattr(n, slot, getattr(node, slot))
        return getattr(self, slot)

    @property
    def chans(self) -> np.ndarray:
        """Sorted distinct channel ids (``np.unique(channel_of(a))``)."""
        return self._shared("_chans", lambda n: unique_channels(n.factors()[1] if n.factors() else n.a))

    @property
    def vary(self) -> list:
        """Axes along which the channel id changes (``varying_axes(a)``)."""
        def compute(n):
            f = n.factors()
            if f is not None:  # the part's own axes are the channel axes, in order
                return [f[0][k] for k in varying_axes(f[1])]
            return [] if n._chans is not None and len(n._chans) <= 1 else varying_axes(n.a)
        return self._shared("_vary", compute)


def factored_alike(*lns) -> bool:
    """All factored along one axis with one position grid (so labels compare as their parts do)."""
    return all(v.part is not None for v in lns) and len({v.grid_key() for v in lns}) == 1


def same_labels(o, v) -> bool:
    """``o.a == v.a`` everywhere (same shape)."""
    if not isinstance(o, LabelTensor) or not isinstance(v, LabelTensor) or o.shape != v.shape:
        return False
    if o.elem is not None and v.elem is not None:
        return o.elem == v.elem
    if o.mpart is not None and v.mpart is not None and o.cax == v.cax:
        return bool(np.array_equal(o.mpart, v.mpart))
    if factored_alike(o, v):
        return bool(np.array_equal(o.part, v.part))
    return bool(np.array_equal(o.a, v.a))


def match_labels(old: "LabelTensor", new: "LabelTensor", axis: int, what: str = "input") -> RowMatch:
    """``match_rows(old.a, new.a, axis, what)``; on the parts when both are factored along ``axis``."""
    if factored_alike(old, new) and axis % old.ndim == old.ax:
        try:
            return match_rows(old.part, new.part, 0, what)
        except Mismatch:
            pass  # the same question on the full arrays, for the same message
    return match_rows(old.a, new.a, axis, what)


def resalt_labels(x: "LabelTensor", salt: int) -> "LabelTensor":
    """``LabelTensor(resalt(x.a, salt))`` (the salt lives in the factored part, or in ``elem``)."""
    if x.elem is not None:
        return LabelTensor.element(x.shape, x.elem[0], int(mix_salt(np.int64(x.elem[1]), salt)))
    f = x.factors()
    if f is not None:
        return LabelTensor.multi(x.shape, f[0], resalt(f[1], salt))
    return LabelTensor(resalt(x.a, salt), like=x)


def label_channel_ids(x: "LabelTensor", axis: int = 1):
    """``sites.channel_ids(x.a, axis)``."""
    if x.part is not None and x.ndim >= 2 and axis % x.ndim == x.ax:
        return sites.channel_ids(x.part.reshape(1, -1), 1)
    return sites.channel_ids(x.a, axis)


def reduced_labels(x: LabelTensor, axes, keepdims: bool) -> LabelTensor:
    """The labels of a reduction of ``x`` over ``axes`` (non-negative) that keeps its other channels: each result
    element carries the label of the first element it reduces."""
    out = x.a
    for ax in sorted(axes, reverse=True):
        out = np.take(out, [0], axis=ax)
        if not keepdims:
            out = np.squeeze(out, axis=ax)
    return LabelTensor(out)


def keeps_order(x: LabelTensor, perm: list) -> bool:
    """A transpose (``perm``: non-negative axes) of element or factored labels that moves only axes of size 1,
    and the channel axes of factored labels, keeps the order of the elements (of the other coordinates, for
    factored labels): it is a reshape for the labels."""
    cax = x.factors()[0] if x.elem is None else ()
    kept = [p for p in perm if x.shape[p] != 1 and p not in cax]
    return kept == sorted(kept)


def reshape_blocks(src, dst):
    """The finest pairing of ``src`` and ``dst`` axes (sizes > 1) into consecutive blocks of equal size
    that a C-order reshape maps onto each other; None for shapes with a zero."""
    if 0 in src or 0 in dst:
        return None
    si = [k for k, d in enumerate(src) if d != 1]
    dj = [k for k, d in enumerate(dst) if d != 1]
    i = j = 0
    out = []
    try:
        while i < len(si) or j < len(dj):
            a, b, pa, pb = [si[i]], [dj[j]], src[si[i]], dst[dj[j]]
            i, j = i + 1, j + 1
            while pa != pb:
                if pa < pb:
                    a.append(si[i])
                    pa, i = pa * src[si[i]], i + 1
                else:
                    b.append(dj[j])
                    pb, j = pb * dst[dj[j]], j + 1
            out.append((a, b))
    except IndexError:
        return None
    return out


def reshaped(x: LabelTensor, shape, perm=None) -> "LabelTensor | None":
    """``x`` reshaped (C order) to ``shape`` without building its labels: element labels always; factored
    labels when no block of the reshape mixes channel axes with position axes (the parts reshape within
    the channel blocks, the position grid within the others, so both keep their C order); else None.
    ``perm`` (non-negative axes): a transpose that :func:`keeps_order` (the channel axes go where it puts
    them)."""
    shape = tuple(int(d) for d in shape)
    if x.elem is not None:
        return LabelTensor.element(shape, *x.elem)
    cax, part = x.factors()
    part = part.reshape([x.shape[c] for c in cax])
    if perm is not None:
        new_cax = [o for o in range(len(perm)) if perm[o] in cax]
        return LabelTensor.multi(shape, new_cax, np.transpose(part, [cax.index(perm[o]) for o in new_cax]))
    blocks = reshape_blocks(x.shape, shape)
    if blocks is None:
        return None
    new_cax = []
    for a, b in blocks:
        kinds = {k in cax for k in a}
        if len(kinds) > 1:
            return None
        if kinds == {True}:
            new_cax += b
    return LabelTensor.multi(shape, new_cax, part.reshape([shape[c] for c in new_cax]))


def gathered(x: LabelTensor, axis: int, index, shape) -> "LabelTensor | None":
    """Gather of constant ``index`` along channel axis ``axis`` of factored labels: the part is gathered,
    the position grid of the other axes is unchanged; None when ``axis`` holds positions."""
    cax, part = x.factors()
    index = np.asarray(index)
    n = x.shape[axis]
    if axis not in cax or index.dtype.kind not in "iu" or index.size == 0 or index.min() < -n or index.max() >= n:
        return None
    part = part.reshape([x.shape[c] for c in cax])
    k, r = cax.index(axis), index.ndim
    new_cax = [c for c in cax if c < axis] + list(range(axis, axis + r)) + [c + r - 1 for c in cax if c > axis]
    return LabelTensor.multi(shape, new_cax, np.take(part, index.astype(np.int64), axis=k))


def split_axis_ties(x: LabelTensor, out: LabelTensor) -> list:
    """A reshape that splits one channel axis into blocks: the blocks' channels, to tie positionwise
    (none when the output varies along no more axes than the input)."""
    va = out.vary
    if len(va) < 2 or len(x.vary) >= len(va):
        return []
    return sites.block_ties(channel_of(out.bpart() if out.factors() is not None else out.a), va)


def concatenated(xs: list, axis: int) -> "LabelTensor | None":
    """``np.concatenate([x.a for x in xs], axis)`` without building the labels, when every piece is factored
    along ``axis`` over one position grid (a concatenation of channel spaces: DenseNet, Inception); else
    None. The parts are concatenated; the position grid is the pieces' own."""
    if not xs or not all(isinstance(x, LabelTensor) and x.part is not None for x in xs):
        return None
    axis = axis % xs[0].ndim
    if any(x.ax != axis for x in xs) or len({x.grid_key() for x in xs}) != 1:
        return None
    shape = list(xs[0].shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    return LabelTensor.factored(shape, axis, np.concatenate([x.part for x in xs]))
