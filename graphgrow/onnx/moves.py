"""Data-movement ops of an ONNX graph replayed on label arrays (a part of :class:`OnnxLabelRun`).

Reshape, Transpose, Concat, Split, Slice, Gather, ... run through onnx's reference evaluator on the
labels (on a one-byte stand-in of the input's shape where the compact label form survives the move);
in the widened configuration the literal constants they read (reshape targets, split sizes, slice
bounds) are rewritten to the new width.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..core.label_tensor import LabelTensor, concatenated, gathered, keeps_order, reshaped, same_labels
from ..core.labels import channel_sequence
from . import ops
from .reference import evaluate


class MoveReplay:
    """The moves of :class:`~graphgrow.onnx.labeling.OnnxLabelRun` (a mixin: it uses the run's state)."""

    def _move(self, idx, node, vals, a):
        op = node.op_type
        if op == "Concat" and "axis" in a:  # pieces factored along the axis: their parts are concatenated
            out = concatenated(vals, int(a["axis"]))
            if out is not None:
                return [out]
        x0 = vals[0] if vals and isinstance(vals[0], LabelTensor) else None
        # a reshape keeps the C order of the elements: it is replayed on a stand-in of the input's shape
        # (one byte per element), and element labels stay element labels of the new shape
        compact = x0 is not None and (x0.elem is not None or x0.factors() is not None)
        perm = None
        if op == "Transpose" and compact:  # (onnx's default perm reverses the axes)
            perm = [int(p) % x0.ndim for p in a["perm"]] if a.get("perm") is not None else list(range(x0.ndim))[::-1]
        reshaping = compact and (op in ops.RESHAPES or perm is not None and keeps_order(x0, perm))
        gathering = (op == "Gather" and compact and x0.elem is None and len(vals) > 1
                     and isinstance(vals[1], np.ndarray) and len(node.output) == 1)
        ins = []
        for k, v in enumerate(vals):
            if v is None:
                ins.append(None)
            elif isinstance(v, LabelTensor):
                ins.append(np.zeros(v.shape, np.bool_) if k == 0 and (reshaping or gathering) else v.a)
            elif op == "Concat":
                ins.append(self._fixed((idx, "const", k), v.shape).a)  # a constant joined to activations
            else:
                ins.append(v)
        run_node = node
        if not self.analysis:
            ins, run_node = self._rewrite_move(idx, node, vals, ins, a)
        try:
            outs = evaluate(self.opset, self.model, run_node, ins, idx)
        except Exception as exc:  # noqa: BLE001
            if self.analysis:
                return self._opaque(idx, node, f"could not be replayed on channel labels ({type(exc).__name__})")
            raise self._conflict(idx, node, "cannot be replayed on the widened tensors") from None
        if reshaping or gathering:
            # the stand-in gave the output shape; a gather of constant indices along a channel axis picks parts
            out = (reshaped(x0, np.shape(outs[0]), perm) if reshaping
                   else gathered(x0, int(a.get("axis", 0)) % x0.ndim, ins[1], np.shape(outs[0])))
            if out is None:  # the compact form does not survive (channel and position axes mix): full labels
                ins[0] = x0.a
                outs = evaluate(self.opset, self.model, run_node, ins, idx)
            else:
                outs = [out]
        outs = [o if isinstance(o, LabelTensor) else LabelTensor(np.asarray(o)) for o in outs]
        if self.analysis and isinstance(vals[0], LabelTensor):
            if op in ("Reshape",) and len(outs) == 1:
                self.reshape_ties(vals[0], outs[0])
            if op == "Slice" and self.opset >= 10 and any(n in self.dynamic for n in node.input[1:3]):
                self._chunk_ties(vals)
            if op == "Split":
                self.equal_piece_ties(outs)
        return outs

    def _chunk_ties(self, vals):
        """A slice whose bounds are computed from the input's size (torch's chunk exported as Slice):
        in the widened graph it takes the same fraction, so the equal blocks it cuts must widen alike."""
        x = vals[0]
        starts, ends = np.asarray(vals[1]).ravel(), np.asarray(vals[2]).ravel()
        axes = np.asarray(vals[3]).ravel() if len(vals) > 3 and vals[3] is not None else np.arange(len(starts))
        for i, ax in enumerate(axes.tolist()):
            ax = ax % x.ndim
            n = x.shape[ax]
            s, e, step = slice(int(starts[i]), int(ends[i])).indices(n)
            length = e - s
            seq = channel_sequence(x.a, ax)
            if seq is None or length <= 0 or length == n or n % length or s % length:
                continue
            self.constraints.tie_blocks(seq, n // length)

    def _rewrite_move(self, idx, node, vals, ins, a):
        """Rewrite channel constants written as literals (reshape targets, split sizes, slice bounds)."""
        op = node.op_type
        x = vals[0]
        if not isinstance(x, LabelTensor):
            return ins, node
        old_in = self.old[node.input[0]]
        if same_labels(old_in, x):
            return ins, node
        if op == "Reshape" and len(node.input) > 1 and node.input[1] in self.dynamic:
            self._rewrite_concat_shape(idx, node, vals, ins, a, old_in, x)
        elif op == "Reshape" and len(node.input) > 1 and node.input[1] not in self.dynamic:
            shape = np.asarray(vals[1])
            old_out = self.old[node.output[0]]
            allowzero = a.get("allowzero", 0)
            raw = [None if (d == 0 and not allowzero) else int(d) for d in shape.tolist()]
            dims = self.rescale_shape((idx, node), raw, old_out, int(np.prod(old_in.shape)), int(np.prod(x.shape)))
            if dims is not None:
                new = np.array([d if d is not None else 0 for d in dims], dtype=np.int64)
                self._set_const(idx, 1, new, shape=True)
                ins[1] = new
        elif op == "Split":
            axis = a.get("axis", 0) % x.ndim
            sizes = a.get("split")
            from_input = sizes is None and len(node.input) > 1 and node.input[1]
            if from_input:
                if node.input[1] in self.dynamic:
                    return ins, node
                sizes = [int(v) for v in np.asarray(vals[1]).ravel()]
            if sizes is not None and old_in.shape[axis] != x.shape[axis]:
                new = self.remap_sizes((idx, node), old_in, x, axis, sizes)
                if from_input:
                    self._set_const(idx, 1, np.array(new, dtype=np.int64), shape=True)
                    ins[1] = np.array(new, dtype=np.int64)
                else:
                    self.updates.attributes.setdefault(idx, {})["split"] = new
                    node = with_attribute(node, "split", new)
        elif op == "Slice" and self.opset >= 10:
            starts, ends = np.asarray(vals[1]).copy(), np.asarray(vals[2]).copy()
            axes = np.asarray(vals[3]) if len(vals) > 3 and vals[3] is not None else np.arange(len(starts))
            steps = np.asarray(vals[4]) if len(vals) > 4 and vals[4] is not None else np.ones(len(starts), np.int64)
            changed = False
            for i, ax in enumerate(axes.tolist()):
                ax = ax % x.ndim
                if old_in.shape[ax] == x.shape[ax]:
                    continue
                if steps[i] != 1:
                    raise self._conflict(idx, node, "strided slicing of a widened axis")
                if any(n in self.dynamic for n in node.input[1:3]):
                    continue
                n_old = old_in.shape[ax]
                s, e, _ = slice(int(starts[i]), int(ends[i])).indices(n_old)
                src = self.axis_source((idx, node), old_in, x, ax)
                starts[i], ends[i] = self.remap_bound((idx, node), src, s), self.remap_bound((idx, node), src, e)
                changed = True
            if changed:
                self._set_const(idx, 1, starts.astype(np.asarray(vals[1]).dtype), shape=True)
                self._set_const(idx, 2, ends.astype(np.asarray(vals[2]).dtype), shape=True)
                ins[1], ins[2] = starts, ends
        elif op == "Expand" and len(node.input) > 1 and node.input[1] not in self.dynamic:
            # a broadcast target written as literals (repeat_kv's [b, kv_heads, groups, t, head_dim])
            shape = np.asarray(vals[1]).astype(np.int64).copy()
            off = len(shape) - x.ndim
            changed = False
            for ax in range(x.ndim):
                if old_in.shape[ax] == x.shape[ax] or ax + off < 0:
                    continue
                if int(shape[ax + off]) == old_in.shape[ax]:
                    shape[ax + off], changed = x.shape[ax], True
                elif int(shape[ax + off]) not in (1, -1):
                    raise self._conflict(idx, node, "its broadcast target cannot follow the new width")
            if changed:
                self._set_const(idx, 1, shape, shape=True)
                ins[1] = shape
        elif op == "Gather":
            axis = a.get("axis", 0) % x.ndim
            if old_in.shape[axis] != x.shape[axis]:
                raise self._conflict(idx, node, "gathers along a widened axis")
        return ins, node


    def _rewrite_concat_shape(self, idx, node, vals, ins, a, old_in, x):
        """A reshape target concatenated from sizes read off the input (dynamic) and literal sizes (torch's
        unflatten(-1, (3, embed_dim)) exported): the literal piece that counts channels is rewritten."""
        j = self.producer.get(node.input[1])
        cat = self.graph.node[j] if j is not None else None
        if cat is None or cat.op_type != "Concat" or a.get("allowzero", 0):
            return
        pieces, raw = [], []
        for k, name in enumerate(cat.input):
            v = np.asarray(self.env.get(name)).reshape(-1)
            dynamic = name in self.dynamic
            pieces.append((k, name, dynamic, v))
            raw += [None] * len(v) if dynamic else [None if d == 0 else int(d) for d in v.tolist()]
        old_out = self.old[node.output[0]]
        dims = self.rescale_shape((idx, node), raw, old_out, int(np.prod(old_in.shape)), int(np.prod(x.shape)))
        if dims is None:
            return
        pos, out = 0, []
        for k, name, dynamic, v in pieces:
            if not dynamic and dims[pos:pos + len(v)] != raw[pos:pos + len(v)]:
                v = np.array([d if d is not None else 0 for d in dims[pos:pos + len(v)]], dtype=v.dtype)
                self._set_const(j, k, v, shape=True)
            out.append(v)
            pos += len(v)
        ins[1] = np.concatenate(out).astype(np.int64)


def with_attribute(node, name, ints):
    out = onnx.NodeProto()
    out.CopyFrom(node)
    for at in out.attribute:
        if at.name == name:
            del at.ints[:]
            at.ints.extend(int(v) for v in ints)
    return out
