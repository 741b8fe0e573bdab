"""Parameters applied by functions (a part of :class:`~graphgrow.fx.labeling.FxLabelRun`): the linear maps,
convolutions and embeddings torch.export writes as ``F.linear`` / ``F.conv*`` / ``addmm`` / ``matmul`` over a
``get_attr`` weight (transposed, squeezed and unsqueezed back, shared by several readers, weight-normed), the
exported depthwise/grouped convolutions, and an output head applied by ``F.linear`` to a tied table.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..core import arithmetic as ar
from ..core.label_tensor import LabelTensor, label_channel_ids
from ..core.recipe import same_values
from ..core.relations import NotUnderstood
from .transformer import FUNCTIONAL_PRODUCERS, param_array

_np = param_array


class FxFunctionalOps:
    """Parameters applied by functions, for the fx label run."""

    # ------------------------------------------------------------ parameters applied by functions
    def _weight_param(self, node, target):
        """The ``get_attr`` node of the parameter ``target`` applies as its weight, or None."""
        pos = FUNCTIONAL_PRODUCERS[target][1]
        w = node.args[pos] if len(node.args) > pos else node.kwargs.get("weight")
        if target is torch.matmul and self._transposed_param(w) is not None:
            w = w.args[0]
        w = self._round_trip_param(w)
        if isinstance(w, fx.Node) and w.op == "get_attr" and w.target in self.param_names and \
                operator.attrgetter(w.target)(self.gm).ndim >= 2:
            return w
        return None

    def _round_trip_param(self, n):
        """The parameter ``n`` is when ``n`` is squeezes and unsqueezes of one parameter, read only there, that
        give back its own shape (LFM2's depthwise ``weight.squeeze(1)`` ... ``.unsqueeze(1)``), or a dtype cast of
        it (a router computing in float32 inside a float64 model: DeepSeek's ``weight.type(torch.float32)``),
        else ``n``."""
        p = n
        while isinstance(p, fx.Node) and len(p.users) == 1 and (
                p.target in (torch.squeeze, torch.unsqueeze, "squeeze", "unsqueeze")
                or (p.target == "to" and len(p.args) == 2 and isinstance(p.args[1], torch.dtype) and not p.kwargs)):
            p = p.args[0]
        if p is n or not (isinstance(p, fx.Node) and p.op == "get_attr" and p.target in self.param_names
                          and self.attr_uses.get(p.target) == 1):
            return n
        shape = tuple(operator.attrgetter(p.target)(self.gm).shape)
        return p if tuple(self._shape(n)) == shape else n

    def _transposed_param(self, n):
        """``W`` when ``n`` is ``W.t()`` / ``W.T`` of a 2-d parameter read only there (Falcon's x @ W.T), else None."""
        if not (isinstance(n, fx.Node) and len(n.users) == 1 and n.target in (torch.t, torch.transpose, "t")):
            return None
        w = n.args[0]
        if n.target is torch.transpose and sorted(a % 2 for a in n.args[1:3]) != [0, 1]:
            return None
        if isinstance(w, fx.Node) and w.op == "get_attr" and w.target in self.param_names and \
                self.attr_uses.get(w.target) == 1 and operator.attrgetter(w.target)(self.gm).ndim == 2:
            return w
        return None

    def _tied_pair(self, w_node) -> bool:
        """A table read by embeddings (an encoder-decoder's shared table: several) and at most one linear map
        (a tied output head; a bias there is per token)."""
        users = list(w_node.users)
        kinds = [u.target for u in users]
        return len(users) >= 2 and self.attr_uses.get(w_node.target) == len(users) and \
            all(k in (F.embedding, F.linear) for k in kinds) and kinds.count(F.linear) <= 1 and \
            F.embedding in kinds and all(u.args[1] is w_node for u in users)

    def _shared_weight(self, w_node) -> bool:
        """A weight every reader of which applies it the same way (ALBERT's one layer read by every layer)."""
        users = list(w_node.users)
        return len(users) > 1 and self.attr_uses.get(w_node.target) == len(users) and \
            len({u.target for u in users}) == 1 and users[0].target is F.linear and \
            all(u.args[1] is w_node and u.args[2:] == users[0].args[2:] and not u.kwargs for u in users)

    def _shared_reader(self, node, w_node, new: dict, x=None) -> bool:
        """A further reader of a weight an earlier reader of the same kind applied (a table shared by an
        encoder and a decoder, a layer shared by all layers): one space, tied channel by channel to the first
        reader's, and one new value (checked equal; a table with the width factor the first reader's carries).
        Returns False for the first reader, which stores the values."""
        first = next(u for u in w_node.users if u.target is node.target)
        if first is node:
            return False
        if self.analysis:
            self.constraints.tie(self.node_space[first].chan_ids, self.node_space[node].chan_ids)
            if node.target is F.linear and x is not None:
                # one weight consumes both inputs: their columns take one mapping (DeBERTa's share_att_key applies
                # query_proj to the stream and to the relative position table)
                a, b = self.env.get(first.args[0]), x
                a = label_channel_ids(a, a.ndim - 1) if isinstance(a, LabelTensor) and a.vary else None
                b = label_channel_ids(b, b.ndim - 1) if isinstance(b, LabelTensor) and b.vary else None
                if a is not None and b is not None and len(a) == len(b):
                    self.constraints.tie(np.asarray(a), np.asarray(b))
            return True
        self._same_as_stored(node, new, {w_node.target: self.table_scales.get(w_node.target, 1.0)})
        return True

    def _same_as_stored(self, node, new: dict, scales: dict | None = None) -> None:
        """Each parameter's new value equals the one an earlier reader stored (none stored: none computed)."""
        for target_name, value in new.items():
            owner, _, attr = target_name.rpartition(".")
            stored = self.updates.get(owner)
            stored = None if stored is None else stored.tensors.get(attr)
            if stored is None or not same_values(stored, ar.scale_affine(value, (scales or {}).get(target_name, 1.0))):
                raise self.conflict(node, f"the readers of the shared {target_name!r} would need different values")
        if not new:
            for target_name in [a.target for a in node.all_input_nodes if a.op == "get_attr"]:
                owner, _, attr = target_name.rpartition(".")
                if attr in getattr(self.updates.get(owner), "tensors", {}):
                    raise self.conflict(node, f"the readers of the shared {target_name!r} would need different "
                                              "values")

    def _functional_producer(self, node, target, args, kwargs):
        x_pos, w_pos, b_pos, axis, w_in, w_out = FUNCTIONAL_PRODUCERS[target]
        w_node = self._weight_param(node, target)
        if target is torch.matmul and self._transposed_param(node.args[w_pos]) is not None:
            w_in, w_out = w_out, w_in  # x @ W.T: W stored (out, in), as F.linear's
        x, x_node = args[x_pos], node.args[x_pos]
        if isinstance(x, torch.Tensor):  # indices computed in the graph (position ids): a constant
            x = self._fixed(node, tuple(x.shape), 5)
        if not isinstance(x, LabelTensor):
            raise NotUnderstood("its input is not a tensor")
        weight = operator.attrgetter(w_node.target)(self.gm)
        groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
        if target in (F.conv1d, F.conv2d, F.conv3d) and groups != 1:
            return self._functional_grouped(node, w_node, x, weight, groups)
        if target is torch.matmul and weight.ndim != 2:
            raise NotUnderstood("a batched matrix product with a parameter")
        if target is F.embedding and x.vary:
            raise NotUnderstood("its indices carry channels")
        tied = self._tied_pair(w_node)
        shared = not tied and self._shared_weight(w_node)
        if self.attr_uses.get(w_node.target, 0) != 1 and not tied and not shared:
            raise NotUnderstood("its weight is also read by other ops")
        if tied and target is F.linear:
            return self._tied_function_head(node, w_node, x, self._old(x_node), weight)
        b_node = None if b_pos is None else (node.args[b_pos] if len(node.args) > b_pos else node.kwargs.get("bias"))
        if b_node is not None and not (isinstance(b_node, fx.Node) and b_node.op == "get_attr"
                                       and self.attr_uses.get(b_node.target) == (len(w_node.users) if shared else 1)):
            raise NotUnderstood("its bias is computed or shared")
        old_x = self._old(x_node) if isinstance(x_node, fx.Node) and isinstance(self._old(x_node), LabelTensor) else x
        out, w, mapping = self.produce(node, w_node.target, x, old_x, _np(weight), in_axis=axis, out_axis=axis,
                                       w_in=w_in, w_out=w_out, shape=self._shape(node))
        new = {}
        if w is not None:
            new[w_node.target] = w
            if b_node is not None:
                new[b_node.target] = ar.gather_fill(_np(operator.attrgetter(b_node.target)(self.gm)), 0, mapping,
                                                    self.fill_kind_of(node))
        if (tied or shared) and self._shared_reader(node, w_node, new, x):
            return out
        for target_name, value in new.items():
            owner, _, attr = target_name.rpartition(".")
            self._update(owner).tensors[attr] = value
        return out

    def _functional_grouped(self, node, w_node, x, weight, groups):
        """F.conv with ``groups`` > 1 (an exported nn.Conv2d: ConvNeXt's depthwise conv, RegNet's grouped conv):
        depthwise (one filter per channel, the groups literal follows the width) or grouped (each group widens
        inside itself, the groups literal stays)."""
        if self.attr_uses.get(w_node.target, 0) != 1:
            raise NotUnderstood("its weight is also read by other ops")
        b_node = self._conv_bias(node)
        bias = None if b_node is None else operator.attrgetter(b_node.target)(self.gm)
        out, w, b = self._conv(node, w_node.target, x, _np(weight), None if bias is None else _np(bias), groups)
        for target, value in ((w_node.target, w), (getattr(b_node, "target", None), b)):
            if value is not None and target is not None:
                owner, _, attr = target.rpartition(".")
                self._update(owner).tensors[attr] = value
        return out

    def _conv_bias(self, node):
        b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if b_node is not None and not (isinstance(b_node, fx.Node) and b_node.op == "get_attr"
                                       and self.attr_uses.get(b_node.target) == 1):
            raise NotUnderstood("its bias is computed or shared")
        return b_node

    def _conv(self, node, name, x, weight, bias, groups):
        """``F.conv*(x, weight, bias, ..., groups)``: (labels, new weight or None, new bias or None); plain,
        depthwise (the graph's groups literal follows the width) or grouped (each group widens inside itself)."""
        if not isinstance(groups, int):
            raise NotUnderstood("its number of groups is computed")
        old_x = self._old(node.args[0])
        if groups == 1:
            out, w, mapping = self.produce(node, name, x, old_x, weight, in_axis=1, out_axis=1, w_in=1, w_out=0,
                                           shape=self._shape(node))
            b = None if w is None or bias is None else ar.gather_fill(bias, 0, mapping, self.fill_kind_of(node))
            return out, w, b
        if weight.shape[0] == groups and weight.shape[1] == 1:
            params = {} if self.analysis else {"weight": weight, "bias": bias}
            out, new, match = self.depthwise(node, name, x, old_x, params, self._shape(node))
            if match is not None and match.n_new != groups:
                args = list(node.args) + [1] * (7 - len(node.args))  # (stride, padding, dilation: positional)
                args[6] = match.n_new
                self.arg_updates[node] = (tuple(args[:7]), {k: v for k, v in node.kwargs.items() if k != "groups"})
            return out, new.get("weight"), new.get("bias")
        out, w, mapping = self.grouped(node, name, x, old_x, weight, groups, self._shape(node))
        return out, w, None if w is None or bias is None else ar.gather(bias, 0, mapping)

    def weight_normed(self, node):
        """The ``aten._weight_norm(v, g, dim)`` node ``node`` (an F.conv) reads as its weight (Wav2Vec2's and
        HuBERT's positional conv), with v and g parameters read only there; else None."""
        wn = node.args[1] if len(node.args) > 1 else None
        if not (isinstance(wn, fx.Node) and wn.op == "call_function" and "_weight_norm" in str(wn.target)
                and len(wn.users) == 1 and len(wn.args) == 3 and isinstance(wn.args[2], int)):
            return None
        if all(isinstance(a, fx.Node) and a.op == "get_attr" and self.attr_uses.get(a.target) == 1
               for a in wn.args[:2]):
            return wn
        return None

    def _weight_normed_conv(self, node, args, kwargs):
        """F.conv of ``w = g * v / ||v||`` (norm over every axis but ``dim``): w widens as any conv weight; the
        new w is stored as v' = w', g' = ||w'||, which gives back w' exactly (whatever the copies did to the norm)."""
        wn = self.weight_normed(node)
        v_node, g_node, dim = wn.args
        v, g = (operator.attrgetter(n.target)(self.gm) for n in (v_node, g_node))
        if v.is_meta:
            raise NotUnderstood("a weight-normed convolution needs its weights (v and g make one weight)")
        x = args[0]
        if not isinstance(x, LabelTensor):
            raise NotUnderstood("its input is not a tensor")
        b_node = self._conv_bias(node)
        bias = None if b_node is None else _np(operator.attrgetter(b_node.target)(self.gm))
        v64, g64 = (t.detach().double().cpu().numpy() for t in (v, g))
        axes = tuple(a for a in range(v64.ndim) if a != dim % v64.ndim)
        weight = (g64 * v64 / np.sqrt((v64 ** 2).sum(axis=axes, keepdims=True))).astype(np.float32)
        groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
        out, w, b = self._conv(node, v_node.target, x, weight, bias, groups)
        if w is not None:
            w = np.asarray(w)
            norm = np.sqrt((w.astype(np.float64) ** 2).sum(axis=axes, keepdims=True))
            for target, value in ((v_node.target, w.astype(v64.dtype if v.dtype == torch.float64 else np.float32)),
                                  (g_node.target, norm.astype(w.dtype)), (getattr(b_node, "target", None), b)):
                if value is not None and target is not None:
                    owner, _, attr = target.rpartition(".")
                    self._update(owner).tensors[attr] = value
        return out

    def _tied_function_head(self, node, w_node, x, old_x, weight):
        """F.linear reading the table an F.embedding reads (the exported form of a tied head)."""
        emb = next((u for u in w_node.users if u.target is F.embedding), None)
        emb_space = self.node_space.get(self.node_key(emb)) if emb is not None else None
        per_channel = bool(self._linear_producer(self._fold_start(node.args[0]))) if not self.analysis else False
        labels, gathered, k = self.tied_head(node, w_node.target, x, old_x, _np(weight), list(self._shape(node)),
                                             table_chans=None if emb_space is None else emb_space.chan_ids,
                                             per_channel=per_channel)
        if gathered is None:
            return labels
        owner, _, attr = w_node.target.rpartition(".")
        emb_new = self.updates.get(owner)
        table_scale = self.table_scales.get(w_node.target, 1.0)
        if emb_new is None or not same_values(emb_new.tensors.get(attr), ar.scale_affine(gathered, table_scale)):
            raise self.conflict(node, f"the output head and the embedding it is tied to ({w_node.target!r}) would "
                                      "need different columns")
        if np.any(np.asarray(k) * table_scale != 1):
            self._fold_scale(node, node.args[0], 1.0 / (np.asarray(k) * table_scale))
        return labels
