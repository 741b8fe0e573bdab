"""Public Python API for mixtures of experts: :func:`upcycle` (dense -> MoE) and :func:`grow_experts`
(E -> m*E experts), on ``transformers.PreTrainedModel`` s held in memory."""

from __future__ import annotations

from .core.report import record_growth
from .errors import InvalidArgumentError
from .hf.capture import is_pretrained


def _require_pretrained(model, what: str) -> None:
    if not is_pretrained(model):
        raise InvalidArgumentError(f"{what} takes a transformers PreTrainedModel, not {type(model).__name__}")


def upcycle(model, experts: int = 8, top_k: int = 2, *, router: str = "zero", shared=None, layers=None,
            seed: int = 0, noise: float = 0.0, router_std: float | None = None, moe_config: dict | None = None,
            example_inputs=None, verify: str = "torch"):
    """Sparse upcycling: the dense model's mixture-of-experts twin computing the same function.

    Llama / Mistral -> Mixtral, Qwen2 -> Qwen2-MoE, Qwen3 -> Qwen3-MoE, Qwen3.5 -> Qwen3.5-MoE, Granite ->
    GraniteMoE (GraniteMoeShared with ``shared=``), OLMo-2 / OLMo-3 -> FlexOlmo, Cohere2 -> Cohere2-MoE,
    ERNIE 4.5 -> ERNIE 4.5 MoE, HunYuan dense -> HunYuan MoE, LFM2 -> LFM2-MoE (``ForCausalLM`` or base
    ``Model`` classes).  Phi-3 (PhiMoE normalises with LayerNorm), OLMo (OLMoE has norm gains and q/k norms)
    and EXAONE 4 (EXAONE-MoE normalises before, not after) have an MoE sibling whose layers differ: refused.

    Every routed expert is a copy of the dense MLP; every non-MLP tensor is the input's (bit-identical); the
    config states ``experts`` and ``top_k`` (and the experts' intermediate size, the dense one); tied
    embeddings stay tied.  The result is checked against ``model`` on token ids (``example_inputs`` or 2 x 12
    drawn ones, plus 2 drawn batches) and :class:`VerificationError` is raised when it differs.  Its
    :class:`~graphgrow.core.moe.MoEReport` is ``result.graphgrow_report``; the per-tensor plan (a list of
    :class:`~graphgrow.core.moe.Piece`) is ``result.graphgrow_pieces``.

    ``router="zero"``: uniform routers, exact for every family: the routed experts' down-projections are
    scaled by 1 / (the chosen weights' sum that the family's own router gives, measured): 1 where it
    renormalises its top-k (Mixtral, GraniteMoE, ``norm_topk_prob=True``), E/k where it does not (Qwen2-MoE,
    Qwen3-MoE and FlexOlmo by default).  ``router="random"``: rows drawn N(0, ``router_std``) (default: the
    config's initializer_range) from ``seed``; exact only where the family renormalises its top-k (any
    selection of copies gives the same MLP) or where the routed experts' output is zero (``shared="dense"``);
    otherwise refused (pass ``moe_config={"norm_topk_prob": True}`` to a family with that field).

    ``shared`` (families with a shared expert): ``"dense"`` (default where the family always has one) the
    shared expert holds the dense MLP (its down-projection x 2 behind Qwen's zero-logit sigmoid gate, which
    passes 1/2) and the routed experts' down-projections are zero; ``"routed"`` the routed experts hold it
    and the shared expert's down-projection is zero.  ``layers``: the layer indices made sparse (default
    all), stated by ``mlp_only_layers`` / ``decoder_sparse_step`` (Qwen2/3-MoE), ``mlp_layer_types``
    (Cohere2-MoE), ERNIE's ``moe_layer_start_index`` / ``moe_layer_end_index`` / ``moe_layer_interval`` or
    LFM2's ``num_dense_layers``; refused for a family (or a subset) its config cannot state.  ``noise`` > 0
    adds N(0, noise x std) inside every routed expert: NOT exact (top-k < E picks different experts per
    token), labelled so, the measured deviation in ``report.deviation``.  ``moe_config``: further fields of
    the twin's config (applied last).

    The plan behind it (:func:`graphgrow.hf.upcycle.plan_upcycle`, which also takes a model on the meta
    device) is one :class:`~graphgrow.core.moe.Piece` per tensor of the twin: a streamed writer replays it.
    """
    _require_pretrained(model, "upcycle")
    from .hf.upcycle import upcycle_pretrained

    result = upcycle_pretrained(model, experts, top_k, router=router, shared=shared, layers=layers, seed=seed,
                                noise=noise, router_std=router_std, moe_config=moe_config,
                                example_inputs=example_inputs, verify=verify)
    return record_growth(result, upcycle, experts=experts, top_k=top_k, router=router, shared=shared, layers=layers,
                         seed=seed, noise=noise, router_std=router_std, moe_config=moe_config,
                         example_inputs=example_inputs)


def grow_experts(model, factor: int = 2, *, keep_top_k: bool = False, example_inputs=None, seed: int = 0,
                 verify: str = "torch"):
    """Expert-count growth of a mixture of experts: every expert (and its router row) repeated ``factor``
    times in place, the config's expert count x factor.

    ``keep_top_k=False`` (default): top-k x factor too, exact: the copies of an expert have equal router
    logits, so the factor copies of every chosen expert are chosen together and their weights sum to the
    original expert's (docs/maths.md).  ``keep_top_k=True`` (the same compute per token, the setting of
    "Expert Upcycling"): NOT exact, labelled so, the measured deviation in ``report.deviation``.  Checked
    like :func:`upcycle`; ``result.graphgrow_report`` and ``result.graphgrow_pieces`` as there.
    """
    _require_pretrained(model, "grow_experts")
    from .hf.upcycle import grow_experts_pretrained

    result = grow_experts_pretrained(model, factor, keep_top_k=keep_top_k, example_inputs=example_inputs,
                                     seed=seed, verify=verify)
    return record_growth(result, grow_experts, factor=factor, keep_top_k=keep_top_k, example_inputs=example_inputs,
                         seed=seed)
