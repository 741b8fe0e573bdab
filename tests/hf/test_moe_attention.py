"""graphgrow.widen on the attention of mixture-of-experts families: DeepSeek-V2/V3's multi-head latent attention
(complex / interleaved rotary, keys assembled by new_empty + copy_, a rotary key shared by every head), GPT-OSS's
attention sinks (a per-head logit beside the scores, the row maximum subtracted) and JetMoE's mixture of attention
heads (experts applied one at a time, key/value heads tiled per chosen expert).  The grown model has the shapes of
the family built at the grown widths, and the same logits."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_testing import logits, max_rel, shapes, token_ids  # noqa: E402

import graphgrow  # noqa: E402

VOCAB = 96


def ids(seed=0, length=10):
    return token_ids(VOCAB, seed, length)
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
MLA = dict(num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=64, n_routed_experts=4,
           num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
           qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1)
FAMILIES = {
    "deepseek-v2": ("DeepseekV2ForCausalLM", dict(MLA, topk_method="greedy"), "sdpa"),
    "deepseek-v3": ("DeepseekV3ForCausalLM", dict(MLA, n_group=1, topk_group=1), "sdpa"),
    "gpt-oss": ("GptOssForCausalLM", dict(num_key_value_heads=2, head_dim=16, intermediate_size=128, num_local_experts=4,
                                          num_experts_per_tok=2, sliding_window=16,
                                          layer_types=["sliding_attention", "full_attention"]), "eager"),
    "jetmoe": ("JetMoeForCausalLM", dict(num_key_value_heads=2, kv_channels=16, intermediate_size=128,
                                         num_local_experts=4, num_experts_per_tok=2), "eager"),
}
# widths a widening grows; head_dim parts (qk_rope/qk_nope/v_head_dim, kv_channels), expert counts and top-k stay
WIDTHS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads", "num_key_value_heads",
          "kv_lora_rank", "q_lora_rank")


def build(name, factor=1.0):
    cls_name, extra, attn = FAMILIES[name]
    kwargs = {**BASE, **extra}
    if name == "jetmoe":
        kwargs.pop("num_attention_heads")  # (JetMoE states its heads as num_key_value_heads x top-k)
    kwargs.update({k: int(round(v * factor)) for k, v in kwargs.items() if k in WIDTHS})
    cls = getattr(transformers, cls_name)
    config = cls.config_class(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return cls(config).float().eval()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_attention_of_moe_families_grows_to_the_family_built_at_the_grown_widths(name):
    """x2: stream, experts and attention heads all grow; every parameter has its shape in the family built at the
    grown widths (fraction of ideal 1.0) and the logits are unchanged."""
    model = build(name)
    grown = graphgrow.widen(model, 2, example_inputs=(ids(),))
    for seed in (1, 2):
        assert max_rel(logits(model, ids(seed)), logits(grown, ids(seed))) < 1e-5
    assert grown.graphgrow_report.check.worst.max_rel < 1e-5
    ideal = build(name, 2)
    assert shapes(grown) == shapes(ideal)
    assert sum(p.numel() for p in grown.parameters()) == sum(p.numel() for p in ideal.parameters())
    for space in grown.graphgrow_report.spaces:  # routers (f), the vocabulary (a), MLA's shared rotary key (head_dim)
        if space.name != "lm_head.weight":
            assert all("expert count" in r or "lies along the head_dim" in r for r in space.frozen_reasons), \
                (space.name, space.frozen_reasons)


@pytest.mark.parametrize("name", ["deepseek-v2", "deepseek-v3"])
def test_multi_head_latent_attention_copies_heads_and_keeps_the_shared_rotary_key(name):
    """Each query head (q_b_proj) is copied with its key/value head (kv_b_proj: a head's 8 key and 16 value
    channels side by side); the rotary key (the last qk_rope_head_dim outputs of kv_a_proj_with_mqa, broadcast
    over the heads) keeps its 8 channels while the latent rank beside it grows 16 -> 32."""
    model = build(name)
    grown = graphgrow.widen(model, 2, example_inputs=(ids(),))
    attn = grown.model.layers[0].self_attn
    assert grown.config.num_attention_heads == 8 and grown.config.kv_lora_rank == 32
    assert grown.config.qk_rope_head_dim == 8 and grown.config.v_head_dim == 16
    assert tuple(attn.q_b_proj.weight.shape) == (8 * 16, 64)
    assert tuple(attn.kv_a_proj_with_mqa.weight.shape) == (32 + 8, 128)
    assert tuple(attn.kv_b_proj.weight.shape) == (8 * 24, 32)
    old = model.model.layers[0].self_attn.kv_a_proj_with_mqa.weight
    # the rotary key's rows read the stream's copies (each old column followed by its copy, the value split between
    # them): summed back, the old rows
    new = attn.kv_a_proj_with_mqa.weight[32:]
    assert torch.allclose(new[:, 0::2] + new[:, 1::2], old[16:], atol=1e-6)
    reasons = {s.name: s.frozen_reasons for s in grown.graphgrow_report.spaces}
    assert any("lies along the head_dim" in r for r in reasons["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"])


def test_gpt_oss_sinks_follow_their_heads():
    """GPT-OSS's sinks (one logit per head, concatenated to the scores before the softmax; the row maximum is
    subtracted) are copied with their heads."""
    model = build("gpt-oss")
    grown = graphgrow.widen(model, 2, example_inputs=(ids(),))
    old, new = model.model.layers[0].self_attn.sinks, grown.model.layers[0].self_attn.sinks
    assert tuple(new.shape) == (8,)
    assert set(new.tolist()) == set(old.tolist())  # every head's sink, each copy's its head's


def test_jetmoe_attention_experts_grow_as_one_stacked_weight():
    """JetMoE applies each attention expert as F.linear(tokens, W[e]) and sums the outputs back with index_add:
    every expert's slice of the stacked [E, out, in] weight grows alike (one output space)."""
    model = build("jetmoe")
    grown = graphgrow.widen(model, 2, example_inputs=(ids(),))
    moa = grown.model.layers[0].self_attention.experts
    assert tuple(moa.input_linear.weight.shape) == (4, 64, 128)
    assert tuple(moa.output_linear.weight.shape) == (4, 128, 64)
    assert tuple(grown.model.layers[0].mlp.input_linear.weight.shape) == (4, 512, 128)
    assert grown.config.num_key_value_heads == 4 and grown.config.kv_channels == 16


def test_jetmoe_fixed_layer_norm_epsilon_keeps_the_stream_at_non_integer_factors():
    """JetMoE's layer RMSNorms use their code's eps (1e-6) whatever rms_norm_eps says (only the final norm reads
    it): fill + rescale, which needs eps x d/d' in the filled norms, cannot be stated, so at x1.5 the stream keeps
    its width (class (b), naming rms_norm_eps) while the heads and the experts' ffn grow, exactly."""
    from graphgrow.hf.config import fixed_eps_modules

    model = build("jetmoe")
    fixed = fixed_eps_modules(type(model), model.config, "rms_norm_eps", 1e-6)
    assert fixed == {f"model.layers.{i}.{n}" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")}
    grown = graphgrow.widen(model, 1.5, example_inputs=(ids(),))
    for seed in (1, 2):
        assert max_rel(logits(model, ids(seed)), logits(grown, ids(seed))) < 1e-5
    cfg = grown.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads, cfg.kv_channels) == (64, 192, 3, 16)
    assert cfg.rms_norm_eps == 1e-6
    ideal = build("jetmoe")
    ideal.config.intermediate_size, ideal.config.num_key_value_heads = 192, 3
    ideal = type(model)(ideal.config)
    assert shapes(grown) == shapes(ideal)
    reasons = {s.name: s.frozen_reasons for s in grown.graphgrow_report.spaces}
    stream = reasons["model.norm.weight"]
    assert any("JetMoeConfig cannot state it grown (rms_norm_eps is not read by model.layers.0.input_layernorm" in r
               for r in stream), stream
    assert not any("did not verify" in n for n in grown.graphgrow_report.notes)
