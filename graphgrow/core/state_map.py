"""Which teacher entry each grown parameter entry copies, read off probes; the maps optimizer state follows.

A growth (widen by replication, fill + rescale, block copy, stacking, upcycling) computes every grown parameter
entry as ``coef * teacher[source]`` plus a constant (noise, identity blocks, random pads), or, for a few entries
(fill + rescale's mean-filled channels), from several teacher entries.  Running the same growth on *probe*
parameters reads that map without knowing how the growth computed it (docs/maths.md §10):

* all zeros: the constant ``c``;
* all ones: ``coef`` (for single-source entries);
* entry ``i`` = ``i + 1`` (a global index over every teacher parameter): ``coef * (source + 1)``;
* entry ``i`` = ``perm[i] + 1`` for a random permutation: ``coef * (perm[source] + 1)``; an entry computed from
  several teacher entries (a mean) fails to read as one index under both numberings and is "unmapped".

Optimizer state then follows one of two maps (:func:`state_of`):

* ``"copy"``: the weights' own map, ``state'[j] = coef[j] * state[source[j]]``;
* ``"dual"``: the map the gradient obeys at the growth point.  With ``w' = M w`` (``M`` the monomial map
  above), preserving the function gives ``M^T g' = g``; where the live copies of an entry see equal inputs
  (Net2Net replication) ``g'`` lies in ``M``'s range, so ``g' = M (M^T M)^{-1} g``: ``g'[j] = coef[j] /
  G[source[j]] * g[source[j]]`` with ``G[i]`` the sum of ``coef^2`` over the live entries copying ``i``.  A copy
  of a unit made ``k`` times gets ``g / k``; a consumer column divided by ``k`` gets ``g``.  First moments map
  like ``g``, second moments like ``g^2`` (the square of the factor).

Entries without a single source (filled channels, zeroed projections, new blocks) start at zero; a parameter
without any mapped entry gets no state (the optimizer starts it fresh).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROBES = ("zero", "ones", "index", "permuted")


@dataclass
class EntryMap:
    """One grown parameter: ``source[j]`` (global teacher entry, -1 none) and ``coef[j]`` of its flat entries."""

    shape: tuple
    source: np.ndarray
    coef: np.ndarray

    @property
    def mapped(self) -> np.ndarray:
        return self.source >= 0

    def sources(self) -> np.ndarray:
        return self.source[self.mapped]


def probe_values(n: int, seed: int = 0) -> tuple:
    """(index probe, permuted probe, permutation) over ``n`` teacher entries, float64 (exact below 2**53)."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.arange(1, n + 1, dtype=np.float64), (perm + 1).astype(np.float64), perm


def read_probes(zero: np.ndarray, ones: np.ndarray, index: np.ndarray, permuted: np.ndarray,
                perm: np.ndarray) -> EntryMap:
    """The entry map of one grown parameter from its value under the four probes (any shape, float64)."""
    shape = tuple(zero.shape)
    zero, ones, index, permuted = (np.asarray(a, np.float64).reshape(-1) for a in (zero, ones, index, permuted))
    coef = ones - zero
    live = np.abs(coef) > 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(live, (index - zero) / np.where(live, coef, 1), 0.0)
        second = np.where(live, (permuted - zero) / np.where(live, coef, 1), 0.0)
    src, src2 = np.rint(first), np.rint(second)
    n = len(perm)
    ok = live & (np.abs(first - src) < 1e-6) & (np.abs(second - src2) < 1e-6) & (src >= 1) & (src <= n)
    src = np.where(ok, src - 1, -1).astype(np.int64)
    ok &= perm[np.clip(src, 0, n - 1)] == src2 - 1  # the same teacher entry under both numberings
    return EntryMap(shape, np.where(ok, src, -1), np.where(ok, coef, 0.0))


def gram(maps: dict, n: int) -> np.ndarray:
    """``G[i]``: the sum of ``coef^2`` over the entries of ``maps`` copying teacher entry ``i``."""
    g = np.zeros(n, np.float64)
    for m in maps.values():
        np.add.at(g, m.sources(), m.coef[m.mapped] ** 2)
    return g


def factors(m: EntryMap, mode: str, g: np.ndarray | None) -> np.ndarray:
    """Per mapped entry, the factor a gradient-like quantity of its source is multiplied by."""
    if mode == "copy":
        return m.coef[m.mapped]
    if mode == "dual":
        return m.coef[m.mapped] / g[m.sources()]
    raise ValueError(f"unknown state mode {mode!r}")


def state_of(m: EntryMap, teacher_state: np.ndarray, mode: str, order: int, g: np.ndarray | None = None) -> np.ndarray:
    """One state tensor of the grown parameter from the teacher's state, flat over every teacher entry.

    ``order`` 1: gradient-like (first moments, momentum); ``"abs"``: like ``|g|`` (Adamax's infinity norm);
    2: like ``g^2`` (second moments, Adagrad's sums).  Under ``"dual"`` these take the factor, its absolute
    value, its square; under ``"copy"`` every one takes the weights' coefficient as it is."""
    out = np.zeros(int(np.prod(m.shape, dtype=np.int64)), np.float64)
    f = factors(m, mode, g)
    if mode == "dual" and order == 2:
        f = f * f
    elif mode == "dual" and order == "abs":
        f = np.abs(f)
    out[m.mapped] = f * teacher_state[m.sources()]
    return out.reshape(m.shape)
