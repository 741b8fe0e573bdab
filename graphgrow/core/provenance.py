"""Matching label rows of the widened configuration against the original.

At every site that reads channels (a consumer's input, a carried per-channel
parameter, a unify of two operands) the frontend has the site's labels in
the original graph and in the widened graph.  :func:`match_rows` tells, for
every new channel slice, which old slice holds the same content; any new
slice without an old twin, or an old slice no longer present, is a
:class:`Mismatch` and the rewrite is refused there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class Mismatch(Exception):
    """The widened configuration does not reproduce the original content."""


@dataclass
class RowMatch:
    """Content classes of the new slices along one axis.

    ``content[j]``: content class of new slice j; ``old_of_content[k]``: the
    old slice indices holding content k (several when the graph duplicates a
    channel, as in ``cat([x, x])``); ``copies[k]``: how many new slices hold
    content k.
    """

    content: np.ndarray
    old_of_content: list
    copies: np.ndarray
    n_old: int

    @property
    def n_new(self) -> int:
        return len(self.content)

    @property
    def unique_old(self) -> bool:
        return all(len(o) == 1 for o in self.old_of_content)

    def source(self) -> np.ndarray:
        """One old index per new slice (the first holder of its content)."""
        first = np.array([o[0] for o in self.old_of_content], dtype=np.int64)
        return first[self.content]

    def is_identity(self) -> bool:
        return self.n_new == self.n_old and np.array_equal(self.source(), np.arange(self.n_old))


def _rows(labels: np.ndarray, axis: int) -> np.ndarray:
    a = np.moveaxis(np.asarray(labels), axis, 0)
    return np.ascontiguousarray(a.reshape(a.shape[0], -1))


def match_rows(old: np.ndarray, new: np.ndarray, axis: int, what: str = "input") -> RowMatch:
    """Match new slices along ``axis`` to old slices with identical labels."""
    old = np.asarray(old)
    new = np.asarray(new)
    axis = axis % old.ndim
    if old.ndim != new.ndim or any(o != n for i, (o, n) in enumerate(zip(old.shape, new.shape)) if i != axis):
        raise Mismatch(f"{what}: shape {tuple(new.shape)} does not extend {tuple(old.shape)} along axis {axis}")
    orows, nrows = _rows(old, axis), _rows(new, axis)
    index: dict = {}
    old_of_content: list = []
    for i, r in enumerate(orows):
        key = r.tobytes()
        k = index.get(key)
        if k is None:
            index[key] = len(old_of_content)
            old_of_content.append([i])
        else:
            old_of_content[k].append(i)
    content = np.empty(len(nrows), dtype=np.int64)
    for j, r in enumerate(nrows):
        k = index.get(r.tobytes())
        if k is None:
            raise Mismatch(f"{what}: new channel {j} along axis {axis} is not a copy of any original channel")
        content[j] = k
    copies = np.bincount(content, minlength=len(old_of_content))
    if (copies == 0).any():
        lost = [old_of_content[k][0] for k in np.nonzero(copies == 0)[0][:3]]
        raise Mismatch(f"{what}: original channels {lost} along axis {axis} are missing after widening")
    return RowMatch(content, old_of_content, copies, len(orows))


def same_channels(a: np.ndarray, b: np.ndarray) -> bool:
    """Operands of an elementwise op agree channel by channel (after broadcasting)."""
    from .labels import channel_of

    try:
        ca, cb = np.broadcast_arrays(channel_of(a), channel_of(b))
    except ValueError:
        return False
    return bool(np.array_equal(ca, cb))
