"""How a family's routing treats copies of its experts, measured on its own sparse block (expert-count growth).

Repeating every expert m times with its router row and raising top-k to m*k is exact where the router chooses
the m copies of an expert together and gives them, together, the original expert's weight.  Whether it does
is a property of the family's routing arithmetic, which differs:

* softmax over the experts, then top-k (Mixtral, Qwen-MoE, OLMoE, ...): each copy gets 1/m of the original's
  probability; renormalised or not, the copies' weights sum to the original's: nothing to scale;
* a selection bias added to those softmax probabilities before the top-k (ERNIE 4.5's score correction): the
  copies' probabilities are 1/m of the original's, so the bias must be too, or the choice changes;
* independent per-expert scores (a sigmoid: DeepSeek-V3, Llama 4, dots.llm1) not renormalised over the chosen
  ones: every chosen copy gets the original's full weight, so the routed output must be scaled by 1/m;
* group-limited routing (DeepSeek-V3, GLM-4-MoE, dots.llm1 with ``n_group`` > 1) scores a group by the sum of
  its best two experts, which in-place copies of one expert change; repeated group by group instead (each
  source group's experts as a block, once per copy; ``n_group`` and ``topk_group`` x m), every copy of a group
  scores and chooses as the group did (graphgrow.core.moe.source_expert) -- the layout the caller passes here.

Rather than keep a table of which family does which, the rule is measured: the family's sparse block is built
alone from the model's config with its widths cut to a few units (routing depends on the expert count and the
scores, not on the widths), its every tensor drawn at random in float64, and grown with each candidate pair
(selection-bias scale, routed-output scale) in {1, 1/m}^2; the first whose block computes the original block's
output on random hidden states is the rule, and a routing no candidate reproduces is refused.  The in-memory
and streamed paths plan with the same rule, so they write the same bytes; the grown model is still checked as
a whole.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from ..core.moe import apply_piece
from .moe_plan import UpcycleRefused, expert_blocks, grow_pieces

SMALL = 8  # the widths (hidden size, intermediate sizes) of the block the rule is measured on
MATCH = 1e-5  # block outputs within this (relative): float32 routers and epsilons in a renormalisation (LFM2: + 1e-6) stay inside it
PREFIX = "block."  # the block's keys, as expert_blocks reads a model's


@dataclass(frozen=True)
class GrowRule:
    """The scales an expert-count growth applies: ``selection`` to the router's other per-expert tensors and
    the block's per-expert biases, ``output`` to the routed experts' down-projections."""

    selection: float = 1.0
    output: float = 1.0

    def notes(self, factor: int) -> list:
        out = []
        if self.selection != 1.0:
            out.append(f"the routers' per-expert selection biases x 1/{factor}: the family adds them to softmax "
                       f"probabilities, of which each of {factor} copies gets 1/{factor}")
        if self.output != 1.0:
            out.append(f"routed down-projections x 1/{factor}: the family gives every chosen copy the original "
                       "expert's full weight (scores not renormalised over the chosen)")
        return out


def small_config(config, fields: dict):
    """``config`` with its hidden and intermediate sizes cut to SMALL and ``fields`` set."""
    cfg = copy.deepcopy(config)
    for name, value in config.to_dict().items():
        if isinstance(value, int) and not isinstance(value, bool) and value > SMALL and \
                (name == "hidden_size" or "intermediate" in name):
            setattr(cfg, name, SMALL)
    for name, value in fields.items():
        setattr(cfg, name, value)
    cfg._experts_implementation = "eager"  # (transformers' grouped_mm kernel has no float64)
    return cfg


def _build_block(block_cls, config, layer: int) -> torch.nn.Module:
    try:
        try:
            block = block_cls(config)
        except TypeError:  # (blocks that also take their layer's index)
            block = block_cls(config, layer)
        return block.to(torch.float64).eval()
    except Exception as exc:  # noqa: BLE001 - a block graphgrow cannot build alone: refused in one sentence
        text = " ".join(str(exc).split())[:200]
        raise UpcycleRefused(f"the sparse block {block_cls.__name__} cannot be built alone to measure how its "
                             f"routing treats copies of experts: {text}") from None


def _first_tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else next(t for t in out if isinstance(t, torch.Tensor))


def measure_grow_rule(model, block_path: str, factor: int, grown_fields: dict, groups: int = 1) -> GrowRule:
    """The :class:`GrowRule` under which ``factor`` copies of every expert compute what the block at
    ``block_path`` of ``model`` (real or on the meta device) computes, the grown block's config fields
    ``grown_fields`` (expert count, top-k, groups: the exact construction's) and its experts laid out in
    ``groups``; UpcycleRefused where none does."""
    block_cls = type(model.get_submodule(block_path))
    cfg = model.config
    layer = next((int(p) for p in block_path.split(".") if p.isdigit()), 0)
    torch.manual_seed(0)  # (the blocks' own initialisation; every tensor is drawn below anyway)
    small = _build_block(block_cls, small_config(cfg, {}), layer)
    grown = _build_block(block_cls, small_config(cfg, grown_fields), layer)
    rng = np.random.default_rng(0)
    state = {}
    with torch.no_grad():
        for name, t in list(small.named_parameters()) + list(small.named_buffers()):
            if t.is_floating_point():  # biases small beside the scores, or they alone would decide the choice
                t.copy_(torch.from_numpy(rng.normal(0.0, 0.05 if name.endswith("bias") else 0.5, tuple(t.shape))))
            state[PREFIX + name] = t.detach().clone()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if not expert_blocks(shapes):
        raise UpcycleRefused(f"the sparse block {block_cls.__name__} holds no experts.gate_up_proj and router "
                             "weight: its expert count cannot be grown")
    hidden = torch.from_numpy(rng.normal(0.0, 1.0, (4, 64, SMALL)))  # (enough tokens to flip a group)
    with torch.no_grad():
        want = _first_tensor(small(hidden)).to(torch.float64)
    inv = 1.0 / factor
    for rule in (GrowRule(), GrowRule(selection=inv), GrowRule(output=inv), GrowRule(selection=inv, output=inv)):
        pieces = grow_pieces(shapes, factor, selection_scale=rule.selection, output_scale=rule.output, groups=groups)
        values = {p.key[len(PREFIX):]: torch.from_numpy(np.ascontiguousarray(
            apply_piece(p, lambda k: state[k].numpy()))).to(torch.float64) for p in pieces}
        try:
            grown.load_state_dict(values, strict=True)
            with torch.no_grad():
                got = _first_tensor(grown(hidden)).to(torch.float64)
        except Exception as exc:  # noqa: BLE001 - the grown block not taking the planned tensors: one sentence
            text = " ".join(str(exc).split())[:200]
            raise UpcycleRefused(f"the sparse block {block_cls.__name__} does not take its experts repeated: "
                                 f"{text}") from None
        if got.shape == want.shape and float((got - want).abs().max()) <= MATCH * float(want.abs().max()):
            return rule
    raise UpcycleRefused(f"{block_cls.__name__}'s routing does not choose the copies of an expert together with "
                         "the original's weight (group-limited routing scores a group by its best experts, which "
                         "copies change): its expert count cannot be grown exactly")
