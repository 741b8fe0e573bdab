"""Hugging Face vision encoders without token embeddings (ConvNeXt, ResNet: one width per stage in a list
field) and Swin (per-stage head counts): widened exactly, the per-stage sizes found by probing the list
entries, or kept with the reason."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import graphgrow  # noqa: E402
from graphgrow.hf.config import meta_shapes, solve_config  # noqa: E402


def pixels(seed=0, size=32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def build(cls, **kw):
    torch.manual_seed(0)
    cfg = cls.config_class(**kw)
    cfg._attn_implementation = "eager"
    return cls(cfg).eval()


def convnext(hidden_sizes=(16, 32), cls=transformers.ConvNextForImageClassification):
    return build(cls, hidden_sizes=list(hidden_sizes), depths=[1, 1], num_stages=2, image_size=32, num_labels=10)


def swin(embed_dim=16, num_heads=(2, 4)):
    return build(transformers.SwinForImageClassification, image_size=32, patch_size=4, embed_dim=embed_dim,
                 depths=[1, 1], num_heads=list(num_heads), window_size=4, num_labels=10)


@torch.no_grad()
def logits(model, x):
    return model(x)[0]


def test_convnext_widens_every_stage_exactly(tmp_path):
    model = convnext()
    wide = graphgrow.widen(model, 2, example_inputs=(pixels(),))
    assert type(wide) is type(model) and wide.config.hidden_sizes == [32, 64]
    assert n_params(model) == 16346 and n_params(wide) == n_params(convnext((32, 64))) == 57258  # ideal: all x2
    for seed in range(3):
        assert max_rel(logits(model, pixels(seed)), logits(wide, pixels(seed))) < 1e-5
    wide.save_pretrained(tmp_path)
    again = transformers.ConvNextForImageClassification.from_pretrained(tmp_path).eval()
    assert max_rel(logits(wide, pixels()), logits(again, pixels())) == 0.0


def test_convnext_base_model_keeps_the_stage_that_is_its_output():
    model = convnext(cls=transformers.ConvNextModel)
    wide = graphgrow.widen(model, 2, example_inputs=(pixels(),))
    assert wide.config.hidden_sizes == [32, 32]  # the last stage is last_hidden_state: reason (a)
    assert n_params(model) == 16016 and n_params(wide) == 25984
    with torch.no_grad():
        assert max_rel(model(pixels()).last_hidden_state, wide(pixels()).last_hidden_state) < 1e-5
    kept = {s.name: s.frozen_reasons for s in wide.graphgrow_report.spaces if s.new_width == s.old_width}
    assert "reaches a model output" in kept["encoder.stages.1.downsampling_layer.1.weight"]


def test_resnet_widens_through_batch_norm_and_max_pool():
    model = build(transformers.ResNetForImageClassification, hidden_sizes=[16, 32], depths=[1, 1],
                  embedding_size=16, num_labels=10)
    wide = graphgrow.widen(model, 2, example_inputs=(pixels(),))
    assert wide.config.hidden_sizes == [32, 64] and wide.config.embedding_size == 32
    assert (n_params(model), n_params(wide)) == (4666, 12810)
    assert max_rel(logits(model, pixels(1)), logits(wide, pixels(1))) < 1e-5


def test_list_entries_are_probed_for_swin_stage_heads():
    """Swin states one head count per stage: a grown shape set (every stage x2, head size kept) is solved
    entry by entry, and the solved config passes SwinConfig's own validation."""
    model = swin()
    target = meta_shapes(type(model), swin(32, (4, 8)).config)
    cfg = solve_config(type(model), model.config, target, {})
    assert (cfg.embed_dim, list(cfg.num_heads)) == (32, [4, 8])
    type(cfg).from_dict(cfg.to_dict())
    assert meta_shapes(type(model), cfg) == target


def test_swin_grown_config_loads_and_the_function_is_kept(tmp_path):
    model = swin()
    wide = graphgrow.widen(model, 2, example_inputs=(pixels(),))
    wide.save_pretrained(tmp_path)
    again = transformers.SwinForImageClassification.from_pretrained(tmp_path).eval()  # SwinConfig validates
    assert max_rel(logits(model, pixels(2)), logits(again, pixels(2))) < 1e-5
    assert wide.config.embed_dim * 2 ** (len(wide.config.depths) - 1) == again.swin.num_features
    for s in wide.graphgrow_report.spaces:
        assert s.new_width == 2 * s.old_width or s.frozen_reasons, s.name


def test_wav2vec2_weight_normed_positional_conv_and_unread_mask_embedding():
    """Wav2Vec2ForCTC: the conv feature extractor (GroupNorm), the grouped positional conv whose weight is
    weight_norm(v, g) (stored back as v' = w', g' = ||w'||) and the transformer all grow; masked_spec_embed,
    which no forward pass reads, is repeated to the new width."""
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, conv_dim=(32, 32),
              conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
              vocab_size=32)
    model = build(transformers.Wav2Vec2ForCTC, **kw)
    audio = torch.randn(2, 400, generator=torch.Generator().manual_seed(0))
    wide = graphgrow.widen(model, 2, example_inputs=(audio,))
    cfg = wide.config
    assert (cfg.hidden_size, list(cfg.conv_dim), cfg.intermediate_size, cfg.num_attention_heads) == (128, [64, 64], 256, 8)
    ideal = build(transformers.Wav2Vec2ForCTC, **{**kw, "hidden_size": 128, "intermediate_size": 256,
                                                  "num_attention_heads": 8, "conv_dim": (64, 64)})
    assert (n_params(model), n_params(wide)) == (91312, n_params(ideal)) == (91312, 356656)
    audio2 = torch.randn(2, 400, generator=torch.Generator().manual_seed(1))
    assert max_rel(logits(model, audio2), logits(wide, audio2)) < 1e-5
    assert torch.equal(wide.wav2vec2.masked_spec_embed[:64], model.wav2vec2.masked_spec_embed)


def test_convnext_checkpoint_directory_widens_streamed(tmp_path):
    from graphgrow.cli import main

    model = convnext()
    model.config.architectures = ["ConvNextForImageClassification"]
    model.save_pretrained(tmp_path / "src")
    assert main(["widen", str(tmp_path / "src"), "--factor", "2", "-o", str(tmp_path / "out")]) == 0
    again = transformers.ConvNextForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert again.config.hidden_sizes == [32, 64] and n_params(again) == 57258
    assert max_rel(logits(model, pixels(3)), logits(again, pixels(3))) < 1e-5



@pytest.mark.parametrize("factor", [2, 1.5])
@pytest.mark.parametrize("name", ["beit", "data2vec-vision"])
def test_relative_position_tables_follow_the_heads(name, factor):
    """BEiT (a table per layer) and Data2Vec-vision (one shared table): the [distances, heads] table is sliced,
    interpolated, gathered by constant indices and passed to sdpa as its mask; its head columns are copied with
    the heads. Layer scale (λ) on the branches: at x1.5 the stream takes fill + rescale, exactly."""
    cls, kw = {"beit": (transformers.BeitForImageClassification, {"use_relative_position_bias": True}),
               "data2vec-vision": (transformers.Data2VecVisionForImageClassification,
                                   {"use_shared_relative_position_bias": True})}[name]
    model = build(cls, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8, num_labels=10, layer_scale_init_value=0.5, **kw)
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():  # (the tables start at zero: random values make the head copies visible)
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n or "lambda" in n:
                p.uniform_(0.2, 1.0)
    wide = graphgrow.widen(model, factor, example_inputs=(pixels(),))
    cfg = wide.config
    h = int(64 * factor)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (h, 2 * h, h // 16)
    ideal = build(cls, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2, num_attention_heads=h // 16,
                  image_size=32, patch_size=8, num_labels=10, **kw)
    assert n_params(wide) == n_params(ideal)
    assert max_rel(logits(model, pixels(1)), logits(wide, pixels(1))) < 1e-5
    tables = [(k, v) for k, v in wide.state_dict().items() if k.endswith("relative_position_bias_table")]
    assert len(tables) == (1 if name == "data2vec-vision" else 2)
    for k, v in tables:
        old = model.state_dict()[k]
        assert v.shape == (old.shape[0], h // 16)
        assert all(any(torch.equal(v[:, i], old[:, j]) for j in range(4)) for i in range(h // 16))
    assert [s.name for s in wide.graphgrow_report.spaces if s.frozen_reasons] == ["classifier.weight"]


@pytest.mark.parametrize("factor", [2])
def test_swin_grows_every_stage_through_its_shifted_windows(factor):
    model = swin()
    wide = graphgrow.widen(model, factor, example_inputs=(pixels(),))
    assert (wide.config.embed_dim, list(wide.config.num_heads)) == (32, [4, 8])
    assert n_params(wide) == n_params(swin(32, (4, 8)))
    assert max_rel(logits(model, pixels(1)), logits(wide, pixels(1))) < 1e-5
    assert [s.name for s in wide.graphgrow_report.spaces if s.frozen_reasons] == ["classifier.weight"]


def test_speech2text_conv_subsampler_glu_grows():
    """Speech2Text's conv subsampler: conv -> GLU (halves gate each other) -> conv -> GLU; the first conv's
    channels grow (conv_channels), the second's output is the stream, kept by the sinusoidal positions (d)."""
    model = build(transformers.Speech2TextForConditionalGeneration, vocab_size=64, d_model=32, encoder_layers=1,
                  decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, max_source_positions=64, max_target_positions=64, num_conv_layers=2,
                  conv_kernel_sizes=[5, 5], conv_channels=16, input_feat_per_channel=8, input_channels=1,
                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, decoder_start_token_id=2)
    g = torch.Generator().manual_seed(0)
    feats, dec = torch.randn(2, 24, 8, generator=g), torch.randint(3, 64, (2, 5), generator=g)
    wide = graphgrow.widen(model, 2, example_inputs={"input_features": feats, "decoder_input_ids": dec})
    assert wide.config.conv_channels == 32
    assert wide.model.encoder.conv.conv_layers[0].weight.shape == (32, 8, 5)
    assert wide.model.encoder.conv.conv_layers[1].weight.shape == (64, 16, 5)
    with torch.no_grad():
        a = model(input_features=feats, decoder_input_ids=dec).logits
        b = wide(input_features=feats, decoder_input_ids=dec).logits
    assert max_rel(a, b) < 1e-5
    reasons = {s.name: " ".join(s.frozen_reasons) for s in wide.graphgrow_report.spaces if s.frozen_reasons}
    assert "model.encoder.conv.conv_layers.0.weight" not in reasons
    assert "sinusoidal" in reasons["model.encoder.conv.conv_layers.1.weight"]
