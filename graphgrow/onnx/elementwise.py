"""Elementwise, logical and positional ops of an ONNX graph (a part of :class:`OnnxLabelRun`).

Exported attention guards fully masked rows with ``Where(IsNaN(p), 0, p)`` and builds its masks from
comparisons, ``Not`` / ``And`` / ``Or``, ``Trilu`` and ``CumSum``.  Every one of them acts element by element
(or along position axes only), so a widened channel that copies an original one holds a copy of its value:
they pass channels through like ``Add`` does (the core's ``unify``, ``per_channel_constant``,
``elementwise``).  Ops whose inputs carry no channels (masks and positions computed from the token ids) give
tensors without channels, whatever they compute.
"""

from __future__ import annotations

import numpy as np

from ..core.label_tensor import LabelTensor
from ..core.relations import NotUnderstood
from . import ops


class ElementwiseOps:
    """The ops of :data:`graphgrow.onnx.ops.CONSTANT_CLOSED`, ``Where``, ``Trilu`` and ``CumSum`` (a mixin of
    :class:`~graphgrow.onnx.labeling.OnnxLabelRun`: it uses the run's state)."""

    def _without_channels(self, node, vals) -> bool:
        """Every activation the node reads is without channel structure (model inputs, masks computed from
        them): decided on the original labels, so the analysis and every apply run agree."""
        labeled = False
        for name, v in zip(node.input, vals):
            if not isinstance(v, LabelTensor):
                continue
            labeled = True
            if not self.is_constant_labels(v if self.analysis else self.old.get(name)):
                return False
        return labeled

    def _constant_result(self, idx, node, vals):
        """Outputs without channels of an op reading only tensors without channels.  Their shape: the
        broadcast of the inputs for elementwise ops (it follows a mask expanded to more heads); the
        original's otherwise (Range, ConstantOfShape: their shape is a value)."""
        shape = None
        if node.op_type in ops.SHAPE_OF_INPUTS:
            try:
                shape = tuple(np.broadcast_shapes(*[np.shape(v) if not isinstance(v, LabelTensor) else v.shape
                                                    for v in vals if v is not None]))
            except ValueError:
                shape = None
        outs = []
        for k, name in enumerate(node.output):
            s = shape if shape is not None and k == 0 else self.shapes.get(name)
            outs.append(self._fixed((idx, k), tuple(s)) if name and s is not None else None)
        return outs

    def _where(self, idx, node, vals):
        """``Where(cond, a, b)``: the activations among the three pair their channels like an add's operands;
        a constant operand is scalar-like or one value per channel (gathered)."""
        labeled = [k for k, v in enumerate(vals) if isinstance(v, LabelTensor)]
        if any(v is None for v in vals):
            return self._opaque(idx, node, "missing operand")
        try:
            out_shape = tuple(np.broadcast_shapes(*[v.shape for v in vals]))
        except ValueError:
            if self.analysis:
                return self._opaque(idx, node, "operands do not broadcast")
            raise self._conflict(idx, node, "operands no longer broadcast") from None
        full = next((k for k in labeled if vals[k].shape == out_shape), None)
        if full is None:
            return self._opaque(idx, node, "no activation operand has the result's shape (a constant broadcasts it)")
        operands = [(None if self.analysis else self.old[node.input[k]], vals[k]) for k in labeled]
        out = self.unify((idx, node), operands, labeled.index(full))
        ref = self._old_input(node, full, vals[full])
        for k, c in enumerate(vals):
            if isinstance(c, LabelTensor):
                continue
            try:
                _, new = self.per_channel_constant((idx, node), f"{node.op_type}:{node.input[k]}", vals[full], ref,
                                                   np.asarray(c), computed=not self._weight_ok(idx, node, [k]),
                                                   collapse=node.input[k] not in self.consts)
            except NotUnderstood as exc:
                return self._opaque(idx, node, str(exc))
            if new is not None:
                self._set_const(idx, k, new)
        return [out]

    def _positional(self, idx, node, vals, a):
        """``Trilu`` (the last two axes) and ``CumSum`` (one axis): per channel while the axes they act along
        hold positions, not channels."""
        x = vals[0]
        if not isinstance(x, LabelTensor) or any(isinstance(v, LabelTensor) for v in vals[1:]):
            return self._opaque(idx, node, "its parameter input is an activation")
        if node.op_type == "Trilu":
            axes = [x.ndim - 2, x.ndim - 1]
        else:
            axis = self._const(node, 1)
            if axis is None:
                return self._opaque(idx, node, "its axis is computed")
            axes = [int(np.asarray(axis).ravel()[0]) % x.ndim]
        if self.mixes(x, self._old_input(node, 0, x), axes):
            return self._mix(idx, node, x, f"{node.op_type} along a channel axis")
        return [self.elementwise((idx, node), x)]
