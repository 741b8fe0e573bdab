"""Site rules shared by the frontends: what one reading site of the widened graph must satisfy
and the new weights it gets.  Every function works on numpy label / weight arrays and raises
:class:`~graphgrow.core.provenance.Mismatch` where the widened configuration is inconsistent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import arithmetic as ar
from .labels import channel_of, channel_sequence, varying_axes
from .provenance import Mismatch, RowMatch, match_rows


@dataclass
class GrowOptions:
    noise: float = 0.0
    noise_mode: str = "exact"
    init: str = "net2net"
    seed: int = 0


class LabelRunState:
    """State of one label run of a graph, for any frontend.

    The analysis run (``plan=None``) creates the space table, the constraints and
    the record of what the original looked like; every apply run (with a plan)
    shares them from ``analysis`` and keeps only its own environment.
    """

    def __init__(self, *, plan=None, analysis: "LabelRunState | None" = None, options: GrowOptions | None = None):
        from .plan import GrowthConstraints
        from .spaces import SpaceTable

        self.plan = plan
        self.analysis = plan is None
        if analysis is None:
            self.table = SpaceTable()
            self.constraints = GrowthConstraints(self.table)
            self.old, self.node_space, self.fixed_space, self.opaque_nodes = {}, {}, {}, set()
        else:
            self.table, self.constraints = analysis.table, analysis.constraints
            self.old = analysis.env  # labels of the original configuration
            self.node_space, self.fixed_space = analysis.node_space, analysis.fixed_space
            self.opaque_nodes = analysis.opaque_nodes  # an op opaque in the analysis stays opaque
        self.norm_outputs: set = set()  # ids of norm results (analysis: a residual add of one is post-norm)
        self.mean_scales: dict = {}  # node key -> factor a mean over filled channels is multiplied by
        self.stream_scales: list = []  # (node, input labels, r = d/d') of gainless norms over a filled stream
        self.options = options or GrowOptions()
        self.rng = np.random.default_rng(self.options.seed + 7919)
        self.env: dict = {}


def channel_ids(labels: np.ndarray, axis: int = 1):
    """Channel id of every slice along ``axis``, or None when ids do not tell slices apart.

    Rules that rebuild labels from channel ids (pooling, depthwise conv) need two
    slices with one id to hold the same content; tensors without channel structure
    (model inputs, results of opaque ops) carry one id for all slices and fail this.
    """
    if labels.ndim < 2:
        return None
    seq = channel_sequence(labels, axis)
    if seq is None:
        return None
    uniq, first = np.unique(seq, return_index=True)
    if len(uniq) != len(seq):
        rows = np.moveaxis(labels, axis, 0)
        if any(not np.array_equal(rows[i], rows[first[np.searchsorted(uniq, c)]]) for i, c in enumerate(seq)):
            return None
    return seq


def unify_pairs(a: np.ndarray, b: np.ndarray):
    """Channel ids of two operands, broadcast against each other (to be tied)."""
    return np.broadcast_arrays(channel_of(a), channel_of(b))


def check_aligned(old_a, old_b, new_a, new_b, old_full) -> None:
    """Both operands of an elementwise op must still read the same original channel pair."""
    pair_old = np.stack(np.broadcast_arrays(old_a, old_b), axis=-1)
    try:
        pair_new = np.stack(np.broadcast_arrays(new_a, new_b), axis=-1)
    except ValueError:
        raise Mismatch("operands no longer broadcast") from None
    if pair_old.shape == pair_new.shape and np.array_equal(pair_old, pair_new):
        return
    if pair_old.ndim != pair_new.ndim:
        raise Mismatch("operands changed rank")
    grown = [ax for ax in range(pair_old.ndim - 1) if pair_old.shape[ax] != pair_new.shape[ax]]
    va = grown if len(grown) == 1 else varying_axes(old_full)
    if len(va) != 1:
        raise Mismatch("operands widened along several axes")
    match_rows(pair_old, pair_new, va[0], "operands")


def block_ties(chan: np.ndarray, va: list) -> list:
    """The blocks of a channel axis split over the axes ``va`` (channel ids ``chan``, any size along the
    other axes, which are read at 0): the channels of each block, to tie positionwise with the first."""
    idx = tuple(slice(None) if ax in va else 0 for ax in range(chan.ndim))
    sub = chan[idx].reshape(-1, chan.shape[va[-1]])
    return [(sub[0], sub[k]) for k in range(1, sub.shape[0])]


def produce_weights(weight: np.ndarray, w_in: int, w_out: int, match: RowMatch | None, mapping: np.ndarray,
                    options: GrowOptions, rng, fill_kind: str | None = None) -> np.ndarray:
    """A producer's new weight: input columns consumed by ``match``, output units gathered by ``mapping``
    (units added by fill + rescale: 0 or the mean of the old units, per ``fill_kind``)."""
    w = weight
    if match is not None:
        if options.init == "random-pad":
            w = ar.random_pad_columns(w, w_in, match, rng)
        else:
            w = ar.consume(w, w_in, match, noise=options.noise, noise_mode=options.noise_mode, rng=rng)
    if len(mapping) != weight.shape[w_out]:  # (an unchanged output space keeps its order: no copy)
        w = ar.gather_fill(w, w_out, mapping, fill_kind)
    if options.init == "random-pad" and len(mapping) != weight.shape[w_out]:
        w = ar.random_pad_rows(w, w_out, mapping, rng)
    return w


def grouped_weights(weight: np.ndarray, groups: int, old_in: np.ndarray, new_in: np.ndarray, in_axis: int,
                    n_out_old: int, mapping: np.ndarray, options: GrowOptions, rng) -> np.ndarray:
    """New weight (out, in/groups, ...) of a grouped conv: every group widens inside itself."""
    n_in_old, n_in_new, new_out = old_in.shape[in_axis], new_in.shape[in_axis], len(mapping)
    if n_in_new % groups or new_out % groups:
        raise Mismatch(f"widened channels are not divisible by groups={groups}")
    opg_old, opg_new = n_out_old // groups, new_out // groups
    if not np.array_equal(mapping // opg_old, np.arange(new_out) // opg_new):
        raise Mismatch("an output copy left its group")
    ipg_old, ipg_new = n_in_old // groups, n_in_new // groups
    blocks = []
    for k in range(groups):
        o = np.take(old_in, np.arange(k * ipg_old, (k + 1) * ipg_old), axis=in_axis)
        n = np.take(new_in, np.arange(k * ipg_new, (k + 1) * ipg_new), axis=in_axis)
        m = match_rows(o, n, in_axis, f"group {k}")
        rows = weight[mapping[k * opg_new:(k + 1) * opg_new]]
        blocks.append(ar.consume(rows, 1, m, noise=options.noise, noise_mode=options.noise_mode, rng=rng))
    return np.concatenate(blocks, axis=0)


def remap_bound(src: np.ndarray, b: int) -> int:
    """Position in the widened axis of the old boundary ``b`` (all copies of channels < b come first)."""
    inside = src < b
    nb = int(inside.sum())
    if not inside[:nb].all():
        raise Mismatch("a channel slice boundary falls between copies")
    return nb


def rescale_shape(raw: list, va: list, old_numel: int, new_numel: int, old_shape=None, unit: int = 1,
                  block: int = 1):
    """New literal reshape dims after widening, or None when nothing needs to change.

    ``raw``: the dims as written (ints, or None for dims computed in the graph),
    ``va``: output axes that carry channels.  Only a literal channel dim is
    rescaled, and only when no computed dim or -1 already follows the width; in a space cut into
    units of ``unit`` channels (attention heads), the dim that counts the units. ``block``: the channels
    the plan copies together (several units: Falcon's kv group); a literal counting those blocks grows
    even where a -1 inside them would otherwise take the new channels (and cut the copied blocks apart).
    """
    lits = [ax for ax in va if ax < len(raw) and isinstance(raw[ax], (int, np.integer)) and raw[ax] not in (-1,)]
    adaptive = any(ax < len(raw) and (raw[ax] is None or raw[ax] == -1) for ax in va)
    if adaptive and unit > 1 and old_shape is not None and va and old_shape[va[-1]] == unit and lits \
            and [ax for ax in va if raw[ax] is None or raw[ax] == -1] == [va[-1]]:
        # heads written as a literal and head_dim as -1 (DeBERTa's ``(heads, -1)``): heads grow as whole units,
        # head_dim never changes, so the literal counting the heads follows the width, not the -1
        adaptive = False
    if old_shape is not None and block > unit and old_numel != new_numel:
        # (Falcon on transformers 5.25: ``view(..., num_kv_heads, -1, head_dim)`` of a space copied group by group)
        outer = [ax for ax in lits if int(np.prod([old_shape[a] for a in va if a > ax])) == block]
        if outer and all(raw[a] is not None and raw[a] != -1 for a in va if a < outer[0]):
            return _rescaled(raw, outer[0], old_numel, new_numel)
    if not lits or adaptive or old_numel == new_numel:
        return None
    ax = lits[-1]
    if unit > 1 and old_shape is not None:
        # a space cut into units (heads) grows by whole units: the axis whose inner channel axes hold one unit
        inner = [ax for ax in lits if int(np.prod([old_shape[a] for a in va if a > ax])) == unit]
        if inner:
            ax = inner[-1]
        elif int(np.prod([old_shape[a] for a in va if a >= ax])) == unit:
            # the literal is the unit itself (head_dim): the heads live on a size-1 or computed axis
            if any(r is None or r == -1 for r in raw):
                return None
            raise Mismatch("no literal dim counts the heads")
    return _rescaled(raw, ax, old_numel, new_numel)


def _rescaled(raw: list, ax: int, old_numel: int, new_numel: int) -> list:
    num = int(raw[ax]) * new_numel
    if num % old_numel:
        raise Mismatch("a literal shape cannot be rescaled to the new width")
    out = list(raw)
    out[ax] = num // old_numel
    return out
