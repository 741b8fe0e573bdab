"""graphgrow.widen on mixture-of-experts transformers: token dispatch, stacked experts, shared experts and their
gates grow; the grown model has the parameters of the family built at the grown widths and the same logits."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import graphgrow  # noqa: E402

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(intermediate_size=128, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2)
FAMILIES = {
    "mixtral": ("MixtralForCausalLM", dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": ("Qwen2MoeForCausalLM", dict(MOE, shared_expert_intermediate_size=128)),
    "qwen3-moe": ("Qwen3MoeForCausalLM", MOE),
    "granitemoe": ("GraniteMoeForCausalLM", dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)),
    "phimoe": ("PhimoeForCausalLM", dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)),
}
# the widths a widening grows (the expert count and top-k stay: reason (f))
WIDTHS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
          "num_attention_heads", "num_key_value_heads")


def build(name, factor=1.0):
    cls_name, extra = FAMILIES[name]
    kwargs = {**BASE, **extra}
    kwargs.update({k: int(round(v * factor)) for k, v in kwargs.items() if k in WIDTHS})
    cls = getattr(transformers, cls_name)
    config = cls.config_class(**kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(config).float().eval()


def ids(seed=0, length=10):
    x = torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    x[0, 0] = VOCAB - 1  # graphgrow draws check inputs up to the example's maximum
    return x


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def max_rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def grown_and_checked(name, factor):
    model = build(name)
    grown = graphgrow.widen(model, factor, example_inputs=(ids(),))
    assert type(grown) is type(model)
    for seed in (1, 2):
        assert max_rel(logits(model, ids(seed)), logits(grown, ids(seed))) < 1e-5
    assert grown.graphgrow_report.check.worst.max_rel < 1e-5
    return model, grown


@pytest.mark.parametrize("name,factor", [("mixtral", 2), ("mixtral", 1.5), ("qwen2-moe", 2), ("qwen2-moe", 1.5),
                                         ("granitemoe", 2), ("phimoe", 2)])
def test_moe_grows_to_the_family_built_at_the_grown_widths(name, factor):
    """Stream, heads, every expert's intermediate width and the shared expert all grow: the grown model has the
    shapes (so the parameter count: fraction of ideal 1.0) of the family built at the grown widths."""
    _, grown = grown_and_checked(name, factor)
    ideal = build(name, factor)
    assert {k: tuple(v.shape) for k, v in grown.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ideal.state_dict().items()}
    assert n_params(grown) == n_params(ideal)
    for space in grown.graphgrow_report.spaces:  # only the routers' expert counts (f) and the vocabulary (a) stay
        if space.name != "lm_head.weight":
            assert all("expert count" in r for r in space.frozen_reasons), (space.name, space.frozen_reasons)
    for field in WIDTHS:
        if field == "intermediate_size" and hasattr(ideal.config, "moe_intermediate_size"):
            continue  # the dense MLP's width: no parameter reads it when every layer is sparse
        assert getattr(grown.config, field, None) == getattr(ideal.config, field, None), field


def test_router_and_shared_expert_gate_keep_their_expert_count():
    """The router's outputs (expert count, under top-k) and the shared expert's one-output sigmoid gate stay, for
    reason (f); their inputs read the grown stream like any consumer."""
    model, grown = grown_and_checked("qwen2-moe", 2)
    layer = grown.model.layers[0].mlp
    assert tuple(layer.gate.weight.shape) == (4, 128)
    assert tuple(layer.shared_expert_gate.weight.shape) == (1, 128)
    assert tuple(layer.experts.gate_up_proj.shape) == (4, 256, 128)
    assert tuple(layer.experts.down_proj.shape) == (4, 128, 128)
    assert tuple(layer.shared_expert.down_proj.weight.shape) == (128, 256)
    frozen = {s.name: s.frozen_reasons for s in grown.graphgrow_report.spaces if s.frozen_reasons}
    for key in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight"):
        assert any("expert count" in r for r in frozen[key]), frozen[key]
    assert set(frozen) <= {f"model.layers.{i}.mlp.{g}.weight" for i in (0, 1) for g in ("gate", "shared_expert_gate")} \
        | {"lm_head.weight"}


def test_qwen3_moe_experts_and_stream_grow():
    """Qwen3-MoE: the stream and every expert grow (its q/k norms are the attention heads' business)."""
    _, grown = grown_and_checked("qwen3-moe", 2)
    ideal = build("qwen3-moe", 2)
    assert grown.config.hidden_size == 128 and grown.config.moe_intermediate_size == 128
    for i in (0, 1):
        experts = grown.model.layers[i].mlp.experts
        assert tuple(experts.gate_up_proj.shape) == (4, 256, 128) and tuple(experts.down_proj.shape) == (4, 128, 128)
    assert n_params(grown) >= 0.9 * n_params(ideal)


def test_moe_checkpoint_streams_like_in_memory(tmp_path):
    """GPT-OSS stores its experts stacked (no checkpoint conversion), [E, in, out], with per-expert biases and
    gate/up interleaved column by column: widen_checkpoint streams the stacked recipes bit for bit as the
    in-memory widening."""
    from safetensors.torch import load_file

    from graphgrow.hf.stream import widen_checkpoint

    config = transformers.GptOssConfig(**{**BASE, "head_dim": 16}, intermediate_size=64, num_local_experts=4,
                                       num_experts_per_tok=2, sliding_window=16,
                                       layer_types=["sliding_attention", "full_attention"])
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "src")
    in_memory = graphgrow.widen(model, 2, example_inputs=(ids(),)).state_dict()
    result = widen_checkpoint(tmp_path / "src", tmp_path / "out", 2)
    assert result["check"]["max_rel"] < 1e-5 and result["config"].hidden_size == 128
    streamed = load_file(tmp_path / "out" / "model.safetensors")
    assert set(streamed) <= set(in_memory)
    # interleaved gate/up columns ([:, ::2] / [:, 1::2]) widen as whole (gate, up) pairs: the experts grow too
    assert tuple(streamed["model.layers.0.mlp.experts.gate_up_proj"].shape) == (4, 128, 256)
    assert tuple(streamed["model.layers.0.mlp.experts.down_proj"].shape) == (4, 128, 128)
    assert tuple(streamed["model.layers.0.mlp.experts.gate_up_proj_bias"].shape) == (4, 256)
    for key, value in streamed.items():
        assert torch.equal(value, in_memory[key]), key


def test_checkpoint_stored_per_expert_streams_like_in_memory(tmp_path):
    """Mixtral checkpoints store every expert's w1 / w2 / w3 apart (transformers stacks them on load): each
    stacked parameter is assembled from its pieces (across shards), grown by its recipe and cut back; the
    written directory loads into the in-memory widening, bit for bit."""
    from graphgrow.hf.stream import widen_checkpoint

    model = build("mixtral")
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 1
    in_memory = graphgrow.widen(model, 2, example_inputs=(ids(),)).state_dict()
    result = widen_checkpoint(tmp_path / "src", tmp_path / "out", 2)
    assert result["check"]["max_rel"] < 1e-5 and result["config"].intermediate_size == 256
    again = type(model).from_pretrained(tmp_path / "out").state_dict()
    assert set(again) == set(in_memory)
    assert tuple(again["model.layers.1.mlp.experts.gate_up_proj"].shape) == (4, 512, 128)
    for key, value in again.items():
        assert torch.equal(value, in_memory[key]), key


def test_deepseek_v3_router_weight_cast_and_experts_grow():
    """DeepSeek-V3 casts its router weight to float32 (a no-op cast the graph writes out) before the linear map,
    and routes through group-limited top-k with a score correction bias: the router reads the grown stream and
    keeps its expert count; routed and shared experts grow."""
    config = transformers.DeepseekV3Config(**{**BASE, "num_key_value_heads": 4}, intermediate_size=128,
                                           moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2,
                                           kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                           v_head_dim=16, n_group=1, topk_group=1, first_k_dense_replace=1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    grown = graphgrow.widen(model, 2, example_inputs=(ids(),))
    for seed in (1, 2):
        assert max_rel(logits(model, ids(seed)), logits(grown, ids(seed))) < 1e-5
    mlp = grown.model.layers[1].mlp
    assert tuple(mlp.gate.weight.shape) == (4, 128)
    assert tuple(mlp.experts.gate_up_proj.shape) == (4, 256, 128) and tuple(mlp.experts.down_proj.shape) == (4, 128, 128)
    assert tuple(mlp.shared_experts.down_proj.weight.shape) == (128, 128)
    frozen = {s.name: s.frozen_reasons for s in grown.graphgrow_report.spaces if s.frozen_reasons}
    assert all("expert count" in r for r in frozen["model.layers.1.mlp.gate.weight"])
