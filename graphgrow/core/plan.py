"""Widening plans: how many copies each old channel gets.

The analysis of a graph yields *ties*: pairs of channels that must be
replicated the same number of times (operands of an add share one mapping;
the groups of a grouped conv, the chunks of a split and the blocks of a
channel shuffle must keep equal widths).  Tied channels form classes
(connected components of the tie graph).  A plan assigns every class
a replication count >= 1; classes touching a frozen channel keep count 1.

Layout: in every widened space, each old channel is followed by its copies
(``g = repeat(arange(n), replication_counts)``).  This layout commutes with
concatenation and with splitting at channel boundaries, so the same rule
serves concat, split, residual add and grouped convolutions; whatever the
data-movement ops do to it is checked, not assumed, by the frontend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .spaces import SpaceTable


def target_width(old: int, factor: float, divisor: int = 1) -> int:
    """round(old * factor), at least old, raised to a multiple of divisor."""
    new = max(old, int(round(old * factor)))
    if divisor > 1:
        new = int(math.ceil(new / divisor) * divisor)
    return new


class GrowthConstraints:
    """Ties and freezes collected by a frontend while it analyses a graph."""

    def __init__(self, table: SpaceTable):
        self.table = table
        self._tie_edges: list = []
        self.frozen = np.zeros(0, dtype=bool)

    def _grow(self):
        if len(self.frozen) < self.table.num_chans:
            self.frozen = np.concatenate([self.frozen, np.zeros(self.table.num_chans - len(self.frozen), bool)])

    def tie(self, a_chans, b_chans) -> None:
        """Tie channels elementwise (arrays broadcast against each other)."""
        a, b = np.broadcast_arrays(np.asarray(a_chans, np.int64), np.asarray(b_chans, np.int64))
        a, b = a.ravel(), b.ravel()
        keep = a != b
        if not keep.any():
            return
        # one int64 per pair (channel ids < 2**23): a 1-d unique is far cheaper than unique rows
        codes = np.unique((a[keep] << 24) | b[keep])
        self._tie_edges.append(np.stack([codes >> 24, codes & ((1 << 24) - 1)], axis=1))

    def tie_blocks(self, chans, blocks: int) -> None:
        """Split a channel sequence into ``blocks`` equal blocks and tie them positionwise."""
        chans = np.asarray(chans, np.int64).reshape(blocks, -1)
        for k in range(1, blocks):
            self.tie(chans[0], chans[k])

    def freeze(self, chans, reason: str) -> None:
        self._grow()
        chans = np.unique(np.asarray(chans, np.int64).ravel())
        if len(chans) == 0:
            return
        self.frozen[chans] = True
        for sp in self.table.spaces_of(chans):
            sp.freeze(reason)

    def freeze_space(self, space, reason: str) -> None:
        self.freeze(space.chan_ids, reason)

    def classes(self) -> np.ndarray:
        """Class id of every channel: connected components of the tie graph (scipy.sparse.csgraph, in C;
        networkx's Python traversal took 2.2 s of an 11 s ONNX widening of vit_b_16, 85k channels), numbered
        in the order of each class's smallest channel id."""
        n = self.table.num_chans
        edges = np.concatenate(self._tie_edges) if self._tie_edges else np.zeros((0, 2), np.int64)
        graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
        k, labels = connected_components(graph, directed=False)
        smallest = np.full(k, n, dtype=np.int64)
        np.minimum.at(smallest, labels, np.arange(n))
        rank = np.empty(k, dtype=np.int64)
        rank[np.argsort(smallest)] = np.arange(k)
        return rank[labels]


@dataclass
class WidenPlan:
    """Replication count of every channel of every space, and the mappings it implies."""

    table: SpaceTable
    counts: np.ndarray  # per global channel id, >= 1
    classes: np.ndarray | None = None  # tie class of every channel (None: no ties)

    def tied_spaces(self, space) -> list:
        """Other spaces sharing a tie class with ``space``."""
        if self.classes is None:
            return []
        mine = np.unique(self.classes[space.chan_ids])
        others = np.nonzero(np.isin(self.classes, mine))[0]
        return [s for s in self.table.spaces_of(others) if s.id != space.id]

    def replication_counts(self, space) -> np.ndarray:
        return self.counts[space.base : space.base + space.size]

    def new_size(self, space) -> int:
        return int(self.replication_counts(space).sum())

    def mapping(self, space) -> np.ndarray:
        """g: new index -> old index (each old channel followed by its copies)."""
        return np.repeat(np.arange(space.size, dtype=np.int64), self.replication_counts(space))

    def new_chan_ids(self, space) -> np.ndarray:
        """Labels of the widened space: each new channel carries its source's id."""
        return space.base + self.mapping(space)

    @classmethod
    def identity(cls, table: SpaceTable) -> "WidenPlan":
        return cls(table, np.ones(table.num_chans, dtype=np.int64))


def solve_plan(constraints: GrowthConstraints, targets: dict, seed: int = 0) -> WidenPlan:
    """Assign replication counts so each space reaches (about) its target width.

    ``targets`` maps space id -> desired new width.  Extra copies go to old
    channels drawn uniformly at random (Net2Net's random mapping g), one tie
    class at a time; classes touching a frozen channel keep one copy.
    Widths can overshoot a target only when ties force several channels to
    grow together.
    """
    table = constraints.table
    constraints._grow()
    rng = np.random.default_rng(seed)
    cls = constraints.classes()
    ncls = int(cls.max()) + 1 if len(cls) else 0
    class_frozen = np.zeros(ncls, dtype=bool)
    np.logical_or.at(class_frozen, cls, constraints.frozen)
    space_of = table.space_ids_of(np.arange(table.num_chans))
    # per class: spaces it touches and how many of its channels lie in each
    class_mult: list = [None] * ncls
    nsp = len(table.spaces) + 1
    codes, code_counts = np.unique(cls * nsp + space_of, return_counts=True)
    code_bounds = np.searchsorted(codes // nsp, np.arange(ncls + 1))
    code_sids, code_counts = (codes % nsp).tolist(), code_counts.tolist()

    def mult(k):  # (space id, channels of class k in it), by space id
        if class_mult[k] is None:
            lo, hi = code_bounds[k], code_bounds[k + 1]
            class_mult[k] = list(zip(code_sids[lo:hi], code_counts[lo:hi]))
        return class_mult[k]

    # (Python ints and lists in the draw loop: one draw per new channel, numpy scalars cost more than the draw)
    counts_cls = [1] * ncls
    width = [sp.size for sp in table.spaces]
    for sid in sorted(targets):
        sp = table.spaces[sid]
        target = int(targets[sid])
        chans = sp.chan_ids
        free_cls = cls[chans[~class_frozen[cls[chans]]]].tolist()  # class of each free channel
        n_free = len(free_cls)
        if n_free == 0:
            continue
        guard = 0
        while width[sid] < target and guard < 4 * target + 16:
            guard += 1
            k = free_cls[rng.integers(n_free)]
            step = dict(mult(k))[sid]
            # ties can make one draw add several channels: stop at the nearest width
            if target - width[sid] < step / 2:
                break
            counts_cls[k] += 1
            for s2, m in mult(k):
                width[s2] += m
    return WidenPlan(table, np.asarray(counts_cls, dtype=np.int64)[cls], cls)
