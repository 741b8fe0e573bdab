"""Data-movement ops of a torch.fx graph replayed on labels (a part of :class:`FxLabelRun`).

torch executes every move (view, reshape, permute, cat, split, chunk, getitem, ...) on the label
arrays; a reshape or an order-keeping permutation of compact labels runs on a stand-in on the meta
device instead, which gives the output's shape (and axis order) without building the labels.  In the
widened configuration the literal channel constants a move reads (view sizes, split sizes, slice
bounds) are rewritten to the new width.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from ..core.label_tensor import LabelTensor, concatenated, keeps_order, reshaped, same_labels
from ..core.relations import NotUnderstood
from . import ops

# node.meta key of a reshape the family was asked about (graphgrow.hf.family_axes): per output axis, whether the
# family's own code makes it grow with the heads (a fixed block count keeps its size, the blocks grow inside)
FAMILY_AXES = "graphgrow_family_axes"
RESHAPES = ops.SPLITTING_MOVES


def label_leaves(tree) -> list:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, LabelTensor)]


def as_torch(v):
    return torch.from_numpy(v.a) if isinstance(v, LabelTensor) else v


def as_labels(v):
    return LabelTensor(v.contiguous().numpy()) if isinstance(v, torch.Tensor) else v


def merged_dims(raw: list, old_shape, new_shape):
    """New literal dims of a reshape that only merges runs of consecutive input axes (repeat_kv's
    ``(kv, n_rep) -> heads``), one output dim per run: each dim is its run's product in the widened input.
    Size-1 input axes join the run after them (the heads-major order). None when the reshape is not a
    pure merge of literal dims, or when no merged axis changed."""
    if any(not isinstance(r, (int, np.integer)) or r < 1 for r in raw) or len(raw) >= len(old_shape) \
            or len(old_shape) != len(new_shape):
        return None
    out, i = [], 0
    for r in raw:
        run_old, run_new = 1, 1
        while i < len(old_shape) and (run_old < r or r == 1 == old_shape[i]):
            run_old, run_new = run_old * old_shape[i], run_new * new_shape[i]
            i += 1
            if r == 1:  # (a dim of 1 takes one input axis of 1)
                break
        if run_old != r:
            return None
        out.append(run_new)
    while i < len(old_shape) and old_shape[i] == 1 and out:  # trailing size-1 axes: the last run
        out[-1] *= new_shape[i]
        i += 1
    if i != len(old_shape) or out == list(raw):
        return None
    return out


def split_dims(raw: list, old_shape, new_shape):
    """New literal dims of a reshape that keeps the input's leading axes as they are (written as their old
    sizes) and only splits the axes after them, which kept their sizes (DeepSeek-V2's complex rotary
    ``x.reshape(*x.shape[:-1], -1, 2)``: the head count is a literal there): the leading dims follow the widened
    input. None when the reshape is not of that form or nothing changes."""
    k = next((i for i in range(len(old_shape)) if i >= len(raw) or raw[i] != old_shape[i]), len(old_shape))
    if k == 0 or k >= len(raw) or any(not isinstance(r, (int, np.integer)) or r < -1 or r == 0 for r in raw) \
            or len(old_shape) != len(new_shape) or tuple(old_shape[k:]) != tuple(new_shape[k:]) \
            or tuple(old_shape[:k]) == tuple(new_shape[:k]) or k == len(old_shape):
        return None
    tail = [r for r in raw[k:] if r != -1]
    if int(np.prod(tail)) == 0 or int(np.prod(old_shape[k:])) % int(np.prod(tail)):
        return None
    return list(new_shape[:k]) + list(raw[k:])


class MoveReplay:
    """The moves of :class:`~graphgrow.fx.labeling.FxLabelRun` (a mixin: it uses the run's state)."""

    def _move(self, node, target, args, kwargs):
        if isinstance(target, nn.Module):
            fn, kind = target, ("reshape" if isinstance(target, (nn.Flatten, nn.Unflatten)) else None)
        elif isinstance(target, str):
            fn, kind = (lambda *a, **k: getattr(a[0], target)(*a[1:], **k)), ops.MOVE_KINDS.get(target)
        else:
            fn, kind = target, ops.MOVE_KINDS.get(target)
        if not self.analysis:
            args, kwargs = self._rewrite_move_args(node, target, args, kwargs)
        if kind == "concat" and args and isinstance(args[0], (list, tuple)) and len(args) <= 2 \
                and set(kwargs) <= {"dim"}:
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            olds = [self._old(a) for a in node.args[0]] if not self.analysis else list(args[0])
            out = self.concat_positions(node, list(args[0]), olds, dim) if isinstance(dim, int) else None
            if out is not None:
                return out
        try:
            out = self._compact_move(fn, kind, args, kwargs)
            if out is None:
                out = tree_map(as_labels, fn(*tree_map(as_torch, args), **tree_map(as_torch, kwargs)))
        except Exception as exc:  # noqa: BLE001 - a failing move in the new configuration is a conflict
            if self.analysis:
                raise NotUnderstood(f"could not be replayed on channel labels ({exc})") from None
            raise self.conflict(node, f"cannot be replayed on the widened tensors ({str(exc).splitlines()[0]})") \
                from None
        outs = label_leaves(out)
        if self.analysis and isinstance(args[0], LabelTensor):
            if target in ops.SPLITTING_MOVES and len(outs) == 1:
                self.reshape_ties(args[0], outs[0], node.meta.get(FAMILY_AXES))
            elif target in ops.PIECE_MOVES:
                self.equal_piece_ties(outs)
        return out

    @staticmethod
    def _compact_move(fn, kind, args, kwargs):
        """A reshape or an order-keeping permutation of compact labels, without building them: the op runs
        on a stand-in for the output's shape (and, for permutations, the axis order); a concatenation of
        pieces factored along its axis concatenates their parts."""
        if kind == "concat":
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            pieces = args[0] if args else None
            if isinstance(pieces, (list, tuple)) and isinstance(dim, int) and len(args) <= 2:
                return concatenated(list(pieces), dim)
            return None
        x = args[0] if args else None
        if kind is None or not isinstance(x, LabelTensor) or x.elem is None and x.factors() is None \
                or label_leaves((args[1:], kwargs)):
            return None
        if kind == "reshape":
            out = fn(torch.empty(x.shape, device="meta"), *args[1:], **kwargs)
            return reshaped(x, tuple(out.shape))
        probe = fn(torch.empty(tuple(range(2, 2 + x.ndim)), device="meta"), *args[1:], **kwargs)
        perm = [d - 2 for d in probe.shape]
        if sorted(perm) != list(range(x.ndim)) or not keeps_order(x, perm):
            return None
        return reshaped(x, tuple(x.shape[p] for p in perm), perm)

    def _rewrite_move_args(self, node, target, args, kwargs):
        """Rewrite channel constants written as literals (view sizes, split sizes)."""
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        old_in, new_in = self._old(src), args[0] if args else None
        if old_in is None or not isinstance(new_in, LabelTensor) or same_labels(old_in, new_in):
            return args, kwargs
        new_args = list(args)
        if target in ("view", "reshape", torch.reshape):
            nested = target == torch.reshape or len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
            raw = list(node.args[1]) if nested else list(node.args[1:])
            vals = list(args[1]) if nested else list(args[1:])
            raw_dims = [None if isinstance(r, fx.Node) else r for r in raw]
            dims = self.family_dims(node, raw_dims, self.old[node], int(np.prod(new_in.shape)))
            if dims is None:
                dims = merged_dims(raw_dims, old_in.shape, new_in.shape)
            if dims is None:
                dims = split_dims(raw_dims, old_in.shape, new_in.shape)
            if dims is None:
                dims = self.rescale_shape(node, raw_dims, self.old[node], int(np.prod(old_in.shape)),
                                          int(np.prod(new_in.shape)))
            if dims is None:
                return args, kwargs
            vals = [v if d is None else d for v, d in zip(vals, dims)]
            new_args = [args[0], tuple(vals)] if nested else [args[0]] + vals
        elif target == "expand":
            nested = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
            vals = list(args[1]) if nested else list(args[1:])
            lead = len(vals) - old_in.ndim
            # an axis the input already has at full size keeps following it (-1 or its old size); broadcast axes
            # (size 1 in the input) and new leading axes keep their literal size
            # (an axis of size 1 that grew, one key/value head copied with its query group, follows it too)
            new_vals = [v if i < lead or not isinstance(v, int) or v == -1 or v != old_in.shape[i - lead]
                        or old_in.shape[i - lead] == 1 == new_in.shape[i - lead] else new_in.shape[i - lead]
                        for i, v in enumerate(vals)]
            if new_vals == vals:
                return args, kwargs
            new_args = [args[0], new_vals] if nested else [args[0]] + new_vals
        elif target in ("split", torch.split):
            size = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            if isinstance(size, (list, tuple)) and all(isinstance(s, int) for s in size) \
                    and old_in.shape[dim] == new_in.shape[dim]:
                return args, kwargs  # (another axis grew: the heads of DeepSeek's query split into its two parts)
            if isinstance(size, (list, tuple)) and all(isinstance(s, int) for s in size):
                new_sizes = self.remap_sizes(node, old_in, new_in, dim, size)
                if new_sizes == list(size):
                    return args, kwargs
                new_args[1] = new_sizes
            elif isinstance(size, int) and old_in.shape[dim] != new_in.shape[dim]:
                pieces = -(-old_in.shape[dim] // size)
                if old_in.shape[dim] % size or new_in.shape[dim] % pieces:
                    raise self.conflict(node, "its split size cannot follow the new width")
                new_args[1] = new_in.shape[dim] // pieces
            else:
                return args, kwargs
        else:
            return args, kwargs
        graph_args = [orig if isinstance(orig, fx.Node) else v for orig, v in zip(node.args, new_args)]
        self.arg_updates[node] = (tuple(graph_args), node.kwargs)
        return tuple(new_args), kwargs

    def family_dims(self, node, raw: list, old_out: LabelTensor, new_numel: int):
        """New literal dims of a reshape whose outer channel axes the family keeps (:data:`FAMILY_AXES`: CodeGen's
        ``mp_num`` blocks) while its inner channel axis grows: that axis takes the rest. None when the reshape was
        not marked so."""
        grows = node.meta.get(FAMILY_AXES)
        va = [a for a in old_out.vary] if old_out.elem is None else []
        if not grows or len(grows) != old_out.ndim or len(raw) != old_out.ndim or not va:
            return None
        growing = [a for a in va if grows[a]]
        if growing != va[-1:] or len(va) < 2:
            # (only a fixed outer block count needs this: where the family grows the outer axis, the heads of GPT-NeoX
            # or BLOOM, the literals already follow the plan, which may also keep heads and grow head_dim: ALiBi)
            return None
        rest = int(np.prod([old_out.shape[a] for a in range(old_out.ndim) if a != growing[0]]))
        if new_numel % rest:
            raise self.conflict(node, "the family's fixed blocks do not divide the new width")
        sizes = list(old_out.shape)
        sizes[growing[0]] = new_numel // rest
        out = [d if d is None or d == -1 else sizes[i] for i, d in enumerate(raw)]
        return None if out == list(raw) else out

    def _getitem(self, node, x: LabelTensor, idx):
        if not self.analysis:
            idx = self._rewrite_index(node, x, idx)
        try:
            out = torch.from_numpy(x.a)[tree_map(as_torch, idx)]
        except Exception as exc:  # noqa: BLE001
            if self.analysis:
                raise NotUnderstood(f"indexing could not be replayed ({exc})") from None
            raise self.conflict(node, "indexing cannot be replayed on the widened tensor") from None
        return as_labels(out)

    def _rewrite_index(self, node, x: LabelTensor, idx):
        old_in = self.old[node.args[0]]
        if same_labels(old_in, x):
            return idx
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if any(isinstance(i, LabelTensor) for i in items):
            # indices the graph computed, on axes that kept their size (rows of a table whose columns grew), read
            # the same rows
            if Ellipsis in items or None in items or any(
                    old_in.shape[a] != x.shape[a] for a, i in enumerate(items) if not (isinstance(i, slice)
                                                                                       and i == slice(None))):
                raise self.conflict(node, "advanced indexing on a widened tensor")
            return idx
        # constant index tensors (Falcon's qkv[..., [-2]]) pass where their axis kept its size; a literal list
        # (x[:, [0, 2]]) on a widened axis is remapped like an int (the graph can hold the new list)
        n_advanced = sum(1 for i in items if isinstance(i, (torch.Tensor, list)))
        n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
        axis, out, changed = 0, [], False
        for i in items:  # the tensor axis each index item addresses
            if i is Ellipsis:
                axis += x.ndim - n_real
                out.append(i)
                continue
            if i is None:
                out.append(i)
                continue
            if old_in.shape[axis] != x.shape[axis] and not (isinstance(i, slice) and i == slice(None)):
                src = self.axis_source(node, old_in, x, axis)
                if isinstance(i, int):
                    hits = np.nonzero(src == (i % old_in.shape[axis]))[0]
                    if len(hits) == 0:
                        raise self.conflict(node, "an indexed channel is missing")
                    i = int(hits[0])
                elif isinstance(i, slice) and i.step in (None, 1):
                    start, stop, _ = i.indices(old_in.shape[axis])
                    i = slice(self.remap_bound(node, src, start), self.remap_bound(node, src, stop))
                elif isinstance(i, list) and n_advanced == 1 and all(type(v) is int for v in i):
                    first: dict = {}  # each item picks the first copy of the one it picked
                    for j, s in enumerate(src.tolist()):
                        first.setdefault(int(s), j)
                    i = [first.get(v % old_in.shape[axis]) for v in i]
                    if None in i:
                        raise self.conflict(node, "an indexed channel is missing")
                elif isinstance(i, torch.Tensor) and n_advanced == 1 and i.ndim == 1 and not i.is_floating_point():
                    # a constant index tensor (Falcon-MQA's qkv[..., [-2]] on transformers 5.24) cannot be rewritten
                    # in the graph: it passes where it still picks the same channels, counted from the end
                    old_n, new_n = old_in.shape[axis], x.shape[axis]
                    picked = src[i.numpy() % new_n] if len(src) == new_n else None
                    if picked is None or not np.array_equal(picked, i.numpy() % old_n):
                        raise self.conflict(node, "a constant index tensor no longer picks the same channels")
                    out.append(i)
                    axis += 1
                    continue
                else:
                    raise self.conflict(node, "strided slicing or advanced indexing of a widened axis")
                changed = True
            out.append(i)
            axis += 1
        if not changed:
            return idx
        new_idx = tuple(out) if isinstance(idx, tuple) else out[0]
        self.arg_updates[node] = ((node.args[0], new_idx), node.kwargs)
        return new_idx
