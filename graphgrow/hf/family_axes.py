"""Which axes of a fused projection's reshape the family grows (read by building it with more heads).

A reshape that splits a head space into blocks of several heads can grow in two ways that are both consistent
on the captured graph, whose sizes are literals: more blocks of the same size (GPT-NeoX's per-head
``[q_h | k_h | v_h]``: ``view(..., -1, 3 * head_dim)``) or the same blocks grown inside (CodeGen's fused qkv
projection, cut into ``mp_num = 4`` blocks ``[q | v | k]`` of ``3 * hidden / 4`` channels:
``view(..., -1, 3 * local_dim)``, the same code).  Only the family's code tells them apart, so the family is
asked: built on the meta device at twice the heads (head_dim kept) and captured the same way, each reshape of
its graph shows which output axes follow the heads (``node.meta[FAMILY_AXES]``).  An outer axis that keeps
its size is a fixed block count: the analysis ties the blocks position by position (each grows inside, like
a grouped conv's groups) and the apply run rewrites the inner literal (:mod:`graphgrow.fx.moves`).
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from ..fx.moves import FAMILY_AXES, RESHAPES
from .capture import capture


def _shape(node):
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def more_heads(config):
    """A copy of ``config`` with twice the attention heads (key/value heads too) and, where the family derives
    head_dim from the stream, twice the stream: head_dim kept. None when the config names no head count."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(heads, int) or not isinstance(hidden, int) or heads < 1:
        return None
    new = copy.deepcopy(config)
    new.num_attention_heads = 2 * heads
    kv = getattr(config, "num_key_value_heads", None)
    if isinstance(kv, int) and kv > 0:
        new.num_key_value_heads = 2 * kv
    if getattr(config, "head_dim", None) is None:
        new.hidden_size = 2 * hidden
    return new


def ambiguous_blocks(constraints) -> bool:
    """Whether a reshape cut a head space into blocks of several heads (the two readings above)."""
    return any(b > u and b % u == 0 for sid, u in constraints.unit_size.items()
               for b in constraints.split_blocks.get(sid, ()))


def mark_family_axes(gm: fx.GraphModule, model, inputs: tuple) -> int:
    """Mark on ``gm`` (the capture of ``model`` on ``inputs``) the output axes of every reshape that grow when
    the family is built with twice the heads; returns how many reshapes were marked (0 when the family cannot
    be built so, or its graph is not the same graph at the other sizes: nothing is assumed then)."""
    from .capture import NamedInputs, input_names
    from .stream import computed_buffers

    config = more_heads(model.config)
    if config is None:
        return 0
    try:
        with torch.device("meta"):
            probe = type(model)(config)
        probe.eval()
        computed_buffers(probe)
        metas = tuple(torch.zeros_like(x, device="meta") for x in inputs)
        names = input_names(inputs)
        other = capture(probe, NamedInputs(dict(zip(names, metas))) if names else metas)
    except Exception:  # noqa: BLE001 - a family that cannot be built or captured so: no marks, nothing assumed
        return 0
    mine, theirs = list(gm.graph.nodes), list(other.graph.nodes)
    if len(mine) != len(theirs) or any(a.op != b.op or a.target != b.target for a, b in zip(mine, theirs)):
        return 0
    marked = 0
    for a, b in zip(mine, theirs):
        if a.target not in RESHAPES:
            continue
        s, t = _shape(a), _shape(b)
        if s is None or t is None or len(s) != len(t):
            continue
        a.meta[FAMILY_AXES] = tuple(x != y for x, y in zip(s, t))
        marked += 1
    return marked
