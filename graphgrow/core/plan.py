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
from dataclasses import dataclass, field

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


def _edges(a_chans, b_chans):
    a, b = np.broadcast_arrays(np.asarray(a_chans, np.int64), np.asarray(b_chans, np.int64))
    a, b = a.ravel(), b.ravel()
    keep = a != b
    if not keep.any():
        return None
    # one int64 per pair (channel ids < 2**23): a 1-d unique is far cheaper than unique rows
    codes = np.unique((a[keep] << 24) | b[keep])
    return np.stack([codes >> 24, codes & ((1 << 24) - 1)], axis=1)


class GrowthConstraints:
    """Ties and freezes collected by a frontend while it analyses a graph.

    Besides plain ties it records two structures of docs/maths.md §5:

    * **uniform** channels (read by a norm or a mean across them): every channel of their class gets the
      same number of copies, so a class of them grows only by whole integer factors;
    * **units** (attention heads): a space cut into consecutive units of ``u`` channels grows by copying
      whole units; the plan lays each unit's copies out after it (:meth:`WidenPlan.mapping`).  The
      positionwise ties a reshape put between the blocks of a unit space (:meth:`tie_split`) are then
      dropped: heads copy as units instead of widening inside.
    """

    def __init__(self, table: SpaceTable):
        self.table = table
        self._tie_edges: list = []
        self._split_edges: list = []
        self.frozen = np.zeros(0, dtype=bool)
        self.uniform_mask = np.zeros(0, dtype=bool)
        self.uniform_sites: dict = {}  # space id -> the first op that needs it uniform
        self.unit_size: dict = {}  # space id -> channels per unit
        self.heads_of: dict = {}  # space id -> how many heads (of the attention reading it) it holds
        self.head_groups: dict = {}  # space id -> query heads per key/value head (GQA) of its attention
        self.fill_kinds: dict = {}  # space id -> the norm kinds reading it (for fill + rescale)
        self.no_fill: dict = {}  # space id -> why fill + rescale cannot serve it
        self.width_links: list = []  # (stream space id, unit space id, ratio): new stream width = ratio x unit width
        self.split_blocks: dict = {}  # space id -> block sizes a reshape split it into (its inner axis)
        self.outer_blocks: dict = {}  # space id -> larger blocks of a reshape over 3+ axes (inner axes together)
        self.fixed_blocks: dict = {}  # space id -> a block count the family keeps (CodeGen's mp_num)
        self.block_layouts: dict = {}  # space id -> (blocks, pieces): laid out (blocks, pieces, local), heads
        # running over (blocks, local) in each piece (WidenPlan.mapping)
        self.head_firsts: dict = {}  # "query" / "key" -> first channel ids of the heads attentions read
        self._keyed_edges: dict = {}  # key -> ties that a later finding may drop (a head cut, scores <-> heads)
        self.inner_heads: dict = {}  # space id -> why its heads keep their number and grow head_dim (ALiBi)
        self.attn_rows: dict = {}  # scores space id -> (query rows, key rows): channel ids, heads x head_dim
        self.scaled_keys: list = []  # (key rows, whether the scores' scale follows head_dim): see key_factors
        self._laid_out: set = set()
        self._outer_laid: dict = {}  # space id -> the outer block chosen (the ties it adds hide the test's result)
        self.param_spaces: set = set()  # spaces of bare parameters (a norm's gain written out, a layer scale)
        self._per_head: dict | None = None  # param space id -> the unit space along whose head_dim it lies
        self._param_layout: dict = {}  # param space id -> the unit space it is tied to channel for channel

    def _grow(self):
        n = self.table.num_chans
        if len(self.frozen) < n:
            self.frozen = np.concatenate([self.frozen, np.zeros(n - len(self.frozen), bool)])
        if len(self.uniform_mask) < n:
            self.uniform_mask = np.concatenate([self.uniform_mask, np.zeros(n - len(self.uniform_mask), bool)])

    def tie(self, a_chans, b_chans, key=None) -> None:
        """Tie channels elementwise (arrays broadcast against each other); ties under ``key`` can be dropped
        (:meth:`untie`)."""
        e = _edges(a_chans, b_chans)
        if e is not None:
            (self._tie_edges if key is None else self._keyed_edges.setdefault(key, [])).append(e)

    def untie(self, key) -> None:
        self._keyed_edges.pop(key, None)

    def keep_heads(self, space_ids, reason: str) -> None:
        """The heads of these spaces keep their number (ALiBi's per-head slopes) and grow inside: their cut
        into units and its ties are dropped, so each head_dim channel is copied on its own, and the reshape
        that splits them into heads ties every head to the first position by position (one new head_dim)."""
        for sid in space_ids:
            self.unit_size.pop(sid, None)
            self.untie(("unit", sid))
            self.inner_heads.setdefault(sid, reason)

    def tie_split(self, a_chans, b_chans) -> None:
        """A tie from a reshape that splits a channel axis into blocks: dropped if the space is cut into units."""
        e = _edges(a_chans, b_chans)
        if e is not None:
            self._split_edges.append(e)
        a = np.asarray(a_chans, np.int64).ravel()
        for sp in self.table.spaces_of(a):
            self.split_blocks.setdefault(sp.id, set()).add(len(a))

    def split_outer(self, chans, block: int) -> None:
        """A reshape splitting ``chans`` over three or more axes also cuts them into blocks of ``block`` (the
        product of every axis but the outermost: Falcon's ``(groups, queries + 2, head_dim)``)."""
        for sp in self.table.spaces_of(np.asarray(chans, np.int64).ravel()):
            self.outer_blocks.setdefault(sp.id, set()).add(int(block))

    def _per_head_blocks(self, sid: int, u: int, b: int, out: dict) -> None:
        """Bare parameters holding one value per head of a space laid out in blocks of heads (GPT-OSS's attention
        sinks, a per-head bias table's rows) are laid out in the same blocks, so every copy keeps its head."""
        if not self.param_spaces:
            return
        cls = self.classes()
        heads = cls[self.table.spaces[sid].chan_ids[::u]]
        for pid in self.param_spaces:
            sp = self.table.spaces[pid]
            if pid not in out and sp.size == len(heads) and np.array_equal(cls[sp.chan_ids], heads):
                out[pid] = b // u

    def mark_heads(self, first_chans, role: str) -> None:
        """The first channel of each query (``role="query"``) or key head an attention reads, to count the
        heads of the widened model (:meth:`WidenPlan.head_count`)."""
        self.head_firsts.setdefault(role, set()).update(np.asarray(first_chans, np.int64).ravel().tolist())

    def head_dim_params(self) -> dict:
        """Bare parameters lying along the head_dim of a space cut into heads (Qwen3's q_norm / k_norm gain:
        ``[head_dim]``, broadcast over the heads): param space id -> that unit space's id. Copying whole heads
        keeps every (gain channel, head channel) pair an original one, so such a parameter keeps its width
        and its ties to the heads are dropped (they would otherwise copy the gain with the heads)."""
        if self._per_head is None:
            self._per_head, self._param_layout = {}, {}
            if self.param_spaces and self.unit_size:
                for e in self._tie_edges:
                    sid = self.table.space_ids_of(e.ravel()).reshape(e.shape)
                    for p_col in (0, 1):
                        for pid in set(sid[:, p_col].tolist()) & self.param_spaces:
                            rows = sid[:, p_col] == pid
                            others = set(sid[rows, 1 - p_col].tolist())
                            for uid in others & set(self.unit_size):
                                u, size = self.unit_size[uid], self.table.spaces[pid].size
                                sel = rows & (sid[:, 1 - p_col] == uid)
                                p_off = e[sel, p_col] - self.table.spaces[pid].base
                                u_off = e[sel, 1 - p_col] - self.table.spaces[uid].base
                                if size == u and size < self.table.spaces[uid].size and \
                                        np.array_equal(u_off % u, p_off):
                                    self._per_head[pid] = uid
                                elif size == self.table.spaces[uid].size and np.array_equal(u_off, p_off):
                                    # (OLMo2's q_norm gain over all heads' channels: laid out as the heads)
                                    self._param_layout[pid] = uid
        return self._per_head

    def layout_units(self) -> dict:
        """space id -> channels copied together: a unit space's head size, or the block a reshape splits it
        into when that block holds several whole heads (GPT-NeoX's fused ``[q_h | k_h | v_h]`` per head: the
        heads of one block are tied by the attention, and copying the block keeps the reshape's blocks copies
        of old ones). The heads of one block are tied here so they always take the same copy count."""
        out = dict(self.unit_size)
        cls = None
        for sid, u in self.unit_size.items():
            size = self.table.spaces[sid].size
            blocks = [b for b in self.split_blocks.get(sid, ()) if b > u and b % u == 0 and size % b == 0]
            if len(blocks) != 1 and sid in self._outer_laid:
                blocks = [self._outer_laid[sid]]
            elif len(blocks) != 1:
                # a block of several axes (Falcon's kv group: its query heads, key head and value head) is copied
                # whole only where the attention already ties all its heads together (a [q | k | v] split over
                # (3, heads, head_dim) ties none: its heads copy one by one)
                outer = sorted((b for b in self.outer_blocks.get(sid, ()) if b > u and b % u == 0 and size % b == 0),
                               reverse=True)
                if outer and cls is None:
                    cls = self.classes()
                heads = self.table.spaces[sid].chan_ids[::u]
                blocks = [b for b in outer if all(len(set(cls[g].tolist())) == 1 for g in heads.reshape(-1, b // u))]
                blocks = blocks[:1]
                if blocks:
                    self._outer_laid[sid] = blocks[0]
            if len(blocks) != 1:
                continue
            b = blocks[0]
            if sid not in self._laid_out:
                chans = self.table.spaces[sid].chan_ids.reshape(-1, b // u, u)[:, :, 0]
                self.tie(chans[:, :1], chans)
                self._laid_out.add(sid)
            out[sid] = b
            self._per_head_blocks(sid, u, b, out)
        self.head_dim_params()
        for pid, uid in self._param_layout.items():
            out.setdefault(pid, out[uid])
        return out

    def uniform(self, rows, site: str, kind: str | None = None) -> None:
        """Every row (channel ids along a normalized axis) replicates uniformly: its channels are tied.
        ``kind``: what reads them ("rms", "layer", "mean_x", "mean_sq", "mean_centered"; None: no fill + rescale),
        which decides whether a non-integer width can be reached by fill + rescale (docs/maths.md §5)."""
        rows = np.asarray(rows, np.int64)
        rows = np.unique(rows.reshape(-1, rows.shape[-1]), axis=0)
        self.tie(rows[:, :1], rows)
        self._grow()
        self.uniform_mask[rows.ravel()] = True
        for sp in self.table.spaces_of(rows.ravel()):
            self.uniform_sites.setdefault(sp.id, site)
            self.fill_kinds.setdefault(sp.id, set()).add(kind)
            if kind is None:
                self.no_fill.setdefault(sp.id, f"{site} cannot be rescaled for new channels")

    def forbid_fill(self, chans, reason: str) -> None:
        for sp in self.table.spaces_of(np.asarray(chans, np.int64).ravel()):
            self.no_fill.setdefault(sp.id, reason)

    def fill_kind(self, space_ids) -> tuple:
        """``("zero" | "mean", None)`` for the fill a group of spaces can take, or ``(None, reason)``."""
        kinds = set()
        for sid in space_ids:
            if sid in self.no_fill:
                return None, self.no_fill[sid]
            kinds |= self.fill_kinds.get(sid, set())
        if kinds and kinds <= {"rms", "mean_sq"}:
            return "zero", None
        if kinds and kinds <= {"layer", "mean_x", "mean_centered"}:
            return "mean", None
        return None, "read both by RMS-type and LayerNorm-type statistics"

    def units(self, rows) -> str | None:
        """Cut a space into units (``rows``: units x channels, channel ids of one space, each unit
        consecutive and aligned); returns why it cannot be, or None."""
        rows = np.unique(np.asarray(rows, np.int64).reshape(-1, np.shape(rows)[-1]), axis=0)
        u = rows.shape[1]
        spaces = self.table.spaces_of(rows.ravel())
        if len(spaces) != 1:
            return self._strided_units(rows)
        sp = spaces[0]
        off = rows[:, 0] - sp.base
        if not np.array_equal(rows, rows[:, :1] + np.arange(u)) or (off % u).any() or sp.size % u:
            if self._strided_units(rows) is None:
                return None
            return f"the heads of {sp.name!r} are not consecutive blocks of {u} channels"
        if self.unit_size.get(sp.id, u) != u:
            return f"{sp.name!r} is cut into heads of {self.unit_size[sp.id]} and of {u} channels"
        if sp.id in self.inner_heads:
            return None  # (heads kept in number: they are not cut into units, see keep_heads)
        self.unit_size[sp.id] = u
        self.tie(rows[:, :1], rows, key=("unit", sp.id))
        return None

    def _strided_units(self, rows) -> str | None:
        """Heads that are not one consecutive block of one space: each row's channels of every space it reads lie
        in that space's own block of ``size / heads`` channels (any order inside: DeepSeek-V3's interleaved rotary
        half; a block holding more than the head reads: DeepSeek's kv_b_proj, a head's key and value side by
        side), one block per head. Each block is a unit, and a head's blocks in its several spaces (multi-head
        latent attention: a query head from q_b_proj, its key from kv_b_proj) are copied together."""
        sid = self.table.space_ids_of(rows.ravel()).reshape(rows.shape)
        if (sid != sid[:1]).any():
            return "a head's channels come from several channel spaces, in another order in each head"
        n, cuts = len(rows), []
        for s_id in np.unique(sid[0]):
            sp = self.table.spaces[int(s_id)]
            part = rows[:, sid[0] == s_id]
            stride = sp.size // n
            blocks = (part - sp.base) // max(stride, 1)
            # (a space an earlier head cut into smaller aligned units: DeepSeek's keys, 8 of each head's 24 channels,
            # before its values read the other 16; the units grow to the blocks that hold both)
            if n < 2 or sp.size % n or (blocks != blocks[:, :1]).any() or len(np.unique(blocks[:, 0])) != n \
                    or stride % self.unit_size.get(sp.id, stride):
                return f"the heads of {sp.name!r} are not one block of its channels each"
            cuts.append((sp, sp.base + blocks[:, :1] * stride + np.arange(stride)))
        for sp, ids in cuts:
            self.unit_size[sp.id] = ids.shape[1]
            self.tie(ids[:, :1], ids)
            self.tie(cuts[0][1][:, :1], ids[:, :1])
        return None

    def tie_edges(self) -> np.ndarray:
        edges = list(self._tie_edges) + [e for es in self._keyed_edges.values() for e in es]
        per_head = self.head_dim_params()
        if per_head:  # (a head_dim parameter pairs with every head alike: no tie)
            drop = np.asarray(sorted(per_head), np.int64)
            edges = [e[~np.isin(self.table.space_ids_of(e.ravel()).reshape(e.shape), drop).any(axis=1)]
                     for e in edges]
        if self._split_edges:
            split = np.concatenate(self._split_edges)
            if self.unit_size:
                units = np.asarray(sorted(self.unit_size), np.int64)
                sid = self.table.space_ids_of(split.ravel()).reshape(split.shape)
                split = split[~np.isin(sid, units).any(axis=1)]
            edges.append(split)
        return np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)

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
        edges = self.tie_edges()
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
    units: dict = field(default_factory=dict)  # space id -> channels per unit (heads)
    notes: dict = field(default_factory=dict)  # space id -> why it grew less than its target
    fills: dict = field(default_factory=dict)  # space id -> new channels appended by fill + rescale
    fill_kind: dict = field(default_factory=dict)  # space id -> "zero" (RMS streams) or "mean" (LayerNorm streams)
    fill_base: dict = field(default_factory=dict)  # space id -> first label id of its new channels
    fill_start: int = 1 << 62  # label ids from here on name filled channels (above every space's)
    normalized: set = field(default_factory=set)  # spaces read by a norm across channels (residual streams)
    layout: dict = field(default_factory=dict)  # space id -> channels copied together (default: its units)
    block_layouts: dict = field(default_factory=dict)  # space id -> (blocks, pieces): see GrowthConstraints
    key_factor: np.ndarray | None = None  # per channel: what each copy of a key channel is multiplied by

    def row_factors(self, space, mapping) -> np.ndarray | None:
        """What each new row of ``space`` (old row ``mapping``) is multiplied by, or None when nothing is."""
        if self.key_factor is None:
            return None
        f = np.where(mapping < 0, 1.0, self.key_factor[space.base + np.maximum(mapping, 0)])
        return None if np.all(f == 1.0) else f

    def tied_spaces(self, space) -> list:
        """Other spaces sharing a tie class with ``space``."""
        if self.classes is None:
            return []
        mine = np.unique(self.classes[space.chan_ids])
        others = np.nonzero(np.isin(self.classes, mine))[0]
        return [s for s in self.table.spaces_of(others) if s.id != space.id]

    def head_count(self, first_chans) -> int:
        """How many heads the widened model has in place of the heads starting at ``first_chans``."""
        return int(self.counts[np.asarray(sorted(first_chans), np.int64)].sum()) if len(first_chans) else 0

    def replication_counts(self, space) -> np.ndarray:
        return self.counts[space.base : space.base + space.size]

    def new_size(self, space) -> int:
        return int(self.replication_counts(space).sum()) + self.fills.get(space.id, 0)

    def mapping(self, space) -> np.ndarray:
        """g: new index -> old index (each old channel followed by its copies; in a space cut into units,
        each unit followed by its copies); -1 for the channels fill + rescale appends."""
        u = self.layout.get(space.id, self.units.get(space.id, 1))
        if space.id in self.block_layouts:
            g = self._block_mapping(space, u)
            if g is not None:
                return g
        if u == 1:
            g = np.repeat(np.arange(space.size, dtype=np.int64), self.replication_counts(space))
        else:
            unit_counts = self.replication_counts(space)[::u]
            starts = np.repeat(np.arange(space.size // u, dtype=np.int64) * u, unit_counts)
            g = (starts[:, None] + np.arange(u)).ravel()
        n_fill = self.fills.get(space.id, 0)
        return np.concatenate([g, np.full(n_fill, -1, np.int64)]) if n_fill else g

    def _block_mapping(self, space, u: int) -> np.ndarray | None:
        """A space laid out ``(blocks M, pieces P, local L)`` whose pieces are read across the blocks (heads of
        ``u`` channels over ``(M, L)``: CodeGen's ``[q | v | k]`` in each of its ``mp_num`` blocks). Each piece's
        sequence, read in that order, takes every unit followed by its copies; the new sequence is cut back into
        ``M`` blocks of ``L'``. None when the pieces' new sequences are not ``M`` equal blocks."""
        m, n_p = self.block_layouts[space.id]
        local = space.size // (m * n_p)
        # logical index (piece, block, i) -> physical old index (block, piece, i)
        logical = np.arange(space.size).reshape(m, n_p, local).transpose(1, 0, 2).ravel()
        counts = self.replication_counts(space)[logical]
        if u > 1:
            if local % u:
                return None
            starts = np.repeat(np.arange(space.size // u, dtype=np.int64) * u, counts[::u])
            g = (starts[:, None] + np.arange(u)).ravel()
        else:
            g = np.repeat(np.arange(space.size, dtype=np.int64), counts)
        if len(g) % (m * n_p):
            return None
        new_local = len(g) // (m * n_p)
        if not np.array_equal((g // (m * local)).reshape(n_p, -1), np.repeat(np.arange(n_p), m * new_local)
                              .reshape(n_p, -1)):
            return None  # (the pieces grew unequally)
        return logical[g].reshape(n_p, m, new_local).transpose(1, 0, 2).ravel()

    def new_chan_ids(self, space) -> np.ndarray:
        """Labels of the widened space: each new channel carries its source's id; filled channels carry
        ids of their own, shared by the spaces of one stream (so operands of a residual add still pair)."""
        g = self.mapping(space)
        ids = space.base + g
        if space.id in self.fills:
            fill = g < 0
            ids[fill] = self.fill_base[space.id] + np.arange(int(fill.sum()))
        return ids

    @classmethod
    def identity(cls, table: SpaceTable, constraints: "GrowthConstraints | None" = None) -> "WidenPlan":
        plan = cls(table, np.ones(table.num_chans, dtype=np.int64))
        if constraints is not None:
            plan.units, plan.normalized = dict(constraints.unit_size), set(constraints.uniform_sites)
        return plan


def solve_plan(constraints: GrowthConstraints, targets: dict, seed: int = 0, fill: bool = True) -> WidenPlan:
    """Assign replication counts so each space reaches (about) its target width.

    ``targets`` maps space id -> desired new width.  Extra copies go to old
    channels drawn uniformly at random (Net2Net's random mapping g), one tie
    class at a time; classes touching a frozen channel keep one copy.
    Widths can overshoot a target only when ties force several channels to
    grow together.
    """
    table = constraints.table
    layout = constraints.layout_units()
    per_head = constraints.head_dim_params()
    targets = {sid: t for sid, t in targets.items() if sid not in per_head}
    constraints._grow()
    rng = np.random.default_rng(seed)
    cls = constraints.classes()
    ncls = int(cls.max()) + 1 if len(cls) else 0
    class_frozen = np.zeros(ncls, dtype=bool)
    np.logical_or.at(class_frozen, cls, constraints.frozen)
    class_uniform = np.zeros(ncls, dtype=bool)
    np.logical_or.at(class_uniform, cls, constraints.uniform_mask[: len(cls)])
    notes, fill_candidates = {}, {}
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
        free = ~class_frozen[cls[chans]]
        if sid in constraints.unit_size and 0 < free.sum() < sp.size and target > sp.size:
            # a space of heads some of which stay (a single key/value head fused with the queries): the free
            # heads grow by the factor asked of the space, not by the channels the others keep
            target = sp.size + int(round((target - sp.size) * free.sum() / sp.size))
        free_cls = cls[chans[free]].tolist()  # class of each free channel
        n_free = len(free_cls)
        if n_free == 0:
            continue
        guard = 0
        while width[sid] < target and guard < 4 * target + 16:
            guard += 1
            k = free_cls[rng.integers(n_free)]
            step = dict(mult(k))[sid]
            if class_uniform[k] and width[sid] + step > target:
                # a uniform class grows by whole copies of itself only: never past the target
                if sid in constraints.uniform_sites and width[sid] == sp.size:
                    notes[sid] = (f"normalized by {constraints.uniform_sites[sid]}: its channels replicate "
                                  "uniformly, by whole integer factors only")
                    if width[sid] + step > target >= width[sid] + 1 and fill:
                        fill_candidates.setdefault(k, sid)
                free_cls = [c for c in free_cls if c != k]
                n_free = len(free_cls)
                if n_free == 0:
                    break
                continue
            # ties can make one draw add several channels: stop at the nearest width
            if target - width[sid] < step / 2:
                break
            counts_cls[k] += 1
            for s2, m in mult(k):
                width[s2] += m
    plan = WidenPlan(table, np.asarray(counts_cls, dtype=np.int64)[cls], cls, dict(constraints.unit_size), notes,
                     normalized=set(constraints.uniform_sites), layout=layout,
                     block_layouts=dict(constraints.block_layouts))
    plan.key_factor = key_factors(constraints, plan)
    for pid, uid in per_head.items():
        plan.notes[pid] = (f"lies along the head_dim of {table.spaces[uid].name!r} (one value per head channel, "
                           "shared by every head): heads are copied whole, head_dim kept")
    _plan_fills(plan, constraints, targets, fill_candidates, mult, width)
    return plan


def _plan_fills(plan, constraints, targets: dict, candidates: dict, mult, width) -> None:
    """Fill + rescale (docs/maths.md §5) for the uniform classes that could not reach their target by whole
    copies: every space of the class gets the same number of new channels (same ids), read as 0 or as the
    mean of the old channels by the norms, which are rescaled to match."""
    table = constraints.table
    links: dict = {}
    for stream, unit, ratio in constraints.width_links:
        links.setdefault(stream, []).append((unit, ratio))
    next_id = plan.fill_start = int(table.num_chans)
    for k, reason_sid in candidates.items():
        # (constants broadcast against the stream join its class through one fixed channel: they hold no width)
        spaces = [(sid, m) for sid, m in mult(k) if table.spaces[sid].kind != "fixed"]
        sids = [sid for sid, _ in spaces]
        size = table.spaces[sids[0]].size
        if any(m != table.spaces[sid].size or table.spaces[sid].size != size or width[sid] != size
               for sid, m in spaces):
            continue
        kind, why = constraints.fill_kind(sids)
        if kind is None:
            plan.notes[reason_sid] += f"; no fill + rescale: {why}"
            continue
        wanted = {int(targets[sid]) for sid in sids if sid in targets}
        linked = {int(round(plan.new_size(table.spaces[u]) * ratio)) for sid in sids for u, ratio in links.get(sid, [])}
        if linked:
            wanted = linked
        if len(wanted) != 1 or next(iter(wanted)) <= size:
            if len(wanted) > 1:
                plan.notes[reason_sid] += "; no fill + rescale: the spaces it joins ask for different widths"
            continue
        n_fill = next(iter(wanted)) - size
        for sid in sids:
            plan.fills[sid], plan.fill_kind[sid], plan.fill_base[sid] = n_fill, kind, next_id
            plan.notes.pop(sid, None)
        next_id += n_fill


def key_factors(constraints: GrowthConstraints, plan: WidenPlan) -> np.ndarray | None:
    """Heads kept in number grow head_dim by copying channels (docs/maths.md §4): the scores ``q . k`` then
    count a channel copied ``c`` times ``c`` times, so each copy of a key channel is divided by ``c``; where
    the family computes the scores' scale ``1/sqrt(head_dim)`` from the new head_dim, the copies are also
    multiplied by ``sqrt(d'/d)``. Returns the factor of every channel (1 where none), or None."""
    if not constraints.scaled_keys:
        return None
    f = np.ones(constraints.table.num_chans)
    for rows, follows in constraints.scaled_keys:
        counts = plan.counts[rows]
        new_dims = set(counts.sum(axis=1).tolist())
        if len(new_dims) != 1:  # (the heads are tied position by position: one head_dim)
            raise ValueError("heads kept in number grew to different head_dims")
        r = np.sqrt(new_dims.pop() / rows.shape[1]) if follows else 1.0
        f[rows] = r / counts
    return f
