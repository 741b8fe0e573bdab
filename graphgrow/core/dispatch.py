"""Index dispatch relations (docs/maths.md §8): the token moves of a mixture of experts.

A sparse mixture of experts sends every token to the experts its router chose: the stream's rows are
gathered by indices computed from the data (``hidden[perm // top_k]``), each expert's MLP reads its rows,
and the results are gathered back into token order (``out[inv_perm]``) or scattered into it
(``index_add_``, ``index_put_``). Every one of these ops moves whole rows along a *position* axis by
indices that carry no channel: the channels pass through unchanged, so the widened stream needs nothing
but the same indices.  They are exact as long as the indices are unchanged, which holds when they are
computed from channel-free values (the router's top-k over its frozen expert count, reason (f)); the
numeric verification sees the rest.

Experts stored as one stacked parameter ``[E, in, out]`` (read by a grouped matrix product) are producers
like a linear map: every expert's slice reads the same input space and writes the same output space, so
one plan grows all experts alike (one config field states their width).
"""

from __future__ import annotations

import numpy as np

from .growth import NotUnderstood
from .label_tensor import LabelTensor, same_labels
from .labels import POS_MASK


GATE_REASON = ("a gate's single output, broadcast over the channels it scales (a shared expert's gate: one value per "
               "token, like a router's expert count)")


def _dense_factors(x: LabelTensor):
    """``(channel axes, their part)`` of element-wise labels whose channel and salt do not change along the other
    axes (JetMoE's attention output, its chosen-expert slots merged into the token rows by a reshape), else
    None: the compact form the gather needs, read off the dense labels."""
    cax = tuple(x.vary)
    hi = x.a & ~np.int64(POS_MASK)
    part = hi[tuple(slice(None) if i in cax else 0 for i in range(x.ndim))]
    full = part.reshape([x.shape[i] if i in cax else 1 for i in range(x.ndim)])
    return (cax, np.ascontiguousarray(part)) if np.array_equal(np.broadcast_to(full, hi.shape), hi) else None


class DispatchRelations:
    """Mixin of :class:`~graphgrow.core.relations.RelationRun`: index dispatch along position axes."""

    def gather_positions(self, node, x: LabelTensor, old_x: LabelTensor, first: int, n_axes: int,
                         index_shape) -> LabelTensor:
        """``x`` indexed along the position axes ``first .. first + n_axes - 1`` by index tensors of the
        (broadcast) shape ``index_shape`` that carry no channel (a token gather or its inverse): each result
        element is an element of ``x`` from the same channel, so the channel part is kept and the positions
        are renumbered.  A gather along a channel axis with computed indices is not understood."""
        ref = x if self.analysis else old_x
        axes = set(range(first, first + n_axes))
        if axes & set(ref.vary):
            raise NotUnderstood("it gathers along a channel axis with indices computed from the data")
        shape = tuple(x.shape[:first]) + tuple(index_shape) + tuple(x.shape[first + n_axes:])
        if x.elem is not None:  # no channel structure: a new channel-free tensor of the result's shape
            return self.elementwise(node, LabelTensor.element(shape, x.elem[0], x.elem[1]))
        if not self.analysis and any(x.shape[a] != old_x.shape[a] for a in axes):
            raise self.conflict(node, "the gathered position axis changed length")
        f = x.factors() or _dense_factors(x)
        if f is None:
            raise NotUnderstood("its input's channels are not constant along the positions it gathers")
        cax, part = f
        shift = len(index_shape) - n_axes
        return self.elementwise(node, LabelTensor.multi(shape, [c if c < first else c + shift for c in cax], part))

    def gather_along(self, node, x: LabelTensor, old_x: LabelTensor, dim: int, index_shape) -> LabelTensor:
        """``torch.gather(x, dim, index)`` along a position axis by an index that carries no channel and holds the
        same values along x's channel axes (DeBERTa's relative positions, expanded over its (batch x heads) axis):
        result element ``(.., i, ..)`` is x's element ``(.., index[..], ..)`` of the same channel, so the channels
        pass through; on the channel axes the result takes x's (widened) size, on the others the index's."""
        ref = x if self.analysis else old_x
        dim %= ref.ndim
        if dim in ref.vary:
            raise NotUnderstood("it gathers along a channel axis")
        shape = list(index_shape)
        if len(shape) != ref.ndim or any(shape[a] != ref.shape[a] for a in ref.vary):
            raise NotUnderstood("its index does not cover every channel of the tensor it gathers from")
        for a in ref.vary:
            shape[a] = x.shape[a]
        if not self.analysis and x.shape[dim] != old_x.shape[dim]:
            raise self.conflict(node, "the gathered position axis changed length")
        if x.elem is not None:
            return self.elementwise(node, LabelTensor.element(tuple(shape), x.elem[0], x.elem[1]))
        f = x.factors() or _dense_factors(x)
        if f is None:
            raise NotUnderstood("its input's channels are not constant along the positions it gathers")
        return self.elementwise(node, LabelTensor.multi(tuple(shape), f[0], f[1]))

    def broadcast_gate(self, node, gate: LabelTensor, old_gate: LabelTensor | None, x: LabelTensor) -> LabelTensor:
        """``x`` times a gate of one channel broadcast over x's channel axes (Qwen2-MoE's
        ``sigmoid(shared_expert_gate(h)) * shared_expert(h)``): every channel of a position is scaled by the
        same value, so copies stay copies and no tie is needed; the gate's one output keeps its width."""
        if self.analysis:
            self.constraints.freeze(gate.chans, f"{self.site(node)}: {GATE_REASON}")
        elif not same_labels(old_gate, gate):
            raise self.conflict(node, "a broadcast gate changed")
        return self.elementwise(node, x)
