"""The per-tensor plan of an upcycling or an expert-count growth: state_dict keys and shapes in, a list of
:class:`~graphgrow.core.moe.Piece` out.  No torch and no weights: a streamed checkpoint writer plans from
the checkpoint's index (keys, shapes) and the twin's config exactly as the in-memory path does from the
model, then applies each piece to the tensors it reads.
"""

from __future__ import annotations

import re

from ..core.moe import Piece
from ..errors import UnsupportedModelError
from .moe_twins import DOWN, GATE_UP

DENSE_MLP = "mlp"  # where a dense family keeps its MLP (LFM2: feed_forward), and the names of its projections
DENSE_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class UpcycleRefused(UnsupportedModelError):
    """The requested mixture of experts cannot be built exactly from this model (one sentence says why)."""


def layers_prefix(keys) -> str:
    """The state_dict path of the decoder layers ("model.layers", or "layers" for a base model)."""
    for key in keys:
        m = re.match(r"^((?:[\w.]*\.)?layers)\.\d+\.", key)
        if m:
            return m.group(1)
    raise UpcycleRefused("the model has no decoder layers under a '...layers.N.' path")


def layer_of(key: str, prefix: str):
    m = re.match(re.escape(prefix) + r"\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def dense_roles(shapes: dict, prefix: str, layer: int, mlp_attr: str = DENSE_MLP, names_of: dict = None) -> dict:
    """role -> source keys of layer ``layer``'s dense MLP: gate, up, gate_up (the rows gate then up), down."""
    n = names_of or DENSE_NAMES
    mlp = f"{prefix}.{layer}.{mlp_attr}."
    names = {k[len(mlp):] for k in shapes if k.startswith(mlp)}
    if names == {f"{n[r]}.weight" for r in ("gate", "up", "down")}:
        gate, up, down = (f"{mlp}{n[r]}.weight" for r in ("gate", "up", "down"))
        return {"gate": (gate,), "up": (up,), "gate_up": (gate, up), "down": (down,)}
    if names == {"gate_up_proj.weight", f"{n['down']}.weight"}:
        return {"gate_up": (mlp + "gate_up_proj.weight",), "down": (f"{mlp}{n['down']}.weight",)}
    raise UpcycleRefused(f"the MLP of layer {layer} holds {sorted(names) or 'nothing'}: only gate, up and down "
                         "projections without biases become experts")


def _rows(shapes: dict, keys: tuple) -> tuple:
    """The shape of the sources concatenated along axis 0."""
    first = tuple(shapes[keys[0]])
    return (sum(int(shapes[k][0]) for k in keys), *first[1:])


def upcycle_pieces(dense_shapes: dict, moe_shapes: dict, *, block: str, router: str, shared_roles: dict,
                   router_weight: str = "weight", dense_mlp: str = DENSE_MLP, dense_names: dict = None,
                   sparse: list, experts: int, router_std: float, seed: int, routed_scale: float,
                   shared_scale: float, noise: float = 0.0) -> list:
    """Every tensor of the twin (``moe_shapes``, in its order) as a piece reading the dense model's tensors.
    ``block``/``router``: the sparse block's attribute in a layer and the router's in the block;
    ``shared_roles``: the shared expert's keys, relative to the layer, -> their role (moe_twins).

    ``routed_scale``: the routed experts' down-projection factor (0: zeros); ``shared_scale``: the shared
    expert's (0: zeros); ``router_std``: 0 for zero routers, else the std of the random rows."""
    prefix = layers_prefix(dense_shapes)
    sparse = set(sparse)
    used: set = set()
    pieces = []
    for key, shape in moe_shapes.items():
        shape = tuple(int(d) for d in shape)
        layer = layer_of(key, prefix)
        head = f"{prefix}.{layer}."
        rest = key[len(head):]
        if layer in sparse and (rest.startswith(block + ".") or rest in shared_roles):
            roles = dense_roles(dense_shapes, prefix, layer, dense_mlp, dense_names)
            used.update(k for ks in roles.values() for k in ks)
            piece = _sparse_piece(key, shape, rest, roles, dense_shapes, block=block, router=router,
                                  router_weight=router_weight, shared_roles=shared_roles,
                                  experts=experts, router_std=router_std, seed=seed * 1_000_003 + layer,
                                  routed_scale=routed_scale, shared_scale=shared_scale, noise=noise)
        elif key in dense_shapes:
            if tuple(dense_shapes[key]) != shape:
                raise UpcycleRefused(f"{key!r} is {tuple(dense_shapes[key])} in the dense model but {shape} in its "
                                     "twin: the layers do not match")
            piece = Piece(key, shape, "copy", (key,))
            used.add(key)
        else:
            raise UpcycleRefused(f"the twin holds {key!r}, which the dense model has no counterpart for: the layers "
                                 "do not match")
        pieces.append(piece)
    left = [k for k in dense_shapes if k not in used]
    if left:
        raise UpcycleRefused(f"the dense model's {left[0]!r} has no place in its twin: the layers do not match")
    return pieces


def _sparse_piece(key, shape, rest, roles, dense_shapes, *, block, router, router_weight, shared_roles, experts,
                  router_std, seed, routed_scale, shared_scale, noise) -> Piece:
    if rest == f"{block}.{router}.{router_weight}":
        return Piece(key, shape, "normal", std=router_std, seed=seed) if router_std > 0 else Piece(key, shape, "zeros")
    if rest.endswith("bias") and rest.startswith(f"{block}.") and experts in shape and len(shape) <= 2:
        return Piece(key, shape, "zeros")  # (a per-expert selection bias: ERNIE's score correction, LFM2's)
    if rest in (f"{block}.{GATE_UP}", f"{block}.{DOWN}"):
        rest = rest[len(block) + 1:]
        sources = roles["gate_up" if rest == GATE_UP else "down"]
        want = (experts, *_rows(dense_shapes, sources))
        if want != shape:
            raise UpcycleRefused(f"{key!r} is {shape} in the twin, not {want}: its config cannot state the dense "
                                 "MLP as an expert")
        if rest == DOWN and routed_scale == 0:
            return Piece(key, shape, "zeros")
        return Piece(key, shape, "experts", sources, scale=routed_scale if rest == DOWN else 1.0, copies=experts,
                     seed=seed + (7 if rest == DOWN else 0), noise=noise)
    role = shared_roles.get(rest)
    if role == "gate_logit" or (role == "down" and shared_scale == 0):
        return Piece(key, shape, "zeros")
    if role is not None:
        if role not in roles:
            raise UpcycleRefused(f"the dense MLP's fused gate/up projection cannot become {key!r}")
        sources = roles[role]
        if _rows(dense_shapes, sources) != shape:
            raise UpcycleRefused(f"{key!r} is {shape} in the twin, not {_rows(dense_shapes, sources)}: its config "
                                 "cannot state the dense MLP as its shared expert")
        return Piece(key, shape, "concat", sources, scale=shared_scale if role == "down" else 1.0)
    raise UpcycleRefused(f"the twin's sparse block holds {key!r}, which upcycling does not know how to fill")


def expert_blocks(shapes: dict) -> dict:
    """sparse block path -> (router key, expert count) of an MoE state_dict: every block holding
    ``experts.gate_up_proj``, its router the (E, hidden) weight named gate or router."""
    out = {}
    for key, shape in shapes.items():
        if key.endswith("." + GATE_UP):
            blk = key[:-len(GATE_UP)]
            n = int(shape[0])
            router = next((blk + r for r in ("gate.weight", "router.weight", "gate.wg.weight")
                           if blk + r in shapes and int(shapes[blk + r][0]) == n), None)
            if router is None:
                raise UpcycleRefused(f"the sparse block {blk.rstrip('.')!r} has no (experts, hidden) router weight")
            out[blk] = (router, n)
    return out


def grow_pieces(shapes: dict, factor: int, *, selection_scale: float = 1.0, output_scale: float = 1.0,
                groups: int = 1) -> list:
    """Expert-count growth: every expert and its router row repeated ``factor`` times in place (expert e ->
    e*m .. e*m + m - 1); everything else copied.  ``selection_scale`` multiplies the router's other per-expert
    tensors and the block's per-expert biases (a selection bias added to probabilities the copies share: ERNIE),
    ``output_scale`` the routed experts' down-projections (a family that weights every chosen copy as the
    original); both measured on the family's block (:mod:`graphgrow.hf.grow_rule`).  ``groups`` > 1 (group-limited
    routing): each group's experts repeated as a block (:func:`graphgrow.core.moe.source_expert`)."""
    blocks = expert_blocks(shapes)
    if not blocks:
        raise UpcycleRefused("the model has no sparse block with experts.gate_up_proj: it is not a mixture of experts")
    grown = {r: (0, 1.0) for r, _ in blocks.values()} | {b + GATE_UP: (0, 1.0) for b in blocks}
    for blk, (router, n) in blocks.items():  # the router's per-expert tensors and the block's per-expert biases
        module = router.rsplit(".", 2)[0] + "." if router.endswith(".wg.weight") else router[:-len("weight")]
        for key, shape in shapes.items():
            if key != router and (key.startswith(module) or (key.startswith(blk) and key.endswith("bias")
                                                              and "shared" not in key and len(shape) <= 2)):
                axes = [i for i, d in enumerate(shape) if int(d) == n]
                if len(axes) != 1:
                    raise UpcycleRefused(f"{key!r} of a router does not hold one entry per expert: it cannot be "
                                         "repeated with the experts")
                down = key.startswith(blk + "experts.") and "down" in key  # (an expert's down-projection bias)
                grown[key] = (axes[0], output_scale if down else selection_scale)
        grown[blk + DOWN] = (0, output_scale)
    pieces = []
    for key, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        if key in grown:
            ax, scale = grown[key]
            new = (*shape[:ax], shape[ax] * factor, *shape[ax + 1:])
            pieces.append(Piece(key, new, "repeat", (key,), copies=factor, axis=ax, scale=scale, groups=groups))
        else:
            pieces.append(Piece(key, shape, "copy", (key,)))
    return pieces
