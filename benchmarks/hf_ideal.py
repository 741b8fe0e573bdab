"""What a widening of a Hugging Face family *should* reach, and why a space did not: used by hf_families.py.

``ideal_kwargs``: the family's config keywords with every width field scaled by the factor (by config naming
convention, not per family), so that ``params(grown) / params(ideal)`` is the "fraction of ideal".

``space_classes``: each frozen space of a widening, classified by the reason graphgrow's report gives: the six
reasons issue 18 accepts (a-f) or ``gap(<op>)``, the op whose relation is missing.
"""

from __future__ import annotations

import inspect
import re
from collections import Counter

# Width fields by convention (the standard names and each family's own); lists (Swin/ConvNeXt stages, wav2vec2
# feature-extractor convolutions) are scaled entry by entry, dicts (DBRX attn_config / ffn_config) recursively.
# Per-head sizes (head_dim, d_kv, kv_channels, qk_*_head_dim, v_head_dim, rotary_dim) are never listed: kept.
WIDTHS = {
    # model width and embedding projections
    "hidden_size", "d_model", "n_embd", "embed_dim", "dim", "embedding_size", "word_embed_proj_dim",
    "hidden_sizes", "conv_dim", "conv_channels", "projection_dim",
    # feed-forward and expert widths, latent ranks
    "intermediate_size", "ffn_dim", "d_ff", "n_inner", "ffn_hidden_size", "hidden_dim", "encoder_ffn_dim",
    "decoder_ffn_dim", "moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
    "kv_lora_rank", "q_lora_rank",
}
HEADS = {"num_attention_heads", "num_key_value_heads", "num_kv_heads", "n_head", "n_heads", "num_heads",
         "encoder_attention_heads", "decoder_attention_heads", "attention_heads", "kv_n_heads"}


def scaled(value, factor: float, heads: bool):
    """``value * factor`` rounded half up (Python's round() is half-even: 2.5 -> 2); a head count stays >= 1."""
    if isinstance(value, (list, tuple)):
        return type(value)(scaled(v, factor, heads) for v in value)
    if type(value) is not int:
        return value
    n = int(value * factor + 0.5)
    return max(n, 1) if heads else n


def scale_fields(kwargs: dict, factor: float, alias: dict) -> dict:
    out = {}
    for key, value in kwargs.items():
        name = alias.get(key, key)
        if isinstance(value, dict):
            out[key] = scale_fields(value, factor, {})
        elif key in WIDTHS or name in WIDTHS or key in HEADS or name in HEADS:
            out[key] = scaled(value, factor, heads=key in HEADS or name in HEADS)
        else:
            out[key] = value
    return out


def ideal_kwargs(config_class, kwargs: dict, config, factor: float) -> dict:
    """The family's keywords with every width field scaled.  Width fields the family leaves at their default are
    read from the built ``config`` and scaled too (a None default stays: the config derives it)."""
    alias = dict(config_class.attribute_map)  # e.g. hidden_size -> d_model: either spelling is one field
    given = {alias.get(k, k) for k in kwargs}
    params = set(inspect.signature(config_class.__init__).parameters)
    full = dict(kwargs)
    for name in sorted(params & (WIDTHS | HEADS)):
        if name not in given and getattr(config, name, None) is not None:
            full[name] = getattr(config, name)
    return scale_fields(full, factor, alias)


# ------------------------------------------------------------------------------------------------- reason classes

# (class, words of graphgrow's reason that name it): the six reasons issue 18 accepts for a space to stay
PRINCIPLED = [("a", ("reaches a model output",)), ("b", ("cannot state it grown", "cannot state them grown")),
              ("c", ("alibi",)), ("d", ("sinusoid",)),
              ("e", ("post-norm", "whole factor", "whole-factor", "whole integer factor", "integer factors only")),
              ("f", ("expert count",)),
              # not a requested width: a gain over head_dim shared by every head (Qwen3's q/k norm); the ideal model
              # keeps head_dim too
              ("hd", ("lies along the head_dim",))]
TIED = re.compile(r"^tied to '[^']*'(, which stays)?: ")


def op_name(reason: str) -> str:
    """``torch._ops.aten.index.Tensor`` -> ``index.Tensor``; ``torch.nn.functional.softmax`` -> ``softmax``;
    ``method '.expand()'`` -> ``expand``."""
    m = re.search(r"(?:function|module|method) '\.?([^'(]+)", reason)
    if not m:
        return "other: " + reason[:40]
    name = m.group(1)
    if "aten." in name:
        return re.sub(r"\.default$", "", name.split("aten.", 1)[1])
    return name.rsplit(".", 1)[-1]


def whole_factor_cause(report) -> str:
    """Why the report's normalized streams kept to whole factors: (e) where the model has a post-norm stream (a
    reason says so), else the gap the notes name (the config's one epsilon, a fill + rescale that did not verify)."""
    if any("post-norm" in r for s in report.spaces for r in s.frozen_reasons):
        return "e"
    notes = " ".join(report.notes)
    if "one epsilon" in notes:
        return "gap(one config epsilon)"
    if "fill + rescale did not verify" in notes:
        return "gap(fill + rescale did not verify)"
    return "gap(whole-factor norm)"


def reason_class(reason: str, width: int, experts: set, whole: str = "e") -> str:
    """One reason's class: a-f, or ``gap(<op>)``.  A router's softmax / top-k over a space as wide as the expert
    count is (f) whatever words it uses; ``tied to X, which stays: R`` is classified by R.  A norm kept to whole
    factors is (e) only for a post-norm stream: else ``whole`` (whole_factor_cause) names the gap."""
    while TIED.match(reason):
        reason = TIED.sub("", reason, count=1)
    low = reason.lower()
    for cls, words in PRINCIPLED:
        if any(w in low for w in words):
            return whole if cls == "e" and "post-norm" not in low else cls
    if width in experts and any(w in low for w in ("softmax", "topk", "top-k", "router")):
        return "f"
    return f"gap({op_name(reason)})"


def space_class(space, experts: set, whole: str = "e") -> str:
    """A space's class: its first gap where one of its reasons is a gap (a principled reason beside it does not
    excuse it), else its first reason's class."""
    classes = [reason_class(r, space.old_width, experts, whole) for r in space.frozen_reasons]
    return next((c for c in classes if c.startswith("gap")), classes[0])


def space_classes(report, factor: float, experts: set) -> Counter:
    """Class -> number of spaces that stayed below the requested width: every space with a frozen reason, and a
    space left at its width without one (a normalized stream kept to whole factors is (e); else unexplained)."""
    whole = whole_factor_cause(report)
    kept_whole = any("whole factor" in n or "kept their width" in n for n in report.notes)
    out: Counter = Counter()
    for s in report.spaces:
        if s.frozen_reasons:
            out[space_class(s, experts, whole)] += 1
        elif s.new_width == s.old_width and factor > 1:
            out[whole if kept_whole and s.normalized else "gap(unchanged, no reason)"] += 1
    return out


def frozen_spaces(report) -> list:
    """[name, old width, new width, reasons] of every space with a frozen reason: the raw material of the
    classes, kept in the JSON so that a new classification needs no rerun."""
    return [[s.name, s.old_width, s.new_width, list(s.frozen_reasons)] for s in report.spaces if s.frozen_reasons]


def is_principled(cls: str) -> bool:
    return not cls.startswith("gap")


def format_classes(counts: Counter) -> str:
    """``a:1 b:2 gap(index.Tensor):5``; ``none`` where every space grew."""
    if not counts:
        return "none"
    return " ".join(f"{c}:{n}" for c, n in sorted(counts.items(), key=lambda kv: (kv[0].startswith("gap"), kv[0])))


EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def expert_counts(config) -> set:
    """The family's expert counts (a router's output width), nested configs (DBRX ffn_config) included."""
    found = {getattr(config, k) for k in EXPERT_KEYS if type(getattr(config, k, None)) is int}
    ffn = getattr(config, "ffn_config", None)
    if ffn is not None and type(getattr(ffn, "moe_num_experts", None)) is int:
        found.add(ffn.moe_num_experts)
    return found
