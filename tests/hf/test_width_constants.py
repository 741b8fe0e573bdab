"""Issue 18 (encoder-decoders and width-derived constants): Gemma's sqrt(hidden) normalizer and the
``scale_embedding`` families compensated exactly, encoder-decoders (T5, BART, Marian...) widened across encoder,
decoder and cross-attention with the shared table tied, ALBERT's shared layer grown once for all its readers.
Each grown model is compared with the family built at the requested widths (the "ideal": parameter counts),
its config states the sizes, and its logits are checked here again."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import graphgrow  # noqa: E402

V = 96
TOK = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0)
BART = dict(TOK, vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def build(cls, attn="sdpa", **cfg):
    config = cls.config_class(**cfg)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return cls(config).eval()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def tokens(seed, length):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, V, (2, length), generator=g)
    x[0, 0] = V - 1
    return x


def max_rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


def check(model, grown, feeds):
    with torch.no_grad():
        for feed in feeds:
            assert max_rel(model(**feed).logits, grown(**feed).logits) < 1e-5


def gemma(**kw):
    cfg = dict(TOK, vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    cfg.update(kw)
    return build(transformers.GemmaForCausalLM, **cfg)


@pytest.mark.parametrize("factor", [2, 1.5])
def test_gemma_normalizer_is_compensated(factor):
    """embed * sqrt(hidden): the table is scaled by sqrt(d/d') and the tied head's factor folded into the final
    (1 + w) RMSNorm gain; the stream grows, the model equals the family built at the new widths."""
    model = gemma()
    grown = graphgrow.widen(model, factor, example_inputs=(tokens(0, 10),))
    sizes = dict(hidden_size=int(64 * factor), intermediate_size=int(128 * factor),
                 num_attention_heads=int(4 * factor), num_key_value_heads=int(2 * factor))
    assert {k: getattr(grown.config, k) for k in sizes} == sizes
    assert grown.config.head_dim == 16
    assert n_params(grown) == n_params(gemma(**sizes))
    assert grown.model.embed_tokens.weight.data_ptr() == grown.lm_head.weight.data_ptr()
    check(model, grown, [{"input_ids": tokens(s, 9)} for s in (1, 2)])


@pytest.mark.parametrize("cls", ["BartForConditionalGeneration", "MarianMTModel", "M2M100ForConditionalGeneration"])
def test_seq2seq_scale_embedding(cls):
    """scale_embedding=True (embed * sqrt(d_model), the family recomputes it from d_model): exact at x2 with the
    stream, heads and FFN grown where the family allows it."""
    cls = getattr(transformers, cls)
    model = build(cls, **BART, scale_embedding=True)
    feed = {"input_ids": tokens(0, 10), "decoder_input_ids": tokens(1, 6)}
    grown = graphgrow.widen(model, 2, example_inputs=feed)
    check(model, grown, [{"input_ids": tokens(s, 9), "decoder_input_ids": tokens(s + 5, 5)} for s in (2, 3)])
    assert grown.config.encoder_ffn_dim == grown.config.decoder_ffn_dim == 128
    if cls in (transformers.M2M100ForConditionalGeneration, transformers.MarianMTModel):
        # their sinusoidal positions are computed from d_model (M2M100: a buffer; Marian: a parameter
        # save_pretrained leaves out, recomputed at load): the stream stays, with that reason
        reasons = " ".join(r for s in grown.graphgrow_report.spaces for r in s.frozen_reasons)
        assert grown.config.d_model == 32 and "sinusoidal" in reasons
        return
    ideal = dict(d_model=64, encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=128,
                 decoder_ffn_dim=128)
    assert {k: getattr(grown.config, k) for k in ideal} == ideal
    assert n_params(grown) == n_params(build(cls, **{**BART, **ideal}, scale_embedding=True))
    shared = grown.get_input_embeddings().weight
    assert shared.data_ptr() == grown.get_output_embeddings().weight.data_ptr()


def test_biogpt_scale_embedding():
    cfg = dict(TOK, vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = build(transformers.BioGptForCausalLM, **cfg)
    grown = graphgrow.widen(model, 2, example_inputs=(tokens(0, 10),))
    assert (grown.config.hidden_size, grown.config.num_attention_heads) == (64, 8)
    ideal = build(transformers.BioGptForCausalLM, **{**cfg, "hidden_size": 64, "intermediate_size": 128,
                                                     "num_attention_heads": 8})
    assert n_params(grown) == n_params(ideal)
    check(model, grown, [{"input_ids": tokens(s, 9)} for s in (1, 2)])


def t5(**kw):
    cfg = dict(TOK, vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0)
    cfg.update(kw)
    return build(transformers.T5ForConditionalGeneration, "eager", **cfg)


def test_t5_widens_encoder_decoder_and_relative_bias_heads():
    """T5 x2: stream, heads (the relative position bias follows the head copies), FFN; the shared table stays
    tied and the head's d_model ** -0.5 (computed from the width) is compensated."""
    model = t5()
    feed = {"input_ids": tokens(0, 10), "decoder_input_ids": tokens(1, 6)}
    grown = graphgrow.widen(model, 2, example_inputs=feed)
    assert (grown.config.d_model, grown.config.d_kv, grown.config.d_ff, grown.config.num_heads) == (64, 8, 128, 8)
    assert n_params(grown) == n_params(t5(d_model=64, d_ff=128, num_heads=8))
    assert grown.shared.weight.data_ptr() == grown.lm_head.weight.data_ptr()
    bias = grown.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    old = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert bias.shape == (old.shape[0], 8)
    source = [next(j for j in range(4) if torch.equal(bias[:, i], old[:, j])) for i in range(8)]  # head copies
    assert sorted(set(source)) == [0, 1, 2, 3]
    check(model, grown, [{"input_ids": tokens(s, 9), "decoder_input_ids": tokens(s + 5, 5)} for s in (2, 3)])


def albert(**kw):
    cfg = dict(TOK, vocab_size=V, embedding_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4, max_position_embeddings=32, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
    cfg.update(kw)
    return build(transformers.AlbertForMaskedLM, **cfg)


def test_albert_shared_layer_grows_once_for_all_its_readers():
    """One layer's parameters read by every layer, the embedding_size -> hidden projection and the tied decoder:
    every width grows; the grown model has exactly the parameters of the family built at the new widths."""
    model = albert()
    grown = graphgrow.widen(model, 2, example_inputs=(tokens(0, 10),))
    sizes = dict(embedding_size=32, hidden_size=64, intermediate_size=128, num_attention_heads=8)
    assert {k: getattr(grown.config, k) for k in sizes} == sizes
    assert n_params(grown) == n_params(albert(**sizes))
    assert grown.albert.embeddings.word_embeddings.weight.data_ptr() == grown.predictions.decoder.weight.data_ptr()
    check(model, grown, [{"input_ids": tokens(s, 9)} for s in (1, 2)])


def test_whisper_speech_encoder_decoder():
    """input_features + decoder_input_ids: the convolutional encoder, the decoder (positions read as weight[ids])
    and the cross-attention grow together; the decoder's table stays tied to proj_out."""
    cfg = dict(TOK, vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
               max_source_positions=8, max_target_positions=16, dropout=0.0, attention_dropout=0.0,
               activation_dropout=0.0, begin_suppress_tokens=None, suppress_tokens=None)
    model = build(transformers.WhisperForConditionalGeneration, **cfg)
    g = torch.Generator().manual_seed(0)
    feed = {"input_features": torch.randn(2, 8, 16, generator=g), "decoder_input_ids": tokens(1, 6)}
    grown = graphgrow.widen(model, 2, example_inputs=feed)
    ideal = dict(d_model=64, encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=128,
                 decoder_ffn_dim=128)
    assert {k: getattr(grown.config, k) for k in ideal} == ideal
    assert n_params(grown) == n_params(build(transformers.WhisperForConditionalGeneration, **{**cfg, **ideal}))
    assert grown.model.decoder.embed_tokens.weight.data_ptr() == grown.proj_out.weight.data_ptr()
    check(model, grown, [{"input_features": torch.randn(2, 8, 16, generator=g), "decoder_input_ids": tokens(s, 5)}
                         for s in (2, 3)])
