"""Which dense transformers family has a mixture-of-experts twin, and how the twin's tensors are named.

A twin is the MoE family whose decoder layers are the dense family's with the MLP replaced by a sparse
block (same attention, norms, embeddings and key names): Llama/Mistral -> Mixtral, Qwen2 -> Qwen2-MoE,
Qwen3 -> Qwen3-MoE, Granite -> GraniteMoE (GraniteMoeShared with a shared expert), OLMo-2 -> FlexOlmo,
Cohere2 -> Cohere2-MoE, Qwen3.5 -> Qwen3.5-MoE.  The table holds names only; whether the layers really
match is checked on the tensors (every non-MLP key and shape) and numerically (the verification).
Families whose layers do NOT match their MoE sibling are named in :data:`UNMATCHED` with the reason.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from ..errors import UnsupportedModelError

SUFFIXES = ("ForCausalLM", "Model")

# the routed experts' tensors inside a sparse block (every twin stores them fused, transformers >= 5)
GATE_UP, DOWN = "experts.gate_up_proj", "experts.down_proj"
# shared experts: role of each tensor (gate / up / gate_up rows of the dense MLP, its down projection, a
# sigmoid gate's logit row), relative to the decoder layer
GATED_SHARED = {"mlp.shared_expert.gate_proj.weight": "gate", "mlp.shared_expert.up_proj.weight": "up",
                "mlp.shared_expert.down_proj.weight": "down", "mlp.shared_expert_gate.weight": "gate_logit"}
PLAIN_SHARED = {"shared_mlp.input_linear.weight": "gate_up", "shared_mlp.output_linear.weight": "down"}
HUNYUAN_SHARED = {"mlp.shared_mlp.gate_proj.weight": "gate", "mlp.shared_mlp.up_proj.weight": "up",
                  "mlp.shared_mlp.down_proj.weight": "down"}
ERNIE_SHARED = {"mlp.shared_experts.gate_proj.weight": "gate", "mlp.shared_experts.up_proj.weight": "up",
                "mlp.shared_experts.down_proj.weight": "down"}


@dataclass(frozen=True)
class Twin:
    dense: str  # class-name prefix of the dense family ("Llama")
    moe: str  # class-name prefix of its MoE twin ("Mixtral")
    block: str = "mlp"  # attribute of a decoder layer holding the sparse block
    router: str = "gate"  # attribute of the sparse block holding the router module (called to measure its weights)
    router_weight: str = "weight"  # the router's (E, hidden) weight inside that module
    dense_mlp: str = "mlp"  # the dense family's MLP attribute and its projections' names (gate, up, down)
    dense_names: dict = field(default_factory=lambda: {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
    shared: dict = field(default_factory=dict)  # the shared expert's tensors -> role (empty: none)
    shared_size: str | None = None  # config field of the shared expert's intermediate size
    shared_count: str | None = None  # config field of the number of shared experts (1 or 0; ERNIE)
    shared_required: bool = False  # the family always builds its shared expert (Qwen2-MoE)
    # config field stating which layers are sparse: mlp_only_layers, mlp_layer_types, or moe_layer_range (ERNIE's
    # moe_layer_start_index / moe_layer_end_index / moe_layer_interval)
    layers_field: str | None = None


TWINS = [
    Twin("Llama", "Mixtral"),
    Twin("Mistral", "Mixtral"),
    Twin("Qwen2", "Qwen2Moe", shared=GATED_SHARED, shared_size="shared_expert_intermediate_size",
         shared_required=True, layers_field="mlp_only_layers"),
    Twin("Qwen3", "Qwen3Moe", layers_field="mlp_only_layers"),
    Twin("Qwen3_5", "Qwen3_5Moe", shared=GATED_SHARED, shared_size="shared_expert_intermediate_size",
         shared_required=True),
    Twin("Granite", "GraniteMoe", block="block_sparse_moe", router="router"),
    Twin("Granite", "GraniteMoeShared", block="block_sparse_moe", router="router", shared=PLAIN_SHARED,
         shared_size="shared_intermediate_size"),
    Twin("Olmo2", "FlexOlmo"),
    Twin("Olmo3", "FlexOlmo"),  # (full-attention layers only: FlexOlmo has no sliding-window layers)
    Twin("Cohere2", "Cohere2Moe", layers_field="mlp_layer_types"),
    Twin("Lfm2", "Lfm2Moe", block="feed_forward", dense_mlp="feed_forward",
         dense_names={"gate": "w1", "up": "w3", "down": "w2"}, layers_field="num_dense_layers"),
    Twin("HunYuanDenseV1", "HunYuanMoEV1", router_weight="wg.weight", shared=HUNYUAN_SHARED, shared_required=True),
    Twin("Ernie4_5", "Ernie4_5_Moe", shared=ERNIE_SHARED, shared_count="moe_num_shared_experts",
         layers_field="moe_layer_range"),
]

# dense families with an MoE sibling whose layers are not the dense ones: upcycling would change the function
UNMATCHED = {
    "Phi3": "PhiMoE normalises with LayerNorm (mean subtracted, with a bias) where Phi-3 uses RMSNorm",
    "Olmo": "OLMoE has RMSNorm gains and q/k norms where OLMo has parameter-free LayerNorms",
    "Exaone4": "EXAONE-MoE normalises before attention and MLP where EXAONE 4 normalises after them",
}

EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k")
GROUP_FIELDS = ("n_group", "topk_group")  # group-limited routing (DeepSeek-V3, GLM-4-MoE, dots.llm1)
NOT_COPIED = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")


def family_of(cls_name: str) -> tuple:
    """(prefix, suffix) of a transformers class name: ("Llama", "ForCausalLM")."""
    for suffix in SUFFIXES:
        if cls_name.endswith(suffix):
            return cls_name[:-len(suffix)], suffix
    return cls_name, ""


def twin_names() -> str:
    pairs: dict = {}
    for t in TWINS:
        pairs.setdefault(t.dense, []).append(t.moe)
    return ", ".join(f"{d} -> {' / '.join(m)}" for d, m in pairs.items())


def find_twin(model, shared) -> tuple:
    """(Twin, the twin's class) for ``model``'s class; UnsupportedModelError naming the families that have one."""
    import transformers

    prefix, suffix = family_of(type(model).__name__)
    if prefix in UNMATCHED and suffix:
        raise UnsupportedModelError(f"{type(model).__name__} has no exact mixture-of-experts twin: "
                                    f"{UNMATCHED[prefix]} (families with one: {twin_names()})")
    twins = [t for t in TWINS if t.dense == prefix] if suffix else []
    if not twins:
        raise UnsupportedModelError(f"{type(model).__name__} has no mixture-of-experts twin in transformers that "
                                    f"graphgrow knows (families with one: {twin_names()})")
    # Granite: the shared-expert twin when a shared expert is asked for
    twin = next((t for t in twins if bool(t.shared) == bool(shared)), twins[0])
    cls = getattr(transformers, twin.moe + suffix, None)
    if cls is None:
        raise UnsupportedModelError(f"transformers {transformers.__version__} has no {twin.moe + suffix}")
    return twin, cls


def config_fields(config_class) -> set:
    """The fields a config class states (its constructor's parameters and its default instance's keys)."""
    known = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    try:
        known |= set(config_class().to_dict())
    except Exception:  # noqa: BLE001 - a config without defaults for everything: the signature is enough
        pass
    return known | set(getattr(config_class, "attribute_map", {}))


def first_field(known: set, names: tuple, what: str, config_class) -> str:
    name = next((n for n in names if n in known), None)
    if name is None:
        raise UnsupportedModelError(f"{config_class.__name__} cannot state it grown: no {what} field "
                                    f"({' / '.join(names)})")
    return name
