"""Attention relations (docs/maths.md §5): heads are units.

Attention contracts the channels of one head (q · k over head_dim) and mixes positions (softmax,
the weighted sum of v).  Widening it exactly means adding heads, never head_dim: whole heads are
copied, so the softmax scale 1/sqrt(head_dim) and rotary embeddings stay valid, and the output
projection reads each copy divided by the copy count (an ordinary consumer of the head channels).

* :meth:`AttentionRelations.scores` (``q @ k^T``): q's heads and the key heads they read are cut into
  units (:meth:`~graphgrow.core.plan.GrowthConstraints.units`) and tied channel by channel, query head
  ``h`` with key head ``h // G`` (grouped-query attention: copies of a key head take their query group
  with them).  The scores get one channel per query head (a derived space).
* :meth:`AttentionRelations.values` (``p @ v``): the value head a query head reads is tied to it; the
  output gets the query head's identity and v's channels (a derived space cut into units).

In the apply run both check, head by head, that every new (query, key) or (scores, value) pair is an
original pair, which is what exactness needs: a copied query head still reads a copy of its own key
head.  Heads are found on the tensors, never from a model's attributes: the head axis is the batch
axis along which q's channel ids change, the inner axis the one the product contracts.
"""

from __future__ import annotations

import numpy as np

from .growth import NotUnderstood
from .label_tensor import LabelTensor, label_channel_ids, same_labels
from .labels import CHAN_SHIFT, SALT_MASK, SALT_SHIFT, channel_of
from .provenance import Mismatch, match_rows


def head_grid(x: LabelTensor, head_axis, inner_axis) -> np.ndarray:
    """The labels at position zero over ``(head_axis, inner_axis)`` (heads x inner; a missing head axis
    gives one head)."""
    keep = [a for a in (head_axis, inner_axis) if a is not None]
    f = x.factors()
    if f is not None and set(f[0]) <= set(keep):
        g = np.broadcast_to(x.bpart(), [x.shape[a] if a in keep else 1 for a in range(x.ndim)])
    else:
        g = x.a
    g = g[tuple(slice(None) if a in keep else 0 for a in range(x.ndim))]
    if head_axis is None:
        return g.reshape(1, -1)
    return g if head_axis < inner_axis else g.T


def _distinct_heads(a: np.ndarray, b: np.ndarray):
    """``(first, same)``: heads reading the same (a, b) channels give the same values, so they share one derived
    channel (JetMoE's query heads repeat once per chosen expert, and so do the key heads they read): ``first``
    holds the first head of each distinct pair, ``same`` every head's distinct pair (in first-seen order)."""
    rows = np.concatenate([a.reshape(len(a), -1), b.reshape(len(b), -1)], axis=1)
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # (number the pairs as they first appear: no repeats gives the identity)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return np.sort(first), rank[np.asarray(inverse).ravel()]


def _parts(ids: np.ndarray, salt: int) -> np.ndarray:
    return (np.asarray(ids, np.int64) << CHAN_SHIFT) | np.int64((salt & SALT_MASK) << SALT_SHIFT)


class AttentionRelations:
    """The attention relations of :class:`~graphgrow.core.relations.RelationRun` (a mixin)."""

    def derived_space(self, node, suffix: str, name: str, size: int):
        """A channel space computed without weights (attention scores and outputs): no target of its own,
        it grows through its ties."""
        key = (self.node_key(node), suffix)
        if self.analysis:
            self.node_space[key] = self.table.new_space(name, size, "derived")
        return self.node_space[key]

    def fixed_labels(self, node, suffix: str, shape, salt: int) -> LabelTensor:
        key = (self.node_key(node), suffix)
        if key not in self.fixed_space:
            self.fixed_space[key] = self.table.new_space(f"{suffix}", 1, "fixed")
        return LabelTensor.element(shape, self.fixed_space[key].base, salt)

    def _check_axes(self, x: LabelTensor, allowed, what: str) -> None:
        if not set(x.vary) <= {a for a in allowed if a is not None}:
            raise NotUnderstood(f"the channels of its {what} are not on its head and head_dim axes")

    def _fused_kv_freeze(self, node, cq, ckv, what: str) -> None:
        """Multi-query attention whose single key/value head lies in the queries' own projection: it stays."""
        spaces = self.table.spaces_of(ckv)
        fused = getattr(self, "_mqa_fused", set())
        if cq is not None and spaces == self.table.spaces_of(cq):
            fused |= {spaces[0].id}
            self._mqa_fused = fused
        if spaces and spaces[0].id in fused:
            self.constraints.freeze(ckv, f"{self.site(node)}: multi-query attention's single {what} head shares "
                                         "its projection with the queries (no head axis to copy it along): it "
                                         "keeps one head")

    def _freeze_heads(self, node, tensors, reason: str) -> None:
        for x in tensors:
            self.constraints.freeze(x.chans, f"{self.site(node)}: {reason}")

    # ------------------------------------------------------------ q @ k^T
    def scores(self, node, name: str, q: LabelTensor, k: LabelTensor, old_q, old_k, *, q_axes, k_axes,
               out_shape, out_axis: int, suffix: str = "scores"):
        """Attention scores ``q @ k^T`` contracting q's ``q_axes[1]`` with k's ``k_axes[1]``; heads on
        ``q_axes[0]`` / ``k_axes[0]`` (None: no head axis). ``out_shape``: the original result's shape,
        its heads on ``out_axis``. Returns the scores' labels."""
        salt = self.salt(node)
        ref_q, ref_k = (q, k) if self.analysis else (old_q, old_k)
        self._check_axes(ref_q, q_axes, "query")
        self._check_axes(ref_k, k_axes, "key")
        shape = list(out_shape)
        if q_axes[0] is None or q_axes[0] not in ref_q.vary:
            # one head (or none visible): the product contracts the channels of a whole space
            if self.analysis:
                self._freeze_heads(node, (q, k), "attention over one head contracts its channels: head_dim "
                                                 "cannot change")
            elif not (same_labels(old_q, q) and same_labels(old_k, k)):
                raise self.conflict(node, "the channels of a single attention head changed")
            return self.fixed_labels(node, suffix, shape, salt)
        qg, kg = head_grid(ref_q, *q_axes), head_grid(ref_k, *k_axes)
        n_heads, n_kv = len(qg), len(kg)
        if qg.shape[1] != kg.shape[1] or n_heads % n_kv:
            raise NotUnderstood(f"{n_heads} query heads of {qg.shape[1]} cannot read {n_kv} key heads of "
                                f"{kg.shape[1]}")
        first, same = _distinct_heads(channel_of(qg), channel_of(kg)[np.arange(n_heads) // (n_heads // n_kv)])
        space = self.derived_space(node, suffix, f"{name} (scores)", len(first))
        heads = space.chan_ids[same]  # (each row's head: JetMoE's repeated heads, the batch copies of (batch * heads))
        if self.analysis:
            cq, ck = channel_of(qg), channel_of(kg)[np.arange(n_heads) // (n_heads // n_kv)]
            own = self._own_key_columns(node, channel_of(kg))
            reason = self.constraints.units(cq) or self.constraints.units(channel_of(kg)[:, own])
            if reason:
                self._freeze_heads(node, (q, k), reason)
            else:
                kv_rows = len(np.unique(channel_of(kg), axis=0))  # (repeat_kv repeats them)
                if kv_rows > 1:
                    self.constraints.tie(cq[:, own], ck[:, own])
                else:
                    # one key head serves every query head: any number of query heads still reads it, so the
                    # query heads grow on their own. Fused with the queries in one projection (GPT-BigCode's
                    # multi-query c_attn) it has no head axis to be copied along: it keeps its one head.
                    self._fused_kv_freeze(node, cq, channel_of(kg)[:1], "key")
                self.constraints.tie(space.chan_ids, cq[first, 0], key=("scores", space.id))
                self.constraints.attn_rows[space.id] = (cq, channel_of(kg))
                # (what a per-head bias on the scores freezes: ALiBi, graphgrow.fx.labeling)
                self.scores_heads = getattr(self, "scores_heads", {})
                self.scores_heads[space.id] = np.concatenate([cq.ravel(), channel_of(kg).ravel()])
                for ids, role in ((cq, "query"), (channel_of(kg), "key")):
                    self.constraints.mark_heads(ids[:, 0], role)
                q_rows = len(np.unique(cq, axis=0))  # (JetMoE reads each query head once per chosen expert)
                for ids, count in ((cq, q_rows), (channel_of(kg), kv_rows)):
                    sp = self.table.spaces_of(ids[:, 0])[0]
                    self.constraints.heads_of.setdefault(sp.id, count)
                    self.constraints.head_groups[sp.id] = max(1, q_rows // kv_rows)
                if q_rows > kv_rows and q_rows % kv_rows == 0:
                    # a key head's query group is laid out whole in the copies ([q0 q1 | q2 q3 | q2 q3], not
                    # [q0 q1 q2 q2 q3 q3]): every copy of a key head then serves the same query heads, so the
                    # copies see equal gradients (the dual map of optimizer state, graphgrow.optim)
                    sp = self.table.spaces_of(cq[:, 0])[0]
                    self.constraints.outer_blocks.setdefault(sp.id, set()).add(q_rows // kv_rows * cq.shape[1])
            return LabelTensor.channels(shape, out_axis, heads, salt)
        if same_labels(old_q, q) and same_labels(old_k, k):
            return LabelTensor.channels(shape, out_axis, heads, salt)
        self._check_axes(q, q_axes, "query")
        self._check_axes(k, k_axes, "key")
        nqg, nkg = head_grid(q, *q_axes), head_grid(k, *k_axes)
        if space.id in self.constraints.inner_heads:
            # heads kept in number: the same heads, each (query, key) channel pair inside a copy of an original
            # pair (the key copies are divided by their count where they are produced: plan.key_factors)
            self._inner_pairs(node, [qg, kg[np.arange(n_heads) // (n_heads // n_kv)]],
                              [nqg, nkg[np.arange(len(nqg)) // max(1, len(nqg) // max(1, len(nkg)))]],
                              "query and key channel inside a head")
            return LabelTensor.channels(shape, out_axis, heads, salt)
        src = self._pair_heads(node, qg, kg, nqg, nkg, "query head and its key head")
        shape[out_axis] = len(src)
        return LabelTensor.channels(shape, out_axis, space.base + same[src], salt)

    def _inner_pairs(self, node, olds: list, news: list, what: str) -> np.ndarray:
        """Heads kept in number, grown inside: the old index of every new head_dim channel, the same in every
        head of every grid (``olds`` / ``news``: heads x head_dim grids, one row per head)."""
        if [len(g) for g in olds] != [len(g) for g in news]:
            raise self.conflict(node, "heads kept in number (ALiBi) changed number")
        try:
            return match_rows(np.concatenate(olds).T, np.concatenate(news).T, 0, what).source()
        except Mismatch as exc:
            raise self.conflict(node, str(exc)) from None

    def keep_heads(self, node, scores: LabelTensor, reason: str, scale_follows: bool) -> bool:
        """Analysis: the attention whose scores are ``scores`` keeps its head count (a per-head bias computed
        for it, ALiBi's slopes, is added) and grows head_dim instead: each head_dim channel is copied on its
        own, every head alike, and the key copies are divided by their count (times sqrt(d'/d) where
        ``scale_follows``: the family computes the scale 1/sqrt(head_dim) from the new head_dim). The scores keep
        their width. False when the scores are not an attention's this analysis cut into heads."""
        spaces = self.table.spaces_of(scores.chans)
        if len(spaces) != 1 or spaces[0].id not in self.constraints.attn_rows:
            return False
        space = spaces[0]
        cq, ck = self.constraints.attn_rows[space.id]
        c = self.constraints
        c.untie(("scores", space.id))
        c.keep_heads([sp.id for sp in self.table.spaces_of(np.concatenate([cq.ravel(), ck.ravel()]))], reason)
        c.inner_heads[space.id] = reason
        c.freeze(space.chan_ids, f"{self.site(node)}: {reason}")
        for ids, role in ((cq, "query"), (ck, "key")):
            c.head_firsts.get(role, set()).difference_update(ids[:, 0].tolist())
        c.scaled_keys.append((np.unique(ck, axis=0), bool(scale_follows)))
        return True

    def _own_key_columns(self, node, ck: np.ndarray) -> np.ndarray:
        """Mask of the key columns that differ between key heads. A column every key head reads alike (multi-head
        latent attention's rotary key, one projection broadcast over the heads) is no part of a head: copied
        heads read it as it is, so it keeps its width (it lies along the head_dim) and is tied to no query
        channel, which leaves the query heads free to be copied."""
        own = np.ones(ck.shape[1], bool)
        if len(np.unique(ck, axis=0)) < 2:
            return own  # (one key head: multi-query, see scores)
        own = (ck != ck[:1]).any(axis=0)
        if not own.all():
            self.constraints.freeze(ck[0, ~own], f"{self.site(node)}: the part of the keys every head reads alike "
                                                 "(a rotary key broadcast over the heads) lies along the head_dim: "
                                                 "it keeps its width")
        return own

    def _pair_heads(self, node, a_old, b_old, a_new, b_new, what: str) -> np.ndarray:
        """Original head of every new head: each new (a, b) pair (b's heads repeated over a's groups) must
        be an original pair."""
        old = np.concatenate([a_old, b_old[np.arange(len(a_old)) // (len(a_old) // len(b_old))]], axis=1)
        if len(np.unique(b_old, axis=0)) == 1 and len(np.unique(b_new, axis=0)) == 1:
            # one key/value head (repeated) serves every head: any number of heads reads it (multi-query)
            new = np.concatenate([a_new, np.broadcast_to(b_new[:1], (len(a_new), b_new.shape[1]))], axis=1)
        elif len(a_new) % len(b_new):
            raise self.conflict(node, f"{len(a_new)} heads no longer divide into {len(b_new)} groups")
        else:
            new = np.concatenate([a_new, b_new[np.arange(len(a_new)) // (len(a_new) // len(b_new))]], axis=1)
        try:
            return match_rows(old, new, 0, what).source()
        except Mismatch as exc:
            raise self.conflict(node, str(exc)) from None

    # ------------------------------------------------------------ p @ v
    def values(self, node, name: str, p: LabelTensor, v: LabelTensor, old_p, old_v, *, p_axis, v_axes,
               out_shape, out_axes, suffix: str = "values"):
        """The weighted sum ``p @ v`` over positions: ``p`` (scores after softmax) with heads on ``p_axis``,
        ``v`` with heads and channels on ``v_axes``; ``out_axes``: the result's head and channel axes,
        ``out_shape`` the original result's shape. Returns the output's labels."""
        salt = self.salt(node)
        ref_p, ref_v = (p, v) if self.analysis else (old_p, old_v)
        self._check_axes(ref_p, (p_axis,), "attention weights")
        self._check_axes(ref_v, v_axes, "values")
        if p_axis is None or p_axis not in ref_p.vary:
            if p_axis is not None and ref_p.shape[p_axis] != 1:
                raise NotUnderstood("attention weights without channel structure over several heads")
            # one set of weights for every channel: each channel of v is averaged on its own
            shape = self._new_shape(v, out_shape, v_axes)
            if v.elem is not None:
                return self.fixed_labels(node, suffix, shape, salt)
            f = v.factors()
            if f is None:
                raise NotUnderstood("its values' labels are not in a compact form")
            return self.elementwise(node, LabelTensor.multi(shape, f[0], f[1]))
        pg, vg = head_grid(ref_p, None, p_axis).T, head_grid(ref_v, *v_axes)
        n_heads, n_kv, n_ch = len(pg), len(vg), vg.shape[1]
        if n_heads % n_kv:
            raise NotUnderstood(f"{n_heads} heads of attention weights cannot read {n_kv} value heads")
        first, same = _distinct_heads(channel_of(pg), channel_of(vg)[np.arange(n_heads) // (n_heads // n_kv)])
        space = self.derived_space(node, suffix, f"{name} (heads)", len(first) * n_ch)
        shape = list(out_shape)
        cax = tuple(sorted(out_axes))
        p_spaces = self.table.spaces_of(channel_of(pg).ravel())
        if len(p_spaces) == 1 and p_spaces[0].id in self.constraints.inner_heads:
            return self._inner_values(node, p, v, old_p, pg, vg, same, space, shape, cax, out_axes, v_axes, salt)
        if self.analysis:
            cp, cv = channel_of(pg)[:, 0], channel_of(vg)
            reason = self.constraints.units(cv)
            if reason:
                self._freeze_heads(node, (p, v), reason)
            else:
                if len(np.unique(cv, axis=0)) > 1:
                    self.constraints.tie(cv[np.arange(n_heads) // (n_heads // n_kv), 0], cp)
                else:  # (one value head: read by every query head, see scores)
                    self._fused_kv_freeze(node, None, cv[:1], "value")
                ids = space.chan_ids.reshape(len(first), n_ch)
                self.constraints.units(ids)
                self.constraints.tie(ids[:, 0], cp[first])
            src = np.arange(n_heads)
        elif same_labels(old_p, p) and same_labels(old_v, v):
            src = np.arange(n_heads)
        else:
            self._check_axes(p, (p_axis,), "attention weights")
            self._check_axes(v, v_axes, "values")
            npg, nvg = head_grid(p, None, p_axis).T, head_grid(v, *v_axes)
            src = self._pair_heads(node, pg, vg, npg, nvg, "attention head and its value head")
            shape[out_axes[0]] = len(src)
        ids = space.base + (same[src][:, None] * n_ch + np.arange(n_ch))
        part = _parts(ids if out_axes[0] < out_axes[1] else ids.T, salt)
        return LabelTensor.multi(shape, cax, part)

    def _inner_values(self, node, p, v, old_p, pg, vg, rh, space, shape, cax, out_axes, v_axes, salt):
        """``p @ v`` of heads kept in number (see :meth:`keep_heads`): output channel ``i`` of head ``h`` is
        channel ``i`` of the value head ``h`` reads, tied to it, so the output grows inside each head as v does."""
        n_heads, n_kv, n_ch = len(pg), len(vg), vg.shape[1]
        rows = channel_of(vg)[np.arange(n_heads) // (n_heads // n_kv)]
        if self.analysis:
            self.constraints.keep_heads([space.id] + [sp.id for sp in self.table.spaces_of(rows.ravel())],
                                        self.constraints.inner_heads[self.table.spaces_of(channel_of(pg).ravel())[0].id])
            self.constraints.tie(space.chan_ids.reshape(-1, n_ch)[rh], rows)
            src = np.arange(n_ch)
        elif not same_labels(old_p, p):
            raise self.conflict(node, "the attention weights of heads kept in number changed")
        else:
            self._check_axes(v, v_axes, "values")
            nvg = head_grid(v, *v_axes)
            src = self._inner_pairs(node, [vg], [nvg], "value channel inside a head")
            shape[out_axes[1]] = len(src)
        ids = space.base + (rh[:, None] * n_ch + src[None, :])
        part = _parts(ids if out_axes[0] < out_axes[1] else ids.T, salt)
        return LabelTensor.multi(shape, cax, part)

    # ------------------------------------------------------------ a product of two activations
    def batched_product(self, node, name: str, a: LabelTensor, b: LabelTensor, old_a, old_b):
        """``a @ b`` of two activations (..., M, K) x (..., K, N): attention scores when it contracts head
        channels, the weighted sum of values when it contracts positions."""
        if a.ndim < 3 or a.ndim != b.ndim:
            raise NotUnderstood("a product of two activations that is not a batched attention product")
        ra, rb = (a, b) if self.analysis else (old_a, old_b)
        nd = a.ndim
        head = nd - 3 if nd >= 4 else None
        if nd == 3 and (0 in ra.vary or 0 in rb.vary):
            head = 0  # (batch x heads merged on one axis: BLOOM's (batch * heads, positions, head_dim))
        out_shape = list(ra.shape[:-1]) + [rb.shape[-1]]
        if (nd - 1) in ra.vary or (nd - 2) in rb.vary:
            return self.scores(node, name, a, b, old_a, old_b, q_axes=(head, nd - 1), k_axes=(head, nd - 2),
                               out_shape=out_shape, out_axis=head if head is not None else nd - 2)
        return self.values(node, name, a, b, old_a, old_b, p_axis=head, v_axes=(head, nd - 1),
                           out_shape=out_shape, out_axes=(head, nd - 1))

    # ------------------------------------------------------------ softmax(q @ k^T) @ v
    def attention(self, node, name: str, q, k, v, old_q, old_k, old_v, *, out_shape, bias=None, old_bias=None):
        """Fused attention on (..., heads, positions, head_dim) tensors (F.scaled_dot_product_attention,
        ONNX Attention): :meth:`scores` then :meth:`values`; ``out_shape``: the original output's shape;
        ``bias``: an additive mask with channels on its head axis (:meth:`head_bias`)."""
        nd = len(out_shape)
        head = nd - 3 if nd >= 4 else None
        ref_q, ref_k = (q, k) if self.analysis else (old_q, old_k)
        s_shape = list(ref_q.shape[:-1]) + [ref_k.shape[-2]]
        p = self.scores(node, name, q, k, old_q, old_k, q_axes=(head, nd - 1), k_axes=(head, nd - 1),
                        out_shape=s_shape, out_axis=head if head is not None else nd - 2)
        old_p = p
        if not self.analysis:
            space = self.node_space.get((self.node_key(node), "scores"))
            # (the old scores as scores() labelled them: JetMoE's repeated key heads read fewer distinct heads)
            old_p = self.fixed_labels(node, "scores", s_shape, self.salt(node)) if space is None else \
                self.scores(node, name, old_q, old_k, old_q, old_k, q_axes=(head, nd - 1), k_axes=(head, nd - 1),
                            out_shape=s_shape, out_axis=head if head is not None else nd - 2)
        if bias is not None:
            self.head_bias(node, p, old_p, head, bias, old_bias)
        return self.values(node, name, p, v, old_p, old_v, p_axis=head, v_axes=(head, nd - 1),
                           out_shape=out_shape, out_axes=(head, nd - 1))

    def head_bias(self, node, p: LabelTensor, old_p: LabelTensor, p_axis, bias: LabelTensor,
                  old_bias: LabelTensor) -> None:
        """A bias added to the scores ``p`` with one slice per head (BEiT's relative position table, gathered
        per head): its head axis (right-aligned with the scores') is tied to the scores' heads, so its slices
        are copied with the heads; the apply run checks that each new head reads its own head's slice."""
        ref, ref_p = (bias, p) if self.analysis else (old_bias, old_p)
        b_axis = None if p_axis is None else p_axis - (p.ndim - bias.ndim)
        if b_axis is None or b_axis < 0 or ref.vary != [b_axis]:
            raise NotUnderstood("its attention bias has channels off its head axis")
        if p_axis not in ref_p.vary:
            if self.analysis:
                self._freeze_heads(node, (bias,), "a per-head attention bias meets one head")
            elif not same_labels(old_bias, bias):
                raise self.conflict(node, "a per-head attention bias changed where the heads did not")
            return
        ids, heads = label_channel_ids(bias, b_axis), label_channel_ids(p, p_axis)
        if ids is None or heads is None or len(ids) != len(heads):
            if self.analysis:
                raise NotUnderstood("its attention bias does not hold one slice per head")
            raise self.conflict(node, "its attention bias no longer holds one slice per head")
        if self.analysis:
            self.constraints.tie(ids, heads)
            return
        own = dict(zip(label_channel_ids(old_p, p_axis).tolist(), label_channel_ids(old_bias, b_axis).tolist()))
        if any(own.get(h) != b for h, b in zip(heads.tolist(), ids.tolist())):
            raise self.conflict(node, "a head reads another head's slice of the attention bias")

    @staticmethod
    def _new_shape(v: LabelTensor, out_shape, v_axes) -> list:
        """The output shape with v's (possibly widened) head and channel sizes."""
        shape = list(out_shape)
        for a in v_axes:
            if a is not None:
                shape[a] = v.shape[a]
        return shape
