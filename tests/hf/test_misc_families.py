"""Families whose widening needed an op or a fold of their own: OPT-350m's project_in/project_out around a
tied head (word_embed_proj_dim), Apertus' xIELU activation (where(x > 0, ...)). Each is checked again here,
independently of graphgrow's own check, with the grown widths and parameter counts."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_testing import logits, max_rel, token_ids  # noqa: E402

import graphgrow  # noqa: E402

VOCAB = 128


def ids(seed=0, length=10):
    return token_ids(VOCAB, seed, length)
TOK = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def grown(model, factor):
    torch.manual_seed(0)
    x = ids()
    big = graphgrow.widen(model, factor, example_inputs=(x,))
    for seed in (0, 1):
        y = ids(seed + 5)
        assert max_rel(logits(model, y), logits(big, y)) < 1e-5
    return big


def opt350m():
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64, dropout=0.0,
                                 do_layer_norm_before=False, word_embed_proj_dim=32, **TOK)
    return transformers.OPTForCausalLM(cfg).eval()


def test_opt_350m_word_embed_proj_dim_grows_with_the_stream():
    model = opt350m()
    big = grown(model, 2)
    c = big.config
    assert (c.hidden_size, c.word_embed_proj_dim, c.ffn_dim, c.num_attention_heads) == (128, 64, 256, 8)
    ideal = transformers.OPTForCausalLM(c)
    assert sum(p.numel() for p in big.parameters()) == sum(p.numel() for p in ideal.parameters())
    # the head still shares the embedding's table
    assert big.lm_head.weight.data_ptr() == big.model.decoder.embed_tokens.weight.data_ptr()
    kept = [s for s in big.graphgrow_report.spaces if s.new_width < 2 * s.old_width]
    assert [(s.old_width, s.frozen_reasons) for s in kept] == [(VOCAB, ["reaches a model output"])]


def apertus():
    torch.manual_seed(0)
    cfg = transformers.ApertusConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **TOK)
    model = transformers.ApertusForCausalLM(cfg).eval()
    with torch.no_grad():  # xIELU's two branches both matter: non-trivial slopes
        for layer in model.model.layers:
            layer.mlp.act_fn.alpha_p.fill_(0.3)
            layer.mlp.act_fn.alpha_n.fill_(-0.7)
    return model


def test_apertus_xielu_grows_its_mlp():
    model = apertus()
    big = grown(model, 2)
    c = big.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (128, 256, 8, 4)
    assert big.model.layers[0].mlp.up_proj.weight.shape == (256, 128)
    # the activation's scalars stay scalars
    assert big.model.layers[0].mlp.act_fn.alpha_p.shape == (1,)


def lfm2():
    torch.manual_seed(0)
    cfg = transformers.Lfm2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  full_attn_idxs=[1], block_auto_adjust_ff_dim=False, **TOK)
    return transformers.Lfm2ForCausalLM(cfg).eval()


def test_lfm2_short_depthwise_conv_grows_with_the_stream():
    model = lfm2()
    big = grown(model, 2)
    c = big.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (128, 8, 4)
    conv = big.model.layers[0].conv
    assert conv.conv.weight.shape == (128, 1, 3) and conv.in_proj.weight.shape == (384, 128)
    ideal = transformers.Lfm2ForCausalLM(c)
    assert sum(p.numel() for p in big.parameters()) == sum(p.numel() for p in ideal.parameters())


def test_bert_mlm_head_transform_is_tied_to_the_embedding_columns():
    """The MLM head's transform (dense -> gelu -> LayerNorm) feeds the decoder tied to the word embeddings: its
    channels are the embedding's columns, so it widens with the stream or stays with it (x1.5: post-norm)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=66, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **TOK)
    model = transformers.BertForMaskedLM(cfg).eval()
    big = grown(model, 1.5)
    assert big.config.intermediate_size == 192
    reasons = [r for s in big.graphgrow_report.spaces for r in s.frozen_reasons]
    transform = next(s for s in big.graphgrow_report.spaces if s.name == "cls.predictions.transform.dense.weight")
    assert transform.new_width == 64 and not any("different columns" in r for r in reasons)
    assert any("post-norm" in r for r in reasons)
    big2 = grown(model, 2)
    assert big2.cls.predictions.transform.dense.weight.shape == (128, 128)


def test_codegen_at_one_and_a_half_grows_heads_and_fill():
    """CodeGen's fused mp_num blocks are read across the 4 blocks (hf/family_axes.py): at x1.5 the heads grow
    4 -> 6 (1.5 per block) and the stream fills to 96, with no fallback."""
    torch.manual_seed(0)
    cfg = transformers.CodeGenConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=64,
                                     rotary_dim=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **TOK)
    model = transformers.CodeGenForCausalLM(cfg).eval()
    big = grown(model, 1.5)
    assert (big.config.n_inner, big.config.n_head, big.config.n_embd) == (192, 6, 96)
    assert not any("fill + rescale did not verify" in n for n in big.graphgrow_report.notes)


def test_olmo_gainless_layer_norm_stream_fills_at_one_and_a_half():
    """OLMo's LayerNorm has no parameters and its eps is fixed in the code: the filled stream is scaled instead."""
    torch.manual_seed(0)
    cfg = transformers.OlmoConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **TOK)
    model = transformers.OlmoForCausalLM(cfg).eval()
    big = grown(model, 1.5)
    c = big.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (96, 192, 6, 3)
    ideal = transformers.OlmoForCausalLM(c)
    assert sum(p.numel() for p in big.parameters()) == sum(p.numel() for p in ideal.parameters())


def electra(cls="ElectraModel"):
    torch.manual_seed(0)
    cfg = transformers.ElectraConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=66, embedding_size=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    return getattr(transformers, cls)(cfg).eval()


def test_electra_model_at_two_keeps_the_embedding_its_config_would_drop_the_projection_for():
    # ElectraModel returns the stream (64 stays: a model output); embedding_size 32 -> 64 would equal hidden_size,
    # and ElectraConfig then builds no embeddings_project: that space stays, named; the MLP grows
    model = electra()
    torch.manual_seed(0)
    x = ids()
    big = graphgrow.widen(model, 2, example_inputs=(x,))
    y = ids(7)
    with torch.no_grad():
        assert max_rel(model(y).last_hidden_state, big(y).last_hidden_state) < 1e-5
    c = big.config
    assert (c.hidden_size, c.embedding_size, c.intermediate_size, c.num_attention_heads) == (64, 32, 256, 4)
    assert sum(p.numel() for p in big.parameters()) == 108_416  # 75,392 + 2 layers x (2 x 64 x 128 + 128)
    assert type(model)(c).load_state_dict(big.state_dict(), strict=True) is not None
    why = {s.name: " ".join(s.frozen_reasons) for s in big.graphgrow_report.spaces if s.new_width == s.old_width}
    assert "embedding_size 64: 'embeddings_project" in why["embeddings.word_embeddings.weight"]
    assert "cannot state it grown" in why["embeddings.word_embeddings.weight"]
    assert "hidden_size 64 is not 8 heads x 16" in why["encoder.layer.0.attention.self.query.weight"]


def test_electra_mlm_at_two_grows_the_embedding_and_the_stream_apart():
    # with a head the stream grows too: embedding_size 64 != hidden_size 128, embeddings_project kept
    model = electra("ElectraForMaskedLM")
    big = grown(model, 2)
    c = big.config
    assert (c.hidden_size, c.embedding_size, c.intermediate_size, c.num_attention_heads) == (128, 64, 256, 8)
    ideal = transformers.ElectraForMaskedLM(c)
    assert sum(p.numel() for p in big.parameters()) == sum(p.numel() for p in ideal.parameters()) == 294_464
    kept = [s for s in big.graphgrow_report.spaces if s.new_width < 2 * s.old_width]
    assert [(s.old_width, s.frozen_reasons) for s in kept] == [(VOCAB, ["reaches a model output"])]
