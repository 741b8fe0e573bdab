"""Provenance labels: how graphgrow learns what every op does to channels.

Every tensor of the analysed graph is shadowed by an int64 array of the same
shape, its *labels*.  A label packs three fields::

    | channel id (23 bits) | salt (16 bits) | position (24 bits) |

* the **channel id** names one channel of one :class:`ChannelSpace` (a global
  id: space base + index in the space);
* the **salt** names the op that created the content (every op that computes
  new values gets its own salt, so ``x`` and ``relu(x)`` never compare equal);
* the **position** numbers the element among the non-channel coordinates of
  the tensor where the content was created.

Data-movement ops (view, permute, cat, split, getitem, ...) are *run on the
labels* by the frontend, so the index maps they induce are learned by
execution instead of by per-op rules.  In the widened configuration a new
channel carries the label of the old channel it copies, so comparing label
rows of the old and the new configuration gives the exact gather maps that
the weight arithmetic needs, and any inconsistency is detected, never guessed.
"""

from __future__ import annotations

import sys

import numpy as np

CHAN_SHIFT = 40
SALT_SHIFT = 24
POS_MASK = (1 << SALT_SHIFT) - 1
SALT_MASK = (1 << (CHAN_SHIFT - SALT_SHIFT)) - 1
MAX_CHANNELS = 1 << 23
MAX_POSITIONS = 1 << SALT_SHIFT


class LabelOverflow(Exception):
    """The example input is too large for the label encoding."""


def channel_of(labels: np.ndarray) -> np.ndarray:
    return labels >> CHAN_SHIFT


def _salt_bits(salt: int) -> np.int64:
    return np.int64((salt & SALT_MASK) << SALT_SHIFT)


def channel_labels(shape, axis: int, chan_ids: np.ndarray, salt: int) -> np.ndarray:
    """Labels of a freshly computed tensor whose channel axis is ``axis``.

    Channel ``k`` gets ``chan_ids[k]``; the position field numbers the
    coordinates of all other axes, identically for every channel, so that a
    channel's label row depends only on its channel id and the salt.
    """
    part, grid, axis = channel_label_factors(shape, axis, chan_ids, salt)
    return part.reshape([-1 if i == axis else 1 for i in range(grid.ndim)]) | grid


def channel_label_factors(shape, axis: int, chan_ids: np.ndarray, salt: int):
    """:func:`channel_labels` as two factors ``(part, grid, axis)``: ``part[k]`` holds channel k's id
    and salt fields (position bits zero), ``grid`` (size 1 along ``axis``) the position field of every
    other coordinate; the labels are ``part`` (along ``axis``) | ``grid``, the fields never overlap."""
    shape = tuple(int(s) for s in shape)
    axis = axis % len(shape)
    if len(chan_ids) != shape[axis]:
        raise ValueError(f"{len(chan_ids)} channel ids for an axis of size {shape[axis]}")
    other = [s for i, s in enumerate(shape) if i != axis]
    npos = int(np.prod(other)) if other else 1
    if npos >= MAX_POSITIONS:
        raise LabelOverflow(f"a tensor with {npos} positions per channel exceeds the label encoding")
    grid = np.expand_dims(np.arange(npos, dtype=np.int64).reshape(other if other else ()), axis)
    part = (np.asarray(chan_ids, dtype=np.int64).ravel() << CHAN_SHIFT) | _salt_bits(salt)
    return part, grid, axis


def element_labels(shape, chan_id: int, salt: int) -> np.ndarray:
    """Labels of a tensor with no channel structure (model inputs, opaque results):
    one channel id for the whole tensor, every element a distinct position."""
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape)) if shape else 1
    if n >= MAX_POSITIONS:
        raise LabelOverflow(f"a tensor with {n} elements exceeds the label encoding")
    pos = np.arange(n, dtype=np.int64).reshape(shape)
    return (np.int64(chan_id) << CHAN_SHIFT) | _salt_bits(salt) | pos


_SALTS = np.arange(SALT_MASK + 1, dtype=np.int64)


def mix_salt(old, salt: int):
    # old * a + b (mod 2**16) with a odd, a bijection, and b odd: old * (a - 1) is even and b is not, so no
    # salt is a fixed point and an op's result never carries its input's salt (with an even b, half of
    # the op salts left two input salts unchanged)
    return (old * np.int64(40503) + np.int64((salt * 2654435761 * 2 + 1) % (SALT_MASK + 1))) & SALT_MASK


def _salt_field(labels: np.ndarray) -> np.ndarray:
    """The salt field of C-contiguous little-endian int64 labels as a writable uint16 view (bytes 3-4)."""
    return np.ndarray(labels.shape, dtype="<u2", buffer=labels, offset=SALT_SHIFT // 8, strides=labels.strides)


def resalt(labels: np.ndarray, salt: int) -> np.ndarray:
    """Same channels and positions, new content (an elementwise op ran).

    The new salt mixes the old one with the op's, so two slices that shared a
    channel id but held different content (``cat([x, f(x)])``) stay apart.
    The mix is a bijection of the 16-bit salt (40503 is odd), applied as a
    lookup table on the salt bytes of a copy (one gather instead of nine
    full-size integer passes).
    """
    out = np.array(labels, dtype=np.int64, copy=True, order="C")
    if out.size and sys.byteorder == "little" and SALT_SHIFT % 8 == 0 and CHAN_SHIFT - SALT_SHIFT == 16:
        field = _salt_field(out)
        field[...] = mix_salt(_SALTS, salt).astype(np.uint16)[field]
        return out
    keep = ~np.int64(SALT_MASK << SALT_SHIFT)
    old = (labels >> SALT_SHIFT) & SALT_MASK
    return (labels & keep) | (mix_salt(old, salt) << SALT_SHIFT)


def unique_channels(labels: np.ndarray) -> np.ndarray:
    """``np.unique(channel_of(labels))``, by counting when the ids span a range not much larger than
    the array (the usual case: one space's consecutive ids), by hashing otherwise."""
    chan = channel_of(np.asarray(labels)).ravel()
    if chan.size == 0:
        return np.zeros(0, np.int64)
    lo, hi = int(chan.min()), int(chan.max())
    if hi - lo > 4 * chan.size + 4096:
        return np.unique(chan)
    return np.flatnonzero(np.bincount(chan - lo, minlength=hi - lo + 1)) + np.int64(lo)


def varying_axes(labels: np.ndarray) -> list:
    """Axes along which the channel id changes."""
    chan = channel_of(labels)
    if chan.size == 0 or chan.min() == chan.max():  # one channel id: it varies along no axis
        return []
    out = []
    for ax in range(chan.ndim):
        if chan.shape[ax] > 1:
            first = np.take(chan, [0], axis=ax)
            if not np.array_equal(np.broadcast_to(first, chan.shape), chan):
                out.append(ax)
    return out


def channel_sequence(labels: np.ndarray, axis: int) -> np.ndarray | None:
    """Channel ids along ``axis`` if the channel id is constant along every other axis."""
    chan = channel_of(labels)
    axis = axis % chan.ndim
    idx = [0] * chan.ndim
    idx[axis] = slice(None)
    seq = chan[tuple(idx)]
    shape = [1] * chan.ndim
    shape[axis] = -1
    if not np.array_equal(np.broadcast_to(seq.reshape(shape), chan.shape), chan):
        return None
    return seq
