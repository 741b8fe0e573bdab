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
    fills: np.ndarray | None = None  # new slices that fill + rescale appended (no old twin; content unused)

    @property
    def n_new(self) -> int:
        return len(self.content)

    @property
    def unique_old(self) -> bool:
        return all(len(o) == 1 for o in self.old_of_content)

    def source(self) -> np.ndarray:
        """One old index per new slice (the first holder of its content)."""
        first = np.array([o[0] for o in self.old_of_content], dtype=np.int64)
        src = first[self.content]
        if self.fills is not None:
            src = np.where(self.fills, -1, src)
        return src

    def is_identity(self) -> bool:
        return self.n_new == self.n_old and np.array_equal(self.source(), np.arange(self.n_old))


def _rows(labels: np.ndarray, axis: int) -> np.ndarray:
    a = np.moveaxis(np.asarray(labels), axis, 0)
    return np.ascontiguousarray(a.reshape(a.shape[0], -1))


_SAMPLE = 64


def _row_fingerprints(a: np.ndarray, axis: int):
    """A 64-bit fingerprint of every slice along ``axis``, from up to 64 of its elements at the same
    positions in every slice: equal slices have equal fingerprints (unequal ones may too; callers
    verify)."""
    if a.dtype != np.int64:
        return None
    m = np.moveaxis(a, axis, -1)
    lead = m.shape[:-1]
    n = int(np.prod(lead)) if lead else 1
    idx = np.unique(np.linspace(0, n - 1, min(n, _SAMPLE)).astype(np.int64))
    sub = np.ascontiguousarray(m[np.unravel_index(idx, lead)] if lead else m[None, :])
    u = sub.view(np.uint64)
    weights = (np.arange(1, len(idx) + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    mixed = (u ^ (u >> np.uint64(29))) * weights[:, None]
    return mixed.sum(axis=0, dtype=np.uint64)


def _match_fast(old, new, axis):
    """(first old slice equal to every old slice, first old slice equal to every new slice or -1), by
    fingerprints verified element by element; None when a fingerprint collision makes the check fail
    (the caller then compares slices as bytes)."""
    fo, fn = _row_fingerprints(old, axis), _row_fingerprints(new, axis)
    if fo is None or fn is None:
        return None
    uniq, first, inv = np.unique(fo, return_index=True, return_inverse=True)
    first_of = first[inv.ravel()]
    dup = np.flatnonzero(first_of != np.arange(len(fo)))
    if len(dup) and not (np.take(old, dup, axis=axis) == np.take(old, first_of[dup], axis=axis)).all():
        return None
    pos = np.minimum(np.searchsorted(uniq, fn), len(uniq) - 1)
    found = uniq[pos] == fn
    src = np.where(found, first[pos], -1)
    if found.all():
        ok = bool((np.take(old, src, axis=axis) == new).all())
    else:
        ok = bool((np.take(old, src[found], axis=axis) == np.compress(found, new, axis=axis)).all())
    return (first_of, src) if ok else None


def _match_bytes(orows, nrows):
    index: dict = {}
    first_of = np.empty(len(orows), np.int64)
    for i, r in enumerate(orows):
        first_of[i] = index.setdefault(r.tobytes(), i)
    src = np.array([index.get(r.tobytes(), -1) for r in nrows], dtype=np.int64)
    return first_of, src


def match_rows(old: np.ndarray, new: np.ndarray, axis: int, what: str = "input") -> RowMatch:
    """Match new slices along ``axis`` to old slices with identical labels.

    Contents are numbered in the order of their first old slice.  Slices are found by 64-bit
    fingerprints and then compared element by element; a collision falls back to comparing bytes.
    """
    old = np.asarray(old)
    new = np.asarray(new)
    axis = axis % old.ndim
    if old.ndim != new.ndim or any(o != n for i, (o, n) in enumerate(zip(old.shape, new.shape)) if i != axis):
        raise Mismatch(f"{what}: shape {tuple(new.shape)} does not extend {tuple(old.shape)} along axis {axis}")
    n_old = old.shape[axis]
    fast = _match_fast(old, new, axis) if old.size and new.size else None
    if fast is None:
        first_of, src = _match_bytes(_rows(old, axis), _rows(new, axis))
    else:
        first_of, src = fast
    # content k: the k-th distinct old slice, in order of first appearance
    is_first = first_of == np.arange(n_old)
    content_of_first = np.cumsum(is_first) - 1
    if is_first.all():
        old_of_content = [[i] for i in range(n_old)]
    else:
        groups: dict = {}
        for i, f in enumerate(first_of.tolist()):
            groups.setdefault(f, []).append(i)
        old_of_content = list(groups.values())
    n_content = len(old_of_content)
    if (src < 0).any():
        j = int(np.flatnonzero(src < 0)[0])
        raise Mismatch(f"{what}: new channel {j} along axis {axis} is not a copy of any original channel")
    content = content_of_first[src] if len(src) else np.zeros(0, np.int64)
    copies = np.bincount(content, minlength=n_content)
    if (copies == 0).any():
        lost = [old_of_content[k][0] for k in np.nonzero(copies == 0)[0][:3]]
        raise Mismatch(f"{what}: original channels {lost} along axis {axis} are missing after widening")
    return RowMatch(content, old_of_content, copies, n_old)


def same_channels(a: np.ndarray, b: np.ndarray) -> bool:
    """Operands of an elementwise op agree channel by channel (after broadcasting)."""
    from .labels import channel_of

    try:
        ca, cb = np.broadcast_arrays(channel_of(a), channel_of(b))
    except ValueError:
        return False
    return bool(np.array_equal(ca, cb))
