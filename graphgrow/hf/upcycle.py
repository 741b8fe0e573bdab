"""Dense -> mixture-of-experts upcycling and expert-count growth of Hugging Face ``PreTrainedModel`` s, in memory.

:func:`upcycle_pretrained` returns the dense family's MoE twin (:mod:`.moe_twins`) with every routed expert a
copy of the dense MLP; :func:`grow_experts_pretrained` repeats every expert of an MoE model.  The config is
solved first, the per-tensor plan (:mod:`.moe_plan`, pieces of :mod:`graphgrow.core.moe`) is applied to the
model's tensors, the twin is built by transformers from that config, and the result is checked against the
input on drawn token ids before it is returned.  What makes each construction exact is in docs/maths.md
("Mixtures of experts"); the scale the routed experts need is measured by running the family's own router
once, so a family's routing rule (renormalised or not, softmax before or after top-k, PhiMoE's
sparsemixer) is never guessed.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ..core.moe import MoEReport, apply_piece, weight_sum_scale
from ..errors import InvalidArgumentError, require_equivalent
from .grow_rule import GrowRule, measure_grow_rule
from .moe_plan import (
    UpcycleRefused,
    dense_roles,
    expert_blocks,
    grow_pieces,
    layers_prefix,
    upcycle_pieces,
)
from .moe_twins import (
    EXPERT_FIELDS,
    GROUP_FIELDS,
    NOT_COPIED,
    TOP_K_FIELDS,
    config_fields,
    find_twin,
    first_field,
)

ROUTERS = ("zero", "random")
SHARED = ("dense", "routed")
RENORM_TOL = 1e-5  # chosen weights summing to 1 within float32 rounding: the family renormalises its top-k
# (PhiMoE's sparsemixer routes to exactly two experts: a raised top-k is not stated by its config)
FIXED_TOP_K = {"Phimoe": 2}


class _Logits(nn.Module):
    """``model(input_ids).logits`` (a base model's last hidden state) without a cache: what the verification
    compares."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        out = self.model(input_ids=ids, use_cache=False)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer, not {value!r}")
    return int(value)


def _token_ids(model, example_inputs, seed: int) -> torch.Tensor:
    if example_inputs is not None:
        if not isinstance(example_inputs, torch.Tensor) or example_inputs.dtype not in (torch.int64, torch.int32):
            raise InvalidArgumentError("example_inputs must be a tensor of token ids")
        return example_inputs
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise InvalidArgumentError("the model's config states no vocab_size: pass example_inputs (token ids)")
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _no_init():
    try:
        from transformers.initialization import no_init_weights

        return no_init_weights()
    except ImportError:  # pragma: no cover - older transformers
        return contextlib.nullcontext()


def _build(cls, config, model) -> nn.Module:
    """``cls(config)`` at ``model``'s dtype, weights not initialised (every one is loaded after)."""
    config._attn_implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    dtype = next(model.parameters()).dtype
    sizes = [getattr(config, f, 0) or 0 for f in ("hidden_size", "intermediate_size", "moe_intermediate_size")]
    # grouped_mm, transformers' default experts kernel, has no float64 and needs rows of whole 16-byte blocks
    if dtype == torch.float64 or any(int(n) * dtype.itemsize % 16 for n in sizes if isinstance(n, int)):
        config._experts_implementation = "eager"
    with _no_init():
        new = cls(config)
    param = next(model.parameters())
    return new.to(dtype=param.dtype, device=param.device if param.device.type != "meta" else "cpu")


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


def materialize(pieces, state: dict, like: dict) -> dict:
    """The pieces applied to ``state`` (key -> tensor): a state_dict whose tensors have ``like``'s dtypes.
    Copies are the source tensors themselves (bit-identical); the rest is rounded once from float64."""
    out = {}
    for p in pieces:
        if p.op == "copy":
            out[p.key] = state[p.sources[0]]
        else:
            arr = apply_piece(p, lambda k: _numpy(state[k]))
            out[p.key] = torch.from_numpy(np.ascontiguousarray(arr)).to(like[p.key].dtype)
    return out


def _router_sums(router: nn.Module, rows: torch.Tensor | None, seed: int, name: str = "weight") -> torch.Tensor:
    """The sum of the chosen weights per token that the family's own ``router`` module gives with its weight
    ``name`` set to ``rows`` (zeros when None), on random hidden states, in eval mode, as float64."""
    weight = router.get_parameter(name)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(16, weight.shape[1], generator=g, dtype=torch.float64).to(weight.dtype)
    extra = {}
    if "expert_bias" in inspect.signature(router.forward).parameters:  # (LFM2: the block passes its selection bias)
        extra["expert_bias"] = torch.zeros(weight.shape[0], dtype=torch.float32)
    try:
        with torch.no_grad():
            weight.copy_(torch.zeros_like(weight) if rows is None else rows.to(weight.dtype))
            out = router.eval()(h, **extra)
        return out[1].detach().to(torch.float64).reshape(h.shape[0], -1).sum(-1)
    except Exception as exc:  # noqa: BLE001 - a router graphgrow cannot call alone: refused in one sentence
        raise UpcycleRefused(f"the twin's router {type(router).__name__} cannot be run alone to measure its weights: "
                             f"{_one_line(exc)}") from None


def _tied(model) -> bool:
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return out is not None and inp is not None and out.weight is inp.weight


def _finish(model, result, state) -> nn.Module:
    try:
        result.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # (a tensor the plan did not size as the family's code does)
        raise UpcycleRefused(f"{type(result).__name__} does not take the planned tensors: {_one_line(exc)}") from None
    if hasattr(result, "tie_weights"):  # (built under no_init_weights, which also skips the tying)
        result.tie_weights()
    if _tied(model) and not _tied(result):
        raise UpcycleRefused(f"{type(result).__name__} did not keep the tied input and output embeddings tied")
    result.train(model.training)
    if getattr(model, "generation_config", None) is not None:
        result.generation_config = copy.deepcopy(model.generation_config)
    return result


def _verify(model, result, ids, report, what: str, verify: str, seed: int, exact: bool) -> None:
    """Compare the logits on ``ids`` and 2 drawn batches; raise VerificationError when an exact construction
    differs; an inexact one records its measured deviation."""
    if verify == "none":
        return
    from ..verify import check

    ref, cand, rtol = model, result, None
    dtype = next(model.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16):  # rounded weights: compared in float32 within that dtype's rounding
        from .stream import TOLERANCE

        ref, cand, rtol = copy.deepcopy(model).float(), copy.deepcopy(result).float(), TOLERANCE[dtype]
        report.notes.append(f"checked in float32 within {dtype} rounding (rtol {rtol:g})")
    kwargs = {"rtol": rtol} if rtol is not None else {}
    rep = check(_Logits(ref), _Logits(cand), (ids,), backend="torch", batches=3, seed=seed, **kwargs)
    report.check = rep
    if exact:
        require_equivalent(rep, what, report)
    else:
        report.deviation = float(rep.worst.max_rel) if rep.worst is not None else None


def _sparse_layers(layers, n: int) -> list:
    if layers is None:
        return list(range(n))
    try:
        out = sorted({int(i) for i in layers})
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"layers must be a list of layer indices, not {layers!r}") from None
    if not out or out[0] < 0 or out[-1] >= n:
        raise InvalidArgumentError(f"layers must be a non-empty list of indices in 0..{n - 1}, not {layers!r}")
    return out


def _layer_range(sparse: list, cc) -> dict:
    """ERNIE's rule, layer i sparse when start <= i <= end and (i + 1) % interval == 0, for ``sparse``."""
    start, end = sparse[0], sparse[-1]
    for interval in range(1, end + 2):
        if [i for i in range(start, end + 1) if (i + 1) % interval == 0] == sparse:
            return {"moe_layer_start_index": start, "moe_layer_end_index": end, "moe_layer_interval": interval}
    raise UpcycleRefused(f"{cc.__name__} cannot state it grown: moe_layer_start_index / moe_layer_end_index / "
                         f"moe_layer_interval state no layer set {sparse}")


def twin_config(model, twin, cls, experts: int, top_k: int, sparse: list, shared, overrides):
    """The twin's config: the dense config's fields the twin states, plus its MoE sizes; refuses when the twin's
    config cannot state the asked subset of sparse layers."""
    cc = cls.config_class
    known = config_fields(cc)
    types = getattr(model.config, "layer_types", None)
    if isinstance(types, (list, tuple)) and "layer_types" not in known and set(types) - {"full_attention"}:
        raise UpcycleRefused(f"{cc.__name__} cannot state it grown: it has no layer_types field for the dense model's "
                             f"{' / '.join(sorted(set(types)))} layers")
    # every dense field is carried, declared by the twin's config class or not: the twin's code reads some it
    # does not declare (Qwen3-MoE: getattr(config, "head_dim", hidden // heads))
    kw = {k: v for k, v in model.config.to_dict().items() if k not in NOT_COPIED}
    kw[first_field(known, EXPERT_FIELDS, "expert count", cc)] = experts
    kw[first_field(known, TOP_K_FIELDS, "top-k", cc)] = top_k
    # the dense MLP's own width (LFM2 derives it from intermediate_size; its MoE twin reads the field as it is)
    roles = dense_roles({k: tuple(v.shape) for k, v in model.state_dict().items()},
                        layers_prefix(model.state_dict()), sparse[0], twin.dense_mlp, twin.dense_names)
    inter = int(model.state_dict()[roles["down"][0]].shape[1])
    kw["intermediate_size"] = inter
    if "moe_intermediate_size" in known:
        kw["moe_intermediate_size"] = inter
    if twin.shared_size:
        kw[twin.shared_size] = inter if shared else 0
    if twin.shared_count:
        kw[twin.shared_count] = 1 if shared else 0
    n = int(model.config.num_hidden_layers)
    if twin.layers_field == "mlp_only_layers":  # every s-th layer: decoder_sparse_step s, as Qwen states it
        step = next((s for s in range(1, n + 1) if [i for i in range(n) if (i + 1) % s == 0] == sparse), None)
        kw["mlp_only_layers"] = [] if step else [i for i in range(n) if i not in sparse]
        kw["decoder_sparse_step"] = step or 1
    elif twin.layers_field == "mlp_layer_types":
        kw["mlp_layer_types"] = ["sparse" if i in sparse else "dense" for i in range(n)]
    elif twin.layers_field == "num_dense_layers":  # (LFM2: the first layers dense, the rest sparse)
        if sparse != list(range(sparse[0], n)):
            raise UpcycleRefused(f"{cc.__name__} cannot state it grown: num_dense_layers makes only the last layers "
                                 f"sparse, not {sparse}")
        kw["num_dense_layers"] = sparse[0]
    elif twin.layers_field == "moe_layer_range":
        kw.update(_layer_range(sparse, cc))
    elif len(sparse) < n:
        raise UpcycleRefused(f"{cc.__name__} cannot state it grown: no mlp_only_layers / decoder_sparse_step field, "
                             "so every layer of the twin is sparse (pass layers=None)")
    kw.update(overrides or {})
    kw["architectures"] = [cls.__name__]
    try:
        return cc(**kw)
    except Exception as exc:  # noqa: BLE001 - a field the twin's (strict) config validates and rejects
        raise UpcycleRefused(f"{cc.__name__} rejects the twin's fields: {_one_line(exc)}") from None


@dataclass
class UpcyclePlan:
    """An upcycling planned without weights: the twin's class and config, the sparse layers, the routed experts'
    and the shared expert's scales, and one piece per tensor of the twin (in its state_dict order).  A streamed
    writer reads each piece's sources from the checkpoint, applies it (:func:`graphgrow.core.moe.apply_piece`),
    rounds to the twin's dtype and writes ``piece.key``."""

    cls: type
    config: object
    sparse: list
    pieces: list
    routed_scale: float
    shared: str | None
    notes: list = field(default_factory=list)
    experts: tuple = (1, 1)  # (before, after)
    top_k: tuple = (1, 1)
    groups: int = 1  # expert growth under group-limited routing: the source's expert groups (each repeated as a block)


def _check_upcycle_args(experts, top_k, router, shared, noise) -> tuple:
    experts, top_k = _positive_int(experts, "experts"), _positive_int(top_k, "top_k")
    if top_k > experts:
        raise InvalidArgumentError(f"top_k ({top_k}) cannot exceed the number of experts ({experts})")
    if router not in ROUTERS:
        raise InvalidArgumentError(f"router must be one of {ROUTERS}, not {router!r}")
    if shared is not None and shared not in SHARED:
        raise InvalidArgumentError(f"shared must be None or one of {SHARED}, not {shared!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
        raise InvalidArgumentError(f"noise must be a number >= 0, not {noise!r}")
    return experts, top_k


def _cpu_router(meta_twin, path: str, dtype) -> nn.Module:
    """A CPU copy of the twin's router module at ``dtype``, every tensor zero (the plan zeroes them too)."""
    router = copy.deepcopy(meta_twin.get_submodule(path)).to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for t in list(router.parameters()) + list(router.buffers()):
            t.zero_()
    return router


def router_dtype(dtype) -> torch.dtype:
    """The dtype the twin's router is measured at for weights stored at ``dtype``: float64 for float64, else float32.

    Whether a family renormalises its top-k (and so whether random router rows are exact) is a property of its
    arithmetic, measured where rounding cannot hide it: float32, as the checks compute.  A bfloat16/float16 model's
    own forward rounds the chosen weights to its dtype (their sum misses 1 by up to k x 2^-9 in bfloat16), an error
    of the dtype's rounding, as every one of its products has, which the checks' tolerance for that dtype covers
    (stream.TOLERANCE); measured at bfloat16 the sums (0.998) would refuse random rows for every family.  The
    in-memory and streamed plans measure at this same dtype, so they give the same scales and bytes."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def plan_upcycle(model, experts: int = 8, top_k: int = 2, *, router: str = "zero", shared=None, layers=None,
                 seed: int = 0, noise: float = 0.0, router_std: float | None = None, moe_config=None,
                 dtype=None) -> UpcyclePlan:
    """The per-tensor plan of :func:`graphgrow.upcycle` for ``model`` (real or on the meta device: only its
    config, its state_dict's keys and shapes and its dtype are read; ``dtype``: the weights' dtype where the
    model's parameters do not hold it, as on the meta device).  The twin is built on the meta device for its
    shapes; its router runs once on CPU (zero or random rows, at :func:`router_dtype`) to measure the chosen
    weights' sum."""
    experts, top_k = _check_upcycle_args(experts, top_k, router, shared, noise)
    twin, cls = find_twin(model, shared)
    if twin.shared_required and shared is None:
        shared = "dense"
    if shared and not twin.shared:
        raise UpcycleRefused(f"{cls.__name__} has no shared expert: pass shared=None")
    dtype = dtype or next(model.parameters()).dtype
    sparse = _sparse_layers(layers, int(model.config.num_hidden_layers))
    config = twin_config(model, twin, cls, experts, top_k, sparse, shared, moe_config)
    try:
        with torch.device("meta"):
            meta_twin = cls(config)
    except Exception as exc:  # noqa: BLE001 - the family's code rejecting its config is one sentence
        raise UpcycleRefused(f"{cls.__name__} cannot be built from the twin's config: {_one_line(exc)}") from None
    moe_shapes = {k: tuple(v.shape) for k, v in meta_twin.state_dict().items()}
    router_path = f"{layers_prefix(moe_shapes)}.{sparse[0]}.{twin.block}.{twin.router}"
    gate = _cpu_router(meta_twin, router_path, router_dtype(dtype))
    std = float(router_std if router_std is not None else getattr(model.config, "initializer_range", 0.02) or 0.02)
    notes = []
    if router == "zero":  # every token: the same chosen weights, summing to s (k/E, 1, ...): scale 1/s
        sums = _router_sums(gate, None, seed, twin.router_weight)
        if float(sums.max() - sums.min()) > 1e-12 * float(sums.abs().max()):
            raise UpcycleRefused(f"{cls.__name__}'s router gives a zero router's tokens different weight sums")
        routed = weight_sum_scale(float(sums[0]))
        if shared != "dense":
            notes.append(f"a zero router's chosen weights sum to {float(sums[0]):.9g}: routed down-projections x "
                         f"{routed:.9g}")
        std = 0.0
    else:
        shape = tuple(gate.get_parameter(twin.router_weight).shape)
        rows = torch.from_numpy(np.random.default_rng(seed).normal(0.0, std, shape))
        sums = _router_sums(gate, rows, seed, twin.router_weight)
        routed = 1.0
        if float((sums - 1).abs().max()) > RENORM_TOL and shared != "dense":
            raise UpcycleRefused(f"{cls.__name__} does not renormalise its top-k weights (they sum to "
                                 f"{float(sums.min()):.3g}..{float(sums.max()):.3g}), so random router rows are not "
                                 "exact: use router='zero'" + (", shared='dense'" if twin.shared else "")
                                 + " or a config that renormalises (moe_config={'norm_topk_prob': True})")
    shared_scale = 0.0
    if shared == "dense":  # the shared expert holds the MLP; a zero-logit sigmoid gate passes half of it
        shared_scale, routed = (2.0 if "gate_logit" in twin.shared.values() else 1.0), 0.0
        notes.append(f"the shared expert holds the dense MLP (down-projection x {shared_scale:g}); the routed "
                     "experts' down-projections are zero")
    elif shared == "routed":
        notes.append("the shared expert's down-projection is zero (the routed experts hold the dense MLP)")
    pieces = upcycle_pieces({k: tuple(v.shape) for k, v in model.state_dict().items()}, moe_shapes,
                            block=twin.block, router=twin.router, router_weight=twin.router_weight,
                            dense_mlp=twin.dense_mlp, dense_names=twin.dense_names,
                            shared_roles=twin.shared, sparse=sparse,
                            experts=experts, router_std=std, seed=seed, routed_scale=routed,
                            shared_scale=shared_scale, noise=float(noise))
    return UpcyclePlan(cls, config, sparse, pieces, routed, shared, notes, (1, experts), (1, top_k))


def upcycle_pretrained(model, experts: int = 8, top_k: int = 2, *, router: str = "zero", shared=None, layers=None,
                       seed: int = 0, noise: float = 0.0, router_std: float | None = None, moe_config=None,
                       example_inputs=None, verify: str = "torch"):
    """:func:`graphgrow.upcycle` (see its docstring)."""
    if verify not in ("torch", "none"):
        raise InvalidArgumentError(f"verify must be 'torch' or 'none', not {verify!r}")
    plan = plan_upcycle(model, experts, top_k, router=router, shared=shared, layers=layers, seed=seed, noise=noise,
                        router_std=router_std, moe_config=moe_config)
    ids = _token_ids(model, example_inputs, seed)
    result = _build(plan.cls, plan.config, model)
    result = _finish(model, result, materialize(plan.pieces, model.state_dict(), result.state_dict()))
    exact = not noise
    report = MoEReport(type(model).__name__, plan.cls.__name__, *plan.experts, *plan.top_k, router, plan.shared,
                       plan.sparse, params_before=_count(model), params_after=_count(result),
                       function_preserving=exact, down_scale=plan.routed_scale, notes=list(plan.notes))
    if not exact:
        report.notes.append(f"noise {noise:g} x std inside every routed expert: NOT function-preserving (the chosen "
                            "experts differ per token); the measured deviation is in report.deviation")
    _verify(model, result, ids, report, "upcycled", verify, seed, exact)
    result.graphgrow_report = report
    result.graphgrow_pieces = plan.pieces
    return result


def plan_grow_experts(model, factor: int = 2, *, keep_top_k: bool = False) -> UpcyclePlan:
    """The per-tensor plan of :func:`graphgrow.grow_experts` (``model`` real or on the meta device)."""
    factor = _positive_int(factor, "factor")
    if factor < 2:
        raise InvalidArgumentError(f"factor must be an integer >= 2, not {factor!r}")
    cfg = model.config
    known = set(cfg.to_dict()) | set(getattr(type(cfg), "attribute_map", {}))
    e_field = first_field(known, EXPERT_FIELDS, "expert count", type(cfg))
    k_field = first_field(known, TOP_K_FIELDS, "top-k", type(cfg))
    experts, top_k = int(getattr(cfg, e_field)), int(getattr(cfg, k_field))
    prefix = type(model).__name__.removesuffix("ForCausalLM").removesuffix("Model")
    if not keep_top_k and prefix in FIXED_TOP_K:
        raise UpcycleRefused(f"{type(model).__name__} routes every token to exactly {FIXED_TOP_K[prefix]} experts: "
                             "its top-k cannot be raised with the expert count (keep_top_k=True is inexact)")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    blocks = expert_blocks(shapes)
    if any(n != experts for _, n in blocks.values()):
        raise UpcycleRefused(f"the sparse blocks hold other expert counts than {e_field}={experts}")
    # group-limited routing (n_group groups, topk_group chosen): every group repeated as a block, the group
    # counts x factor, so that each copy of a group scores and chooses as the group did
    grouped = {f: int(getattr(cfg, f)) for f in GROUP_FIELDS if isinstance(getattr(cfg, f, None), int)}
    groups = grouped.get(GROUP_FIELDS[0], 1) if len(grouped) == len(GROUP_FIELDS) else 1
    fields = {e_field: experts * factor, k_field: top_k * factor}
    if groups > 1:
        if experts % groups:
            raise UpcycleRefused(f"{experts} experts do not split into {groups} groups")
        fields.update({f: v * factor for f, v in grouped.items()})
    new_k = top_k if keep_top_k else top_k * factor
    config = copy.deepcopy(cfg)
    for name, value in {**fields, k_field: new_k}.items():
        setattr(config, name, value)
    # how the family's routing treats copies (measured with top-k raised: the exact construction; a kept top-k,
    # inexact anyway, takes the same scales, or none where the family cannot raise its top-k at all)
    try:
        rule = measure_grow_rule(model, next(iter(blocks)).rstrip("."), factor, fields, groups)
    except UpcycleRefused:
        if not keep_top_k:
            raise
        rule = GrowRule()
    pieces = grow_pieces(shapes, factor, selection_scale=rule.selection, output_scale=rule.output, groups=groups)
    notes = rule.notes(factor) + ([f"experts routed in {groups} groups: each group repeated as a block, "
                                   + ", ".join(f"{f} {v // factor} -> {v}" for f, v in fields.items()
                                               if f in GROUP_FIELDS)] if groups > 1 else [])
    return UpcyclePlan(type(model), config, [b.rstrip(".") for b in blocks], pieces, rule.output, None,
                       notes, (experts, experts * factor), (top_k, new_k), groups)


def grow_experts_pretrained(model, factor: int = 2, *, keep_top_k: bool = False, example_inputs=None, seed: int = 0,
                            verify: str = "torch"):
    """:func:`graphgrow.grow_experts` (see its docstring)."""
    plan = plan_grow_experts(model, factor, keep_top_k=keep_top_k)
    result = _build(plan.cls, plan.config, model)
    result = _finish(model, result, materialize(plan.pieces, model.state_dict(), result.state_dict()))
    exact = not keep_top_k
    report = MoEReport(type(model).__name__, type(result).__name__, *plan.experts, *plan.top_k, "copied", None,
                       plan.sparse, params_before=_count(model), params_after=_count(result), function_preserving=exact,
                       down_scale=plan.routed_scale, notes=list(plan.notes))
    if keep_top_k:
        report.notes.append(f"top-k kept at {plan.top_k[0]} (the same compute per token): NOT function-preserving, "
                            "the measured deviation is in report.deviation")
    _verify(model, result, _token_ids(model, example_inputs, seed), report, "expert-grown", verify, seed, exact)
    result.graphgrow_report = report
    result.graphgrow_pieces = plan.pieces
    return result


def _one_line(exc: BaseException) -> str:
    """A library's (possibly multi-line) message on one line, cut at 300 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["UpcyclePlan", "grow_experts_pretrained", "materialize", "plan_grow_experts", "plan_upcycle", "router_dtype",
           "twin_config", "upcycle_pretrained"]
