"""A norm whose weight the family passes with an offset (Nemotron's LayerNorm1P: F.layer_norm(x, s, weight + 1, ...))
and a squared-ReLU MLP (aten.square): the stream grows at whole and fill + rescale factors, exactly, to the sizes
of the family built at those widths."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import graphgrow  # noqa: E402


def nemotron(**kw):
    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(kw)
    torch.manual_seed(0)
    model = transformers.NemotronForCausalLM(transformers.NemotronConfig(**cfg)).eval()
    with torch.no_grad():  # LayerNorm1P's weight starts at 0 (gain 1): make the offset matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("factor,hidden,heads,kv", [(2, 128, 8, 4), (1.5, 96, 6, 3)])
def test_nemotron_layernorm1p_stream_grows(factor, hidden, heads, kv):
    model = nemotron()
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    wide = graphgrow.widen(model, factor, example_inputs=(ids,))
    cfg = wide.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (hidden, heads, kv)
    ideal = nemotron(hidden_size=hidden, intermediate_size=int(128 * factor), num_attention_heads=heads,
                     num_key_value_heads=kv, head_dim=16)
    assert sum(p.numel() for p in wide.parameters()) == sum(p.numel() for p in ideal.parameters())
    with torch.no_grad():
        a, b = model(ids).logits, wide(ids).logits
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5


def test_fill_needs_an_epsilon_the_config_states():
    """Pegasus (pre-LN) builds nn.LayerNorm with its default eps and no config field: fill + rescale would need eps
    x d/d' there, so x1.5 keeps the stream at its width (reason (b), named) instead of returning a model that is
    off by the epsilon's share (1e-5 relative: inside float32 tolerances, visible in float64)."""
    cfg = transformers.PegasusConfig(vocab_size=96, d_model=64, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                     decoder_ffn_dim=128, max_position_embeddings=64, dropout=0.0,
                                     attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0,
                                     decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.PegasusForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(0)
    feed = {"input_ids": torch.randint(3, 96, (2, 9), generator=g),
            "decoder_input_ids": torch.randint(3, 96, (2, 5), generator=g)}
    wide = graphgrow.widen(model, 1.5, example_inputs=feed)
    assert wide.config.d_model == 64 and wide.config.decoder_ffn_dim == 192
    reasons = " ".join(r for s in wide.graphgrow_report.spaces for r in s.frozen_reasons)
    assert "no norm epsilon field" in reasons
    with torch.no_grad():
        a, b = model.double()(**feed).logits, wide.double()(**feed).logits
    assert float((a - b).abs().max() / a.abs().max()) < 1e-9
