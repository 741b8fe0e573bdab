"""Issue 18, heads and config coupling: families whose heads used to stay (fused per-head qkv, interleaved
rotary written with stack, q/k norms over head_dim, multi-query / one key-value head, ALiBi) widen their
heads with the stream; the grown model has exactly the parameters of the family built at the grown sizes."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import graphgrow  # noqa: E402
from graphgrow.errors import GraphGrowError  # noqa: E402

VOCAB = 96
TOK = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DEC = dict(TOK, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=64)
GPT = dict(TOK, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
           attn_pdrop=0.0)


def build(cls_name, attn="sdpa", **kw):
    cls = getattr(transformers, cls_name)
    cfg = cls.config_class(**kw)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return cls(cfg).eval()


def ids(seed=0, length=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, VOCAB, (2, length), generator=g)
    x[0, 0] = VOCAB - 1
    return x


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def widened(model, factor=2):
    grown = graphgrow.widen(model, factor, example_inputs=(ids(),))
    for seed in (1, 2):  # checked again here, on inputs graphgrow did not draw
        a, b = logits(model, ids(seed)), logits(grown, ids(seed))
        assert float((a - b).abs().max() / a.abs().max()) < 1e-5
    return grown

FALCON = dict(DEC, ffn_hidden_size=128, num_kv_heads=2, new_decoder_architecture=True)
FALCON.pop("intermediate_size")


# (family, config, sizes the grown config must state at x2: the ideal model is the family built with them)
CASES = {
    "gpt-neox": ("GPTNeoXForCausalLM", DEC, dict(hidden_size=128, num_attention_heads=8, intermediate_size=256)),
    "gptj": ("GPTJForCausalLM", dict(GPT, rotary_dim=8), dict(n_embd=128, n_head=8, n_inner=256)),
    "qwen3": ("Qwen3ForCausalLM", dict(DEC, num_key_value_heads=2, head_dim=32),
              dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, intermediate_size=256)),
    "gpt-bigcode": ("GPTBigCodeForCausalLM", GPT, dict(n_embd=128, n_head=8, n_inner=256)),
    "llama-kv1": ("LlamaForCausalLM", dict(DEC, num_key_value_heads=1),
                  dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, intermediate_size=256)),
    # fused qkv laid out per kv group (queries, key, value), the key/value slots picked by qkv[..., [-2]]
    # (transformers 5.24) or by view(..., kv, -1, head_dim)[..., -2, :] (5.25): the groups are copied whole
    "falcon": ("FalconForCausalLM", FALCON, dict(hidden_size=128, num_attention_heads=8, num_kv_heads=4,
                                                 ffn_hidden_size=256)),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_heads_grow_with_the_stream(family):
    cls_name, cfg, expect = CASES[family]
    attn = "eager" if family == "gptj" else "sdpa"
    model = build(cls_name, attn, **cfg)
    grown = widened(model)
    for field, value in expect.items():
        assert getattr(grown.config, field) == value, field
    ideal = build(cls_name, attn, **{**cfg, **expect})
    assert n_params(grown) == n_params(ideal)
    assert grown.graphgrow_report.params_after == n_params(ideal)


def test_qk_norm_over_head_dim_keeps_its_width():
    model = build("Qwen3ForCausalLM", **dict(DEC, num_key_value_heads=2, head_dim=32))
    grown = widened(model)
    assert tuple(grown.model.layers[0].self_attn.q_norm.weight.shape) == (32,)
    norm = next(s for s in grown.graphgrow_report.spaces if s.name.endswith("q_norm.weight"))
    assert "head_dim" in norm.frozen_reasons[0]


def test_neox_at_one_and_a_half():
    model = build("GPTNeoXForCausalLM", **DEC)
    grown = widened(model, 1.5)
    assert (grown.config.hidden_size, grown.config.num_attention_heads) == (96, 6)


BLOOM = dict(TOK, hidden_size=64, n_layer=2, n_head=4)
MPT = dict(TOK, d_model=64, n_heads=4, n_layers=2, max_seq_len=64, expansion_ratio=2)


def _alibi_notes(grown):
    return [n for n in grown.graphgrow_report.notes if "heads keep their number and grow head_dim" in n]


def test_bloom_alibi_heads_keep_their_number_and_grow_head_dim():
    # ALiBi's slopes are computed for the head count: 4 heads of 32 channels, the key copies divided by their
    # count and multiplied by sqrt(32/16) (BLOOM computes alpha = 1/sqrt(head_dim) from the new head_dim)
    model = build("BloomForCausalLM", "eager", **BLOOM)
    grown = widened(model)
    assert (grown.config.hidden_size, grown.config.n_head) == (128, 4)
    assert n_params(grown) == n_params(build("BloomForCausalLM", "eager", **dict(BLOOM, hidden_size=128)))
    spaces = {s.name: s for s in grown.graphgrow_report.spaces}
    assert spaces["transformer.h.0.self_attention.query_key_value.weight"].new_width == 384
    assert [s.name for s in spaces.values() if s.frozen_reasons] == ["lm_head.weight"]
    notes = _alibi_notes(grown)
    assert len(notes) == 2 and all("ALiBi" in n for n in notes)


def test_bloom_at_one_and_a_half_keeps_a_post_norm_stream():
    # the stream starts at the embedding's LayerNorm (its output is the stream): no fill + rescale, and the
    # config derives head_dim (and the MLP) from hidden_size, so nothing it can state grows
    model = build("BloomForCausalLM", "eager", **BLOOM)
    grown = widened(model, 1.5)
    assert n_params(grown) == n_params(model)
    reasons = " ".join(r for s in grown.graphgrow_report.spaces for r in s.frozen_reasons)
    assert "BloomConfig cannot state it grown" in reasons


def test_widths_breaking_the_head_coupling_is_one_sentence():
    model = build("GPTNeoXForCausalLM", **DEC)
    with pytest.raises(GraphGrowError) as info:
        graphgrow.widen(model, widths={"gpt_neox.embed_in.weight": 128}, example_inputs=(ids(),))
    message = str(info.value)
    assert "GPTNeoXConfig derives head_dim = hidden_size / num_attention_heads" in message
    assert "\n" not in message


def test_multi_query_heads_at_one_and_a_half():
    # one key/value head fused with the queries stays; any number of query heads reads it
    model = build("GPTBigCodeForCausalLM", **GPT)
    grown = widened(model, 1.5)
    assert (grown.config.n_embd, grown.config.n_head, grown.config.multi_query) == (96, 6, True)
    assert n_params(grown) == n_params(build("GPTBigCodeForCausalLM", **dict(GPT, n_embd=96, n_head=6, n_inner=192)))


@pytest.mark.parametrize("factor, width, head_dim", [(2, 128, 32), (1.5, 96, 24)])
def test_mpt_alibi_heads_grow_head_dim(factor, width, head_dim):
    model = build("MptForCausalLM", "eager", **MPT)
    grown = widened(model, factor)
    assert (grown.config.d_model, grown.config.n_heads) == (width, 4)
    attn = grown.transformer.blocks[0].attn
    assert attn.head_dim == head_dim and tuple(attn.Wqkv.weight.shape) == (3 * width, width)
    assert n_params(grown) == n_params(build("MptForCausalLM", "eager", **dict(MPT, d_model=width)))
    assert len(_alibi_notes(grown)) == 2


def test_bloom_streamed_checkpoint_is_the_in_memory_widening(tmp_path):
    # the key copies' factors travel in the recipes (arithmetic.ScaledMapping): bit for bit the in-memory result
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    from graphgrow.hf.stream import widen_checkpoint

    model = build("BloomForCausalLM", "eager", **BLOOM)
    model.save_pretrained(tmp_path / "src")
    in_memory = graphgrow.widen(model, 2, example_inputs=(ids(),)).state_dict()
    result = widen_checkpoint(tmp_path / "src", tmp_path / "out", 2)
    assert result["check"]["max_rel"] < 1e-5
    streamed = load_file(tmp_path / "out" / "model.safetensors")
    qkv = "transformer.h.0.self_attention.query_key_value.weight"
    assert tuple(streamed[qkv].shape) == (384, 128)
    for key, value in streamed.items():
        assert torch.equal(value, in_memory[key]), key


def test_multi_query_kv_head_names_the_config_field():
    grown = widened(build("GPTBigCodeForCausalLM", **GPT))
    qkv = next(s for s in grown.graphgrow_report.spaces if s.name == "transformer.h.0.attn.c_attn.weight")
    assert (qkv.old_width, qkv.new_width) == (96, 160)  # 8 query heads, one key and one value head of 16
    assert any("GPTBigCodeConfig cannot state it grown (multi_query=True" in r for r in qkv.frozen_reasons)


def test_xglm_clamped_scores_are_understood():
    # eager XGLM clamps its (batch * heads) scores with torch.max(scores, finfo.min): the heads are read; only
    # the sinusoidal stream (and what the config derives from it) keeps its width
    model = build("XGLMForCausalLM", "eager", **dict(TOK, d_model=64, ffn_dim=128, num_layers=2, attention_heads=4,
                                                      max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                                                      activation_dropout=0.0))
    grown = widened(model)
    assert grown.config.ffn_dim == 256
    reasons = [r for s in grown.graphgrow_report.spaces for r in s.frozen_reasons]
    assert not any("not understood" in r or "without channel structure" in r for r in reasons)
    assert any("sinusoidal" in r for r in reasons)
