"""The relations of docs/maths.md §2, written once for every frontend.

A frontend (torch.fx, ONNX) walks its graph with :class:`~graphgrow.core.label_tensor.LabelTensor`
values in place of activations and, for each op, calls one relation of :class:`RelationRun`:

* ``produce`` (conv, linear, matmul with a constant): a new channel space; the input is consumed;
* ``carry`` / ``depthwise`` (BN, per-channel constants, depthwise conv): same channels, parameters
  gathered;
* ``grouped`` (grouped conv): groups widen inside themselves (tied blockwise);
* ``unify`` (add, mul, max, ...): the operands' channels are tied elementwise;
* ``pool`` / ``reduce``: per-channel ops that change the other axes;
* ``mix`` (norms and reductions across channels) and ``opaque`` (anything not understood): the channels
  freeze, with the op named;
* moves are executed by the frontend on the labels; ``reshape_ties``, ``equal_piece_ties``,
  ``axis_source`` and ``remap_bound`` are the rules they need.

In the analysis run (no plan) relations create spaces, ties and freezes; in an apply run (with a plan)
they check every reading site against the analysis and return the new weights, or raise
:class:`~graphgrow.core.growth.Conflict`.  The frontend only reads and writes parameters, names sites and
maps its ops to these relations (its ``ops`` module).
"""

from __future__ import annotations

import numpy as np

from . import arithmetic as ar
from . import sites
from .attention import AttentionRelations
from .dispatch import DispatchRelations
from .fill import filled_slices, match_with_fills
from .growth import Conflict, NotUnderstood
from .label_tensor import (
    LabelTensor,
    factored_alike,
    label_channel_ids,
    match_labels,
    reduced_labels,
    resalt_labels,
    same_labels,
    split_axis_ties,
)
from .labels import channel_of
from .norms import NormRelations, row_match
from .provenance import Mismatch, RowMatch


class RelationRun(NormRelations, AttentionRelations, DispatchRelations, sites.LabelRunState):
    """One label run of a graph. Frontends subclass it and provide the five hooks below."""

    # ------------------------------------------------------------ frontend hooks
    def site(self, node) -> str:
        """One phrase naming the op, for reports (``module 'layer1.0.conv1' (Conv2d)``)."""
        raise NotImplementedError

    def node_key(self, node):
        """A hashable key of the node, stable between the analysis and the apply runs."""
        raise NotImplementedError

    def salt(self, node) -> int:
        raise NotImplementedError

    def input_pairs(self, node) -> list:
        """``[(original labels or None, current labels)]`` of every label tensor the node reads."""
        raise NotImplementedError

    def fixed_outputs(self, node):
        """Outputs without channel structure (element labels), in the frontend's form."""
        raise NotImplementedError

    def old_outputs(self, node):
        """The node's outputs in the original run, in the frontend's form."""
        raise NotImplementedError

    # ------------------------------------------------------------ sites
    def conflict(self, node, reason: str) -> Conflict:
        chans = [old.chans for old, _ in self.input_pairs(node) if old is not None]
        chans = np.unique(np.concatenate(chans)) if chans else np.zeros(0, np.int64)
        return Conflict(node, chans, f"{self.site(node)}: {reason}")

    def match(self, node, old: LabelTensor, new: LabelTensor, axis: int, what: str = "input",
              fills_ok: bool = False) -> RowMatch | None:
        """New rows matched to old along ``axis``; None when the input is unchanged. Channels added by fill +
        rescale are accepted only where ``fills_ok`` (the site knows what to do with them)."""
        if same_labels(old, new):
            return None
        try:
            if self.plan.fills:
                m = match_with_fills(old, new, axis, what, self.plan.fill_start)
                if m.fills is not None and not fills_ok:
                    raise Mismatch("channels added by fill + rescale reach it, and it cannot take them")
                return m
            return match_labels(old, new, axis, what)
        except Mismatch as exc:
            raise self.conflict(node, str(exc)) from None

    def fill_kind_of(self, node, suffix: str | None = None) -> str | None:
        """How the channels fill + rescale adds to the node's output space are filled ("zero"/"mean")."""
        key = self.node_key(node) if suffix is None else (self.node_key(node), suffix)
        sp = self.node_space.get(key)
        return None if sp is None or self.plan is None else self.plan.fill_kind.get(sp.id)

    def require_unchanged(self, node) -> None:
        for old, new in self.input_pairs(node):
            if not same_labels(old, new):
                raise self.conflict(node, "its input changed but the op must keep it as it is")

    def note_roles(self, x: LabelTensor, role: str, name: str) -> None:
        if self.analysis:
            for sp in self.table.spaces_of(x.chans):
                sp.add_role(role, name)

    def out_space(self, node, name: str, size: int, suffix: str | None = None):
        key = self.node_key(node) if suffix is None else (self.node_key(node), suffix)
        if self.analysis:
            sp = self.table.new_space(name, size, "produced")
            sp.add_role("producer", name)
            self.node_space[key] = sp
        return self.node_space[key]

    # ------------------------------------------------------------ relations without weights
    def elementwise(self, node, x: LabelTensor) -> LabelTensor:
        return resalt_labels(x, self.salt(node))

    def is_constant_labels(self, x: LabelTensor | None) -> bool:
        """Labels without channel structure (a model input, a mask or positions computed from inputs only, an
        opaque op's result): one channel of a fixed space, the same everywhere. An op reading only such tensors
        gives such tensors, whatever it computes."""
        if not isinstance(x, LabelTensor) or x.vary or len(x.chans) != 1:
            return False
        sp = self.table.spaces_of(x.chans)
        return len(sp) == 1 and sp[0].kind == "fixed" and not sp[0].producers

    def opaque(self, node, reason: str):
        """Not understood: its input channels freeze (analysis); it must see the original (apply)."""
        if self.analysis:
            self.opaque_nodes.add(self.node_key(node))
            for _, x in self.input_pairs(node):
                self.constraints.freeze(x.chans, f"{self.site(node)}: {reason}")
            return self.fixed_outputs(node)
        self.require_unchanged(node)
        return self.old_outputs(node)

    def mix(self, node, x: LabelTensor, why: str):
        """An op that mixes the channels of ``x`` (a norm or reduction across them): they freeze."""
        if self.analysis:
            self.constraints.freeze(x.chans, f"{self.site(node)}: {why} (mixes channels)")
            return self.fixed_outputs(node)
        self.require_unchanged(node)
        return self.old_outputs(node)

    def mixes(self, x: LabelTensor, old_x: LabelTensor, axes) -> bool:
        """Whether an op acting along ``axes`` (non-negative) reads across channels."""
        return bool(set(axes) & set((x if self.analysis else old_x).vary))

    def pool(self, node, x: LabelTensor, old_x: LabelTensor, shape, axis: int = 1) -> LabelTensor:
        """Per-channel op on ``axis`` (1: NCHW) that may change the other axes (pooling, interpolation, padding)."""
        seq = label_channel_ids(x, axis)
        old_c = (x if self.analysis else old_x).shape[axis]
        if seq is None or shape is None or len(shape) != x.ndim or shape[axis] != old_c:
            raise NotUnderstood(f"its input channels are not on axis {axis}, or one channel id holds different "
                                "contents")
        new_shape = list(shape)
        new_shape[axis] = x.shape[axis]
        return LabelTensor.channels(tuple(new_shape), axis, seq, self.salt(node))

    def reduce(self, node, x: LabelTensor, old_x: LabelTensor, axes, keepdims: bool, mean: bool = False,
               mean_kind: str | None = None):
        """A reduction over ``axes`` (non-negative): per channel when no channel axis is reduced; a mean
        over one channel axis is unchanged by uniform replication (:meth:`uniform_mean`)."""
        if self.mixes(x, old_x, axes):
            stacked = self.stacked_sum(node, x, old_x, axes, keepdims)
            if stacked is not None:
                return stacked
            if mean:
                return self.uniform_mean(node, x, old_x, axes, keepdims, mean_kind)
            return self.mix(node, x, "reduces over the channel axis")
        f = x.factors()
        if f is not None and not set(axes) & set(f[0]):  # only position axes go: the part stays
            if keepdims:
                shape, cax = [1 if i in axes else d for i, d in enumerate(x.shape)], f[0]
            else:
                shape = [d for i, d in enumerate(x.shape) if i not in axes]
                cax = [c - sum(1 for a in axes if a < c) for c in f[0]]
            return self.elementwise(node, LabelTensor.multi(shape, cax, f[1]))
        return self.elementwise(node, reduced_labels(x, axes, keepdims))

    def stacked_sum(self, node, x: LabelTensor, old_x: LabelTensor, axes, keepdims: bool):
        """A sum or mean over a stacking axis: tensors of several spaces stacked along ``axes[0]`` (expert outputs
        of a mixture of experts), each with its channels along one other axis, added slice to slice: their
        channels are tied like the operands of an add. None when the tensor is not of that form."""
        ref = x if self.analysis else old_x
        if len(axes) != 1 or len(ref.vary) != 2 or axes[0] not in ref.vary:
            return None
        a = axes[0]
        c = next(v for v in ref.vary if v != a)
        chan = np.moveaxis(channel_of(ref.a), (a, c), (0, 1))
        rows = chan.reshape(chan.shape[0], chan.shape[1], -1)
        if not (rows == rows[:, :, :1]).all():
            return None  # a slice's channels are not constant over the positions
        seqs = rows[:, :, 0]
        if len(np.unique(seqs[:, 0])) < 2 or len({tuple(sp.id for sp in self.table.spaces_of(s)) for s in seqs}) \
                != len(seqs):
            return None  # (the slices must be distinct spaces, each whole)
        c_out = c if keepdims or c < a else c - 1
        shape = [d for i, d in enumerate(x.shape) if i != a or keepdims]
        if keepdims:
            shape[a] = 1
        if self.analysis:
            for s in seqs[1:]:
                self.constraints.tie(seqs[0], s)
            return LabelTensor.channels(shape, c_out, seqs[0], self.salt(node))
        try:
            new_chan = np.moveaxis(channel_of(x.a), (a, c), (0, 1)).reshape(x.shape[a], x.shape[c], -1)[:, :, 0]
        except ValueError:
            raise self.conflict(node, "its stacked tensors changed shape") from None
        if new_chan.shape[0] != seqs.shape[0] or any(not np.array_equal(self._stack_source(s, o), self._stack_source(
                new_chan[0], seqs[0])) for s, o in zip(new_chan[1:], seqs[1:])):
            raise self.conflict(node, "the stacked tensors no longer pair their channels")
        return LabelTensor.channels(shape, c_out, new_chan[0], self.salt(node))

    def _stack_source(self, new_seq, old_seq) -> np.ndarray:
        """Old index of every new channel of one stacked slice (-1 + fill id for channels fill + rescale adds)."""
        pos = {int(v): i for i, v in enumerate(old_seq)}
        return np.array([pos.get(int(v), -1 - int(v)) for v in new_seq])

    def unify(self, node, operands: list, full: int) -> LabelTensor:
        """An elementwise op of several activations (``operands``: ``[(old, new)]``, ``full``: the index of
        one whose shape is the result's): tie their channels (analysis), or check that they still pair the
        same original channels (apply)."""
        old_full, new_full = operands[full]
        if self.analysis:
            if any(id(v) in self.norm_outputs for _, v in operands):
                # post-norm: a norm's output is the stream itself, it cannot carry filled channels
                for _, v in operands:
                    self.constraints.forbid_fill(v.chans, f"{self.site(node)} adds a norm's output to the stream "
                                                          "(post-norm): only integer factors are exact")
            for k, (_, v) in enumerate(operands):
                if k == full:
                    continue
                if v.shape == new_full.shape and factored_alike(new_full, v):
                    # every position pairs the same two channels: the parts' pairs are all of them
                    ca, cb = channel_of(new_full.part), channel_of(v.part)
                elif len(new_full.chans) == 1 or len(v.chans) == 1:
                    # one side holds one channel: it pairs with every channel of the other
                    ca, cb = new_full.chans, v.chans
                else:
                    ca, cb = sites.unify_pairs(new_full.a, v.a)
                self.constraints.tie(ca, cb)
        else:
            result = new_full
            operands, old_full, new_full = self._drop_fills(node, operands, full)
            for k, (ob, nb) in enumerate(operands):
                if k == full:
                    continue
                if (old_full.shape == ob.shape and new_full.shape == nb.shape
                        and factored_alike(old_full, ob, new_full, nb)):
                    try:  # operand pairs compare as the pairs of their parts (one position grid)
                        sites.check_aligned(old_full.part, ob.part, new_full.part, nb.part, old_full.part)
                        continue
                    except Mismatch:
                        pass  # the same check on the full arrays, for the same message
                try:
                    sites.check_aligned(old_full.a, ob.a, new_full.a, nb.a, old_full.a)
                except Mismatch as exc:
                    raise self.conflict(node, f"its operands no longer align channel by channel ({exc})") from None
            new_full = result
        return self.elementwise(node, new_full)

    def _drop_fills(self, node, operands: list, full: int):
        """Operands of an elementwise op whose filled channels (fill + rescale) pair up exactly: the same fill
        ids at the same places in every operand that has the channel axis. Returns the operands without those
        slices (for the usual check) and the full operand's pair."""
        old_full, new_full = operands[full]
        if not self.plan.fills:
            return operands, old_full, new_full
        va = [a for a in range(new_full.ndim) if new_full.shape[a] != old_full.shape[a]]
        if len(va) != 1:
            return operands, old_full, new_full
        ax = va[0]
        try:
            mask = filled_slices(new_full, ax, self.plan.fill_start)
        except Mismatch as exc:
            raise self.conflict(node, str(exc)) from None
        if mask is None:
            return operands, old_full, new_full
        keep = np.flatnonzero(~mask)
        ids = np.moveaxis(channel_of(new_full.a), ax, 0)[mask]
        out = []
        for ob, nb in operands:
            a = ax - (new_full.ndim - nb.ndim)  # (operands broadcast from the right)
            if a >= 0 and nb.shape[a] == new_full.shape[ax]:
                other = np.moveaxis(channel_of(nb.a), a, 0)[mask]
                lead = ids.shape[:1] + (1,) * (ids.ndim - other.ndim) + other.shape[1:]
                if not np.array_equal(np.broadcast_to(other.reshape(lead), ids.shape), ids):
                    raise self.conflict(node, "its operands' channels added by fill + rescale do not pair")
                nb = LabelTensor(np.take(nb.a, keep, axis=a))
            out.append((ob, nb))
        return out, out[full][0], out[full][1]

    def fixed_operand(self, node, x: LabelTensor, old_x: LabelTensor, c_shape) -> LabelTensor:
        """``x`` combined elementwise with a tensor without channel structure (rotary cos/sin tables) that
        varies along channel axes of ``x`` which never grow (head_dim): exact while every row of ``x``
        along those axes is an original row; no tie."""
        ref = x if self.analysis else old_x
        cb = (1,) * (x.ndim - len(c_shape)) + tuple(c_shape)
        along = [ax for ax in ref.vary if cb[ax] != 1]
        if not self.analysis:
            for ax in along:
                try:
                    if row_match(old_x, x, ax, "rows read with a constant",
                                 self.plan.fill_start if self.plan.fills else None) is not None:
                        raise Mismatch("a constant varies along a widened axis")
                except Mismatch as exc:
                    raise self.conflict(node, str(exc)) from None
        return self.elementwise(node, x)

    # ------------------------------------------------------------ relations with weights
    def produce(self, node, name: str, x: LabelTensor, old_x: LabelTensor, weight: np.ndarray, *, in_axis: int,
                out_axis: int, w_in: int, w_out: int, shape, suffix: str | None = None):
        """A producer (``weight``: its input channels on ``w_in``, its output units on ``w_out``).

        Returns ``(labels, new weight or None, mapping or None)``: the new weight when the input or the
        output changed, ``mapping`` (old unit of every new unit) in the apply run."""
        n_out = weight.shape[w_out]
        self.note_roles(x, "consumer", name)
        space = self.out_space(node, name, n_out, suffix)
        if self.analysis:
            return LabelTensor.channels(shape, out_axis, space.chan_ids, self.salt(node)), None, None
        match = self.match(node, old_x, x, in_axis, fills_ok=True)
        mapping = self.plan.mapping(space)
        factors = self.plan.row_factors(space, mapping)
        if factors is not None:  # (key channels of heads kept in number: its bias is gathered by it too)
            mapping = ar.ScaledMapping(mapping, factors)
        new_w = None
        if match is not None or len(mapping) != n_out:
            new_w = sites.produce_weights(weight, w_in, w_out, match, mapping, self.options, self.rng,
                                          self.plan.fill_kind.get(space.id))
        out_shape = list(shape)
        out_shape[out_axis] = len(mapping)
        return LabelTensor.channels(out_shape, out_axis, self.plan.new_chan_ids(space), self.salt(node)), new_w, mapping

    def carry(self, node, name: str, x: LabelTensor, old_x: LabelTensor, params: dict, axis: int = 1):
        """Per-channel parameters along ``axis`` (BN, PReLU, a per-channel constant): ``params`` name ->
        array whose axis 0 runs over the channels. Returns ``(labels, {name: gathered}, match)``."""
        self.note_roles(x, "carrier", name)
        new, match = {}, None
        if not self.analysis:
            match = self.match(node, old_x, x, axis)
            if match is not None:
                if not match.unique_old:
                    raise self.conflict(node, "per-channel parameters on duplicated channels")
                src = match.source()
                for key, c in params.items():
                    if c is not None and c.ndim >= 1 and c.shape[0] == match.n_old:
                        new[key] = ar.gather(c, 0, src)
        return self.elementwise(node, x), new, match

    def depthwise(self, node, name: str, x: LabelTensor, old_x: LabelTensor, params: dict, shape):
        """Depthwise conv: one filter per channel (``params``: weight and bias, axis 0 over channels).
        Returns ``(labels, {name: gathered}, match)``."""
        self.note_roles(x, "carrier", name)
        seq = label_channel_ids(x, 1)
        if seq is None:
            raise NotUnderstood("channels of a depthwise conv input are not on axis 1")
        new, match = {}, None
        if not self.analysis:
            match = self.match(node, old_x, x, 1, fills_ok=True)
            if match is not None and match.fills is not None:
                # a filled channel holds its position's channel mean; a filter of its own cannot make the mean of
                # the other channels' filtered outputs, which the norm after it needs
                raise self.conflict(node, "channels added by fill + rescale reach a per-channel filter before the "
                                          "stream's norm, which then misses their mean, as a post-norm stream does: "
                                          "the stream keeps whole factors")
            if match is not None:
                if not match.unique_old:
                    raise self.conflict(node, "depthwise filters on duplicated channels")
                for key, c in params.items():
                    if c is not None:
                        new[key] = ar.gather(c, 0, match.source())
        out_shape = (shape[0], len(seq)) + tuple(shape[2:])
        return LabelTensor.channels(out_shape, 1, seq, self.salt(node)), new, match

    def grouped(self, node, name: str, x: LabelTensor, old_x: LabelTensor, weight: np.ndarray, groups: int, shape):
        """Grouped conv (weight: out, in/groups, ...): every group widens inside itself.
        Returns ``(labels, new weight or None, mapping or None)``."""
        self.note_roles(x, "consumer", name)
        seq = label_channel_ids(x, 1)
        if seq is None:
            raise NotUnderstood("channels of a grouped conv input are not on axis 1")
        n_out = weight.shape[0]
        space = self.out_space(node, name, n_out)
        if self.analysis:
            self.constraints.tie_blocks(seq, groups)
            self.constraints.tie_blocks(space.chan_ids, groups)
            return LabelTensor.channels(shape, 1, space.chan_ids, self.salt(node)), None, None
        mapping = self.plan.mapping(space)
        new_w = None
        if len(mapping) != n_out or not same_labels(old_x, x):
            try:
                new_w = sites.grouped_weights(weight, groups, old_x.a, x.a, 1, n_out, mapping, self.options,
                                              self.rng)
            except Mismatch as exc:
                raise self.conflict(node, str(exc)) from None
        out_shape = (shape[0], len(mapping)) + tuple(shape[2:])
        return LabelTensor.channels(out_shape, 1, self.plan.new_chan_ids(space), self.salt(node)), new_w, mapping

    def per_channel_constant(self, node, name: str, x: LabelTensor, old_x: LabelTensor, c: np.ndarray,
                             computed: bool = False, combine: str | None = None, collapse: bool = False):
        """An activation combined elementwise with a constant ``c``: scalar-like, or one value per channel
        along one channel axis (gathered; ``computed``: ``c`` is computed in the graph, so it cannot be
        rewritten; ``combine``: "add" or "mul", how it meets ``x``; ``collapse``: ``c`` is no parameter (a folded
        constant), so a tensor over positions equal along the channel axis, a mask broadcast over heads, is
        written back with that axis 1 and broadcasts to any width; a parameter stays one value per channel).
        Returns ``(labels, new constant or None)``."""
        ref = x if self.analysis else old_x
        try:
            out_shape = np.broadcast_shapes(ref.shape, c.shape)
        except ValueError:
            raise NotUnderstood("operands do not broadcast") from None
        if tuple(out_shape) != ref.shape:
            raise NotUnderstood("the constant broadcasts the activation")
        va = ref.vary
        cb = (1,) * (x.ndim - c.ndim) + tuple(c.shape)
        along = [ax for ax in va if cb[ax] != 1]
        if not along:
            return self.elementwise(node, x), None
        if len(along) > 1 or len(va) > 1:
            raise NotUnderstood("a constant varies along several channel axes")
        if computed:
            raise NotUnderstood("its per-channel constant is computed")
        ax = along[0]
        self.note_roles(x, "carrier", name)
        new = None
        if not self.analysis:
            # channels added by fill + rescale: an added constant gets the stream's fill value (0 or the mean), a
            # multiplied one 1 (exact on normalized channels, which are 0 there; the numeric check sees the rest)
            match = self.match(node, old_x, x, ax, fills_ok=combine in ("add", "mul"))
            lead = x.ndim - c.ndim
            if collapse and match is not None and match.fills is None and _uniform_along(c, ax - lead) \
                    and sum(d > 1 for d in c.shape) > 1:
                # the same value for every channel (a mask broadcast over heads): one slice broadcasts to any width
                return self.elementwise(node, x), np.take(c, [0], axis=ax - lead)
            if match is not None:
                if not match.unique_old:
                    raise self.conflict(node, "per-channel constant on duplicated channels")
                gathered = ar.gather_fill(c.reshape(cb), ax, match.source(), self._stream_fill_kind(x),
                                          1.0 if combine == "mul" else None)
                shape = list(c.shape)
                shape[ax - lead] = match.n_new
                new = gathered.reshape(shape)
        return self.elementwise(node, x), new

    def _stream_fill_kind(self, x: LabelTensor) -> str | None:
        """The fill kind of the stream whose filled channels ``x`` carries (None without fills)."""
        if not self.plan or not self.plan.fills or not len(x.chans) or int(x.chans.max()) < self.plan.fill_start:
            return None
        fill_id = int(x.chans[x.chans >= self.plan.fill_start][0])
        for sid, base in self.plan.fill_base.items():
            if base <= fill_id < base + self.plan.fills[sid]:
                return self.plan.fill_kind[sid]
        return None

    def bare_parameter(self, node, name: str, arr: np.ndarray, axis: int, shape, label_axis: int, *,
                       gain: bool = False, suffix: str | None = None, gain_fill: float = 1.0):
        """A parameter with one axis longer than 1 that joins the stream (class token, layer scale, a bias): its
        own channel space along ``axis``, tied to whatever it meets; ``shape`` / ``label_axis``: the labels it
        enters the graph with (broadcast, an Expand). Channels fill + rescale adds take the stream's fill, or 1
        for a ``gain`` (it multiplies 0 there, and 1 keeps the new channel trainable).
        Returns ``(labels, original labels, new array or None)``."""
        space = self.out_space(node, name, arr.shape[axis], suffix)
        old = LabelTensor.channels(shape, label_axis, space.chan_ids, self.salt(node))
        if self.analysis:
            self.constraints.param_spaces.add(space.id)
            return old, old, None
        mapping = self.plan.mapping(space)
        new = None
        if len(mapping) != arr.shape[axis]:
            new = ar.gather_fill(arr, axis, mapping, self.plan.fill_kind.get(space.id), gain_fill if gain else None)
        new_shape = list(shape)
        new_shape[label_axis] = len(mapping)
        return LabelTensor.channels(new_shape, label_axis, self.plan.new_chan_ids(space), self.salt(node)), old, new

    def tied_head(self, node, name: str, x: LabelTensor, old_x: LabelTensor, table: np.ndarray, shape,
                  table_chans=None, per_channel: bool = False):
        """An output head reading the embedding table (vocab x width) it is tied to. The shared table is the
        embedding's (columns copied, never divided), so under ``k`` copies the head would return ``k`` x the
        logits: the frontend folds ``1/k`` into the norm before the head (docs/maths.md §5).
        ``table_chans``: the table's column channels, tied to the head's input channels (OPT-350m's head reads
        project_out, a space of its own, not the stream the embedding starts). ``per_channel``: the frontend can
        fold a factor per channel (a linear map before the head): unequal copy counts give ``k`` per new channel.
        Returns ``(labels, the table's new value or None, k)``."""
        self.note_roles(x, "consumer", name)
        space = self.out_space(node, name, table.shape[0])
        labels = LabelTensor.channels(shape, -1, space.chan_ids, self.salt(node))
        if self.analysis:
            seq = label_channel_ids(x, x.ndim - 1) if table_chans is not None else None
            if seq is not None and len(seq) == len(table_chans):
                self.constraints.tie(np.asarray(seq), np.asarray(table_chans))
            return labels, None, 1
        if len(self.plan.mapping(space)) != table.shape[0]:
            raise self.conflict(node, "a tied output head keeps its output width")
        match = self.match(node, old_x, x, -1, fills_ok=True)
        if match is None:
            return labels, None, 1
        copies = set(match.copies.tolist())
        gathered = ar.gather_fill(table, 1, match.source(), self._stream_fill_kind(x))
        if match.unique_old and len(copies) > 1 and per_channel and match.fills is None:
            return labels, gathered, match.copies[match.content].astype(np.float64)
        if not match.unique_old or len(copies) != 1:
            raise self.conflict(node, "an output head tied to the embedding reads only uniformly copied channels")
        return labels, gathered, copies.pop()

    # ------------------------------------------------------------ moves
    def reshape_ties(self, x: LabelTensor, out: LabelTensor, grows=None) -> None:
        """A reshape that splits a channel axis into blocks ties the blocks positionwise. ``grows`` (per output
        axis, where the family says which axes follow its heads): outer block axes that keep their size are a
        fixed block count (CodeGen's ``mp_num``), so every block grows inside alike, heads or not (as a grouped
        conv's groups); the tie stays where heads are copied as units."""
        if self.analysis:
            va = out.vary
            fixed = grows is not None and len(grows) == out.ndim and len(va) >= 2 and grows[va[-1]] \
                and not any(grows[a] for a in va[:-1])
            for a, b in split_axis_ties(x, out):
                if fixed:  # (dropped where a split into equal pieces follows: see equal_piece_ties)
                    self.constraints.tie(a, b, key=("blocks", int(self.table.space_ids_of(a[:1])[0])))
                else:
                    self.constraints.tie_split(a, b)
            if fixed:
                spaces = self.table.spaces_of(out.chans)
                if len(spaces) == 1 and len(va) == 2 and out.shape[va[0]] > 1:
                    self.constraints.fixed_blocks[spaces[0].id] = int(out.shape[va[0]])
                return
            if len(va) >= 3 and len(x.vary) < len(va):
                self.constraints.split_outer(out.chans, int(np.prod([out.shape[a] for a in va[1:]])))

    def equal_piece_ties(self, pieces: list) -> None:
        """Equal pieces of a split or chunk take the same fraction of the new width: they widen alike."""
        if self.analysis and len(pieces) > 1 and len({p.shape for p in pieces}) == 1:
            for p in pieces[1:]:
                self.constraints.tie(channel_of(pieces[0].a), channel_of(p.a))
            self._block_pieces(pieces)

    def _block_pieces(self, pieces: list) -> None:
        """Equal pieces cut from every block of a fixed block count (CodeGen's ``[q | v | k]`` in each of its
        ``mp_num`` blocks): each piece is read across the blocks (q is every block's q part, then cut into heads),
        so the space is laid out ``(blocks, pieces, local)`` with heads running over ``(blocks, local)``: the plan
        copies heads in that order and cuts each piece's new sequence back into the blocks (``block_layouts``);
        the blocks need not keep their heads, nor grow alike (their position-by-position ties are dropped)."""
        c = self.constraints
        if not c.fixed_blocks or any(p.elem is not None or len(p.vary) != 2 for p in pieces):
            return
        grids = [channel_of(p.a[tuple(slice(None) if a in p.vary else 0 for a in range(p.ndim))]) for p in pieces]
        spaces = self.table.spaces_of(np.concatenate([g.ravel() for g in grids]))
        if len(spaces) != 1 or spaces[0].id not in c.fixed_blocks:
            return
        sp, m = spaces[0], c.fixed_blocks[spaces[0].id]
        n_p = len(pieces)
        grids = [g.reshape(m, -1) - sp.base for g in grids]
        local = grids[0].shape[1]
        want = (np.arange(m)[:, None] * (n_p * local) + np.arange(local)[None, :])
        if sp.size != m * n_p * local or any(not np.array_equal(g, want + k * local) for k, g in enumerate(grids)):
            return
        c.block_layouts[sp.id] = (m, n_p)
        c.untie(("blocks", sp.id))

    def concat_positions(self, node, pieces: list, old_pieces: list, axis: int):
        """A concatenation along a position axis of pieces whose channels lie along one common other axis
        (a class token put before the patch tokens): the pieces' channels are tied position by position and
        the result is labelled with the channels of the longest piece. None when it does not apply."""
        refs = pieces if self.analysis else old_pieces
        if len(pieces) < 2 or any(not isinstance(p, LabelTensor) for p in list(pieces) + list(refs)):
            return None
        vary = {tuple(p.vary) for p in refs}
        if len(vary) != 1 or len(next(iter(vary))) != 1 or next(iter(vary))[0] == axis % refs[0].ndim:
            return None
        c = next(iter(vary))[0]
        seqs = [label_channel_ids(p, c) for p in refs]
        if any(s is None for s in seqs) or len({len(s) for s in seqs}) != 1:
            return None
        canon = max(range(len(refs)), key=lambda i: refs[i].shape[axis])
        shape = list(refs[0].shape)
        shape[axis] = sum(p.shape[axis] for p in refs)
        if self.analysis:
            for s in seqs[1:]:
                self.constraints.tie(seqs[0], s)
            return LabelTensor.channels(shape, c, seqs[canon], self.salt(node))
        try:
            srcs = [match_with_fills(o, n, c, "concatenated piece", self.plan.fill_start).source()
                    for o, n in zip(old_pieces, pieces)]
        except Mismatch as exc:
            raise self.conflict(node, str(exc)) from None
        new_seqs = [label_channel_ids(p, c) for p in pieces]
        fill = srcs[0] < 0
        if any(s is None or not np.array_equal(srcs[0], t) or not np.array_equal(s[fill], new_seqs[0][fill])
               for s, t in zip(new_seqs, srcs)):
            raise self.conflict(node, "the concatenated pieces no longer pair their channels")
        shape[c] = len(srcs[0])
        shape[axis] = sum(p.shape[axis] for p in pieces)
        return LabelTensor.channels(shape, c, new_seqs[canon], self.salt(node))

    def axis_source(self, node, old: LabelTensor, new: LabelTensor, axis: int) -> np.ndarray:
        """The old index of every new slice along ``axis`` of a moved input."""
        try:
            return match_labels(old, new, axis, "sliced input").source()
        except Mismatch as exc:
            raise self.conflict(node, str(exc)) from None

    def remap_bound(self, node, src: np.ndarray, bound: int) -> int:
        try:
            return sites.remap_bound(src, bound)
        except Mismatch as exc:
            raise self.conflict(node, str(exc)) from None

    def remap_sizes(self, node, old: LabelTensor, new: LabelTensor, axis: int, sizes) -> list:
        """Literal piece sizes (a split's) along ``axis`` of a moved input, in the widened configuration:
        each piece takes every copy of its channels."""
        src = self.axis_source(node, old, new, axis)
        bounds = [self.remap_bound(node, src, int(b)) for b in np.cumsum([0] + list(sizes))]
        return [int(bounds[i + 1] - bounds[i]) for i in range(len(sizes))]

    def rescale_shape(self, node, raw: list, old_out: LabelTensor, old_numel: int, new_numel: int):
        spaces = self.table.spaces_of(old_out.chans) if old_out.elem is None else []
        units = {self.constraints.unit_size.get(sp.id, 1) for sp in spaces}
        layout = getattr(self.plan, "layout", None) or {}
        blocks = {layout.get(sp.id, self.constraints.unit_size.get(sp.id, 1)) for sp in spaces}
        try:
            return sites.rescale_shape(raw, old_out.vary, old_numel, new_numel, old_out.shape,
                                       units.pop() if len(units) == 1 else 1,
                                       blocks.pop() if len(blocks) == 1 else 1)
        except Mismatch as exc:
            raise self.conflict(node, str(exc)) from None

    # ------------------------------------------------------------ outputs
    def model_output(self, old: LabelTensor | None, new: LabelTensor, node=None, what: str = "a model output"):
        """Channels reaching a model output keep their width (analysis); they must be unchanged (apply)."""
        if self.analysis:
            self.constraints.freeze(new.chans, "reaches a model output")
        elif not same_labels(old, new):
            chans = old.chans if old is not None else np.zeros(0, np.int64)
            raise Conflict(node, chans, f"{what} changed")


def _uniform_along(c: np.ndarray, axis: int) -> bool:
    """Whether ``c`` holds one value along ``axis`` (a -inf mask too; NaN never compares equal)."""
    first = np.take(c, [0], axis=axis)
    return bool(np.all(c == first))


def free_upstream(start: list, parents, labels_of, frozen: np.ndarray) -> np.ndarray:
    """Free channels upstream of a conflict whose own channels are all frozen (to escalate it): a
    depth-first walk from ``start`` over ``parents(key)``; the first value whose labels
    (``labels_of(key)``: label tensors) hold free channels gives them."""
    seen, todo = set(), list(start)
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        chans = [x.chans for x in labels_of(key)]
        if chans:
            c = np.unique(np.concatenate(chans))
            free = c[~frozen[c]]
            if len(free):
                return free
        todo.extend(parents(key))
    return np.zeros(0, np.int64)
