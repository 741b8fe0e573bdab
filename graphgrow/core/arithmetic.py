"""Net2Net weight arithmetic on numpy arrays (frontend-neutral).

* producers gather their output units by the mapping g (:func:`gather`);
* consumers gather their input columns and divide each by the number of
  copies of its content (:func:`consume`), so that the sum over copies
  reproduces the original column exactly;
* per-channel parameters (bias, BN statistics, PReLU slopes, depthwise
  filters) are gathered, never divided.

Symmetry breaking (docs/maths.md §3): ``noise_mode="exact"`` adds to the columns
of the copies of one unit perturbations that sum to zero over the copies, so
the consumer's output is unchanged; ``"paper"`` adds plain Gaussian noise.
"""

from __future__ import annotations

import numpy as np

from .provenance import RowMatch
from .recipe import along, recorded


def _no_fills(axis, index):
    index = np.asarray(index)
    if index.size and index.min() < 0:  # a filled channel (-1) reached a site that does not know fills
        raise ValueError("a channel added by fill + rescale reached a site that cannot take it")


MIN_RUN = 8  # positions in a row copied as one slice; shorter runs are gathered one by one


def take(arr: np.ndarray, index, axis: int) -> np.ndarray:
    """``np.take(arr, index, axis)`` for ``index`` >= 0; a -1 entry gives zeros (a channel the caller fills).

    The index is cut into runs: consecutive positions (the original units, whole heads) are copied as one
    slice, the scattered rest (a few random picks) gathered, -1 runs left at zero.  numpy's gather along an
    inner axis copies one item at a time, and assigning to scattered positions is as slow: both were a large
    part of writing a grown 7 B checkpoint.  Memory: the result, and a gathered part at most
    :data:`GATHER_CHUNK` elements at a time."""
    index = np.asarray(index).view(np.ndarray).astype(np.int64, copy=False).reshape(-1)
    axis %= arr.ndim
    n = index.size
    neg = index < 0
    breaks = np.flatnonzero((neg[1:] != neg[:-1]) | (~neg[1:] & ~neg[:-1] & (np.diff(index) != 1))) + 1
    starts, ends = np.concatenate(([0], breaks)), np.concatenate((breaks, [n]))
    if not neg.any() and not (ends - starts >= MIN_RUN).any():
        return np.take(arr, index, axis=axis)  # (scattered everywhere: numpy's gather, no second array)
    out = (np.zeros if neg.any() else np.empty)(_with(arr.shape, axis, n), arr.dtype)  # (zeros: calloc'd pages)
    head = (slice(None),) * axis
    gathered = None  # start of the current run of short runs: gathered as one
    for a, b in zip(starts.tolist(), ends.tolist()):
        copy = not neg[a] and b - a >= MIN_RUN
        if gathered is not None and (copy or neg[a]):
            _gather_into(out, arr, index, gathered, a, axis)
            gathered = None
        if copy:
            src = int(index[a])
            out[head + (slice(a, b),)] = arr[head + (slice(src, src + b - a),)]
        elif not neg[a] and gathered is None:
            gathered = a
    if gathered is not None:
        _gather_into(out, arr, index, gathered, n, axis)
    return out


GATHER_CHUNK = 1 << 22  # elements gathered at a time into a temporary (16 MiB of float32)


def _gather_into(out: np.ndarray, arr: np.ndarray, index: np.ndarray, a: int, b: int, axis: int) -> None:
    """``out[..., a:b, ...] = take(arr, index[a:b], axis)``, in slabs of the first axis (rows of a matrix) so
    that the temporary stays small; along the first axis, straight into ``out``."""
    idx = index[a:b]
    if idx.max() >= arr.shape[axis]:
        raise IndexError(f"index {int(idx.max())} is out of bounds for axis {axis} with size {arr.shape[axis]}")
    if axis == 0:
        np.take(arr, idx, axis=0, out=out[a:b], mode="clip")  # (a contiguous slab: no temporary)
        return
    per_row = max(1, int(np.prod(out.shape[1:])) // out.shape[axis] * (b - a))  # (elements of one gathered row)
    step = max(1, GATHER_CHUNK // per_row)
    head = (slice(None),) * (axis - 1)
    for r in range(0, arr.shape[0], step):
        rows = slice(r, min(r + step, arr.shape[0]))
        out[(rows,) + head + (slice(a, b),)] = np.take(arr[rows], idx, axis=axis)


def _with(shape, axis: int, n: int) -> tuple:
    shape = list(shape)
    shape[axis] = n
    return tuple(shape)


class ScaledMapping(np.ndarray):
    """A producer's mapping (old row of every new row) whose new rows are also multiplied by ``factors`` (the
    copies of key channels inside heads kept in number: :func:`graphgrow.core.plan.key_factors`): every gather
    of the producer's rows by it (weight, bias) applies them."""

    def __new__(cls, mapping, factors):
        obj = np.asarray(mapping, np.int64).view(cls)
        obj.factors = np.asarray(factors, np.float64)
        return obj

    def __array_finalize__(self, obj):
        self.factors = getattr(obj, "factors", None)

    def __reduce__(self):  # (pickled with its factors: recipes are copied)
        return ScaledMapping, (np.asarray(self).copy(), self.factors)


def _scaled(out: np.ndarray, axis: int, index) -> np.ndarray:
    factors = getattr(index, "factors", None)
    if factors is None or out.ndim == 0:
        return out
    return (out * _expand(factors, out.ndim, axis)).astype(out.dtype, copy=False)


@recorded(along(0, lambda a, k: len(a[1])), check=_no_fills)
def gather(arr: np.ndarray, axis: int, index: np.ndarray) -> np.ndarray:
    _no_fills(axis, index)
    return _scaled(take(arr, index, axis), axis, index)


@recorded(along(0, lambda a, k: len(a[1])))
def gather_fill(arr: np.ndarray, axis: int, mapping: np.ndarray, kind: str | None, value: float | None = None):
    """:func:`gather` where ``mapping`` may hold -1 (channels added by fill + rescale): those get ``value``,
    or 0 ("zero" streams) / the mean of the old entries along ``axis`` ("mean" streams)."""
    scaled, mapping = mapping, np.asarray(mapping).view(np.ndarray)
    fill = mapping < 0
    if not fill.any():
        return gather(arr, axis, scaled)
    out = _scaled(take(arr, np.where(fill, -1, mapping), axis), axis, scaled)  # (filled below)
    moved = np.moveaxis(out, axis, 0)
    if value is not None:
        moved[fill] = value
    elif kind == "zero":
        moved[fill] = 0
    elif kind == "mean":
        moved[fill] = np.moveaxis(arr, axis, 0).astype(np.float64).mean(axis=0).astype(arr.dtype)
    else:
        raise ValueError(f"unknown fill kind {kind!r}")
    return np.moveaxis(moved, 0, axis)


def scale_affine(arr, scale: float, offset: float = 0.0):
    """A norm's affine parameter whose effective value ``arr + offset`` (Gemma's gain ``1 + w``) is multiplied
    by ``scale``: ``(arr + offset) * scale - offset``."""
    s = np.asarray(scale, arr.dtype)
    if not offset:
        return arr * s
    return arr * s + np.asarray(offset * (scale - 1.0), arr.dtype)


def _expand(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


@recorded(along(0, lambda a, k: a[1].n_new))
def consume(
    weight: np.ndarray,
    axis: int,
    match: RowMatch,
    *,
    noise: float = 0.0,
    noise_mode: str = "exact",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """New weight whose input axis ``axis`` reads the widened channels of ``match``."""
    axis = axis % weight.ndim
    if match.fills is not None:
        # channels added by fill + rescale: zero columns (they read 0, or a mean the other columns already see)
        keep = np.flatnonzero(~match.fills)
        sub = RowMatch(match.content[keep], match.old_of_content, match.copies, match.n_old)
        if sub.unique_old and noise == 0 and weight.dtype == np.float32:
            # the fast path below, written straight into the full-width result (one array of that size, not two)
            src = np.full(match.n_new, -1, np.int64)  # (the filled columns are zeroed below)
            src[keep] = sub.source()
            divisor = np.ones(match.n_new, np.float32)
            divisor[keep] = sub.copies[sub.content]
            out = take(weight, src, axis)
            idx = [slice(None)] * out.ndim
            idx[axis] = np.flatnonzero(match.fills)
            out[tuple(idx)] = 0
            np.divide(out, _expand(divisor, weight.ndim, axis), out=out)
            return out
        part = consume(weight, axis, sub, noise=noise, noise_mode=noise_mode, rng=rng)
        shape = list(part.shape)
        shape[axis] = match.n_new
        out = np.zeros(shape, part.dtype)
        idx = [slice(None)] * len(shape)
        idx[axis] = keep
        out[tuple(idx)] = part
        return out
    if match.unique_old and noise == 0 and weight.dtype == np.float32:
        # float32 quotients directly: IEEE division is correctly rounded, and rounding the float64
        # quotient to float32 gives the same value (53 >= 2 * 24 + 2 bits: double rounding is innocuous)
        divisor = match.copies[match.content].astype(np.float32)
        out = take(weight, match.source(), axis)
        # in place: one fresh array instead of two (page faults dominate on large weights)
        return np.divide(out, _expand(divisor, weight.ndim, axis), out=out)
    w = weight.astype(np.float64)
    if match.unique_old:
        summed = np.take(w, match.source(), axis=axis)
    else:
        # a channel the graph duplicated: its columns are summed, then split
        per_content = np.stack([np.take(w, o, axis=axis).sum(axis=axis) for o in match.old_of_content], axis=axis)
        summed = np.take(per_content, match.content, axis=axis)
    divisor = match.copies[match.content].astype(np.float64)
    out = summed / _expand(divisor, w.ndim, axis)
    if noise > 0:
        out = out + symmetry_noise(out.shape, axis, match, noise * float(weight.std()), noise_mode, rng)
    return out.astype(weight.dtype)


def symmetry_noise(shape, axis, match: RowMatch, sigma: float, mode: str, rng) -> np.ndarray:
    """Noise on the columns of replicated units: zero-sum over copies in "exact" mode."""
    rng = rng or np.random.default_rng(0)
    eps = rng.normal(0.0, sigma, size=shape)
    replicated = match.copies[match.content] > 1
    eps = eps * _expand(replicated.astype(np.float64), len(shape), axis)
    if mode == "exact":
        moved = np.moveaxis(eps, axis, 0)
        sums = np.zeros((len(match.copies),) + moved.shape[1:])
        np.add.at(sums, match.content, moved)
        mean = sums / match.copies.reshape((-1,) + (1,) * (moved.ndim - 1))
        moved = moved - mean[match.content]
        eps = np.moveaxis(moved, 0, axis)
    elif mode != "paper":
        raise ValueError(f"unknown noise mode {mode!r}")
    return eps


def random_pad_rows(new: np.ndarray, axis: int, mapping: np.ndarray, rng) -> np.ndarray:
    """Baseline "random pad": units that are copies get fresh random weights instead."""
    axis = axis % new.ndim
    first = np.ones(len(mapping), dtype=bool)
    first[1:] = mapping[1:] != mapping[:-1]
    out = np.array(new, dtype=np.float64, copy=True)
    moved = np.moveaxis(out, axis, 0)
    std = float(np.std(moved[first])) if first.any() else 1.0
    moved[~first] = rng.normal(0.0, std or 1.0, size=moved[~first].shape)
    return np.moveaxis(moved, 0, axis).astype(new.dtype)


def random_pad_columns(weight: np.ndarray, axis: int, match: RowMatch, rng) -> np.ndarray:
    """Random-pad consumer: original columns kept undivided, columns of copies random."""
    axis = axis % weight.ndim
    src = np.take(weight.astype(np.float64), match.source(), axis=axis)
    first = np.zeros(match.n_new, dtype=bool)
    seen = set()
    for j, k in enumerate(match.content.tolist()):
        if k not in seen:
            seen.add(k)
            first[j] = True
    moved = np.moveaxis(src, axis, 0)
    std = float(weight.std()) or 1.0
    moved[~first] = rng.normal(0.0, std, size=moved[~first].shape)
    return np.moveaxis(moved, 0, axis).astype(weight.dtype)
