"""Block copy where the family builds layers by position or holds several lists as long as its stack: DeepSeek's
and GLM4-MoE's dense prefix (first_k_dense_replace grows with a copy of a dense layer), MoE families whose
experts scatter into zeros, gather biases by id or loop over the experts hit (GPT-OSS, JetMoE, DBRX),
ModernBERT's layer 0 without attn_norm, the residual stack picked among lists of the same length (HuBERT,
Speech2Text), blocks inside a stage (Swin, ConvNeXt: depths[i]) and ALBERT's shared group.  Numbers asserted:
max relative error 0 (a copy adds exact zeros), layer counts, config fields, the copy's zeroed tensors."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import graphgrow  # noqa: E402
from graphgrow.errors import UnsupportedModelError  # noqa: E402

VOCAB = 128
TOK = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
DEC = dict(TOK, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)
MOE = dict(DEC, num_experts_per_tok=2, moe_intermediate_size=64)
MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


def build(cls: str, attn: str = "sdpa", **cfg):
    model_cls = getattr(transformers, cls)
    config = model_cls.config_class(**cfg)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return model_cls(config).eval()


def ids(seed=0, length=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, VOCAB, (2, length), generator=g)
    x[0, 0] = VOCAB - 1  # graphgrow draws check inputs up to the example's maximum
    return x


def max_rel(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


def logits(model, x):
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def copied(model, after, x, tmp_path=None):
    """The deepened model; asserts the same class and max relative error 0 (also after save/load)."""
    grown = graphgrow.deepen(model, after=after, block="copy", example_inputs=x)
    assert type(grown) is type(model)
    ref = logits(model, x)
    assert max_rel(ref, logits(grown, x)) == 0.0
    if tmp_path is not None:
        grown.save_pretrained(tmp_path)
        back = type(model).from_pretrained(tmp_path, attn_implementation=model.config._attn_implementation).eval()
        assert max_rel(ref, logits(back, x)) == 0.0
    return grown


DENSE_PREFIX = {
    "deepseek-v2": lambda: build("DeepseekV2ForCausalLM", **dict(MOE, num_key_value_heads=4), **MLA, n_routed_experts=4,
                                 n_shared_experts=1, first_k_dense_replace=1, topk_method="greedy"),
    "deepseek-v3": lambda: build("DeepseekV3ForCausalLM", **dict(MOE, num_key_value_heads=4), **MLA, n_routed_experts=4,
                                 n_group=1, topk_group=1, first_k_dense_replace=1),
    "glm4-moe": lambda: build("Glm4MoeForCausalLM", **MOE, n_routed_experts=4, n_shared_experts=1, n_group=1,
                              topk_group=1, first_k_dense_replace=1),
}


@pytest.mark.parametrize("family", sorted(DENSE_PREFIX))
def test_copy_of_a_dense_prefix_layer_is_dense(family, tmp_path):
    model = DENSE_PREFIX[family]()
    grown = copied(model, "model.layers.0", ids(), tmp_path)
    assert (grown.config.num_hidden_layers, grown.config.first_k_dense_replace) == (3, 2)
    state, old = grown.state_dict(), model.state_dict()
    # the copy (layer 1) is dense like layer 0, its output projections zero; old layer 1 (MoE) is now layer 2
    assert not state["model.layers.1.mlp.down_proj.weight"].any()
    assert not state["model.layers.1.self_attn.o_proj.weight"].any()
    assert torch.equal(state["model.layers.1.mlp.up_proj.weight"], old["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(state["model.layers.2.mlp.experts.down_proj"], old["model.layers.1.mlp.experts.down_proj"])
    assert "model.layers.1.mlp.experts.down_proj" not in state
    assert sum(t.numel() for t in grown.parameters()) - sum(t.numel() for t in model.parameters()) == \
        sum(t.numel() for k, t in old.items() if k.startswith("model.layers.0."))
    assert any("first_k_dense_replace: 1 -> 2" in n for n in grown.graphgrow_report.notes)


MOE_LAYERS = {
    # per-expert down biases gathered by the router's ids (read as an embedding of the bias table)
    "gpt-oss": (lambda: build("GptOssForCausalLM", "eager", **dict(DEC, head_dim=16), num_local_experts=4,
                              num_experts_per_tok=2, sliding_window=16),
                "model.layers.0", ["mlp.experts.down_proj", "mlp.experts.down_proj_bias", "self_attn.o_proj.bias",
                                   "self_attn.o_proj.weight"]),
    # experts' outputs concatenated along the tokens and scattered into zeros (MLP and mixture of attention)
    "jetmoe": (lambda: build("JetMoeForCausalLM", "eager", **{k: v for k, v in DEC.items() if k != "num_attention_heads"},
                             kv_channels=16, num_local_experts=4, num_experts_per_tok=2),
               "model.layers.1", ["mlp.bias", "mlp.output_linear.weight", "self_attention.experts.bias",
                                  "self_attention.experts.output_linear.weight"]),
    # a loop over the experts a batch hits (captured as the same sum over every expert)
    "dbrx": (lambda: build("DbrxForCausalLM", **TOK, vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2,
                           max_seq_len=64, attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                           ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}),
             "transformer.blocks.0", ["ffn.experts.mlp.w2", "norm_attn_norm.attn.out_proj.weight"]),
}


@pytest.mark.parametrize("family", sorted(MOE_LAYERS))
def test_moe_layers_copied_exactly(family, tmp_path):
    build_model, layer, zeroed = MOE_LAYERS[family]
    model = build_model()
    grown = copied(model, layer, ids(), tmp_path)
    assert grown.config.num_hidden_layers == 3
    head, _, i = layer.rpartition(".")
    copy_ = f"{head}.{int(i) + 1}"
    state, old = grown.state_dict(), model.state_dict()
    note = next(n for n in grown.graphgrow_report.notes if n.startswith(f"{layer} copied after itself"))
    assert note.split(": ", 1)[1] == ", ".join(f"{layer}.{k}" for k in zeroed)
    for k in zeroed:
        assert not state[f"{copy_}.{k}"].any()
    assert any(old[f"{layer}.{k}"].any() for k in zeroed)
    for k in state:  # everything else of the copy is the layer's own (router, gate/up experts, norms)
        if k.startswith(copy_ + ".") and k[len(copy_) + 1:] not in zeroed:
            assert torch.equal(state[k], old[f"{layer}.{k[len(copy_) + 1:]}"]), k


def test_dbrx_capture_substitute_is_the_same_function():
    from graphgrow.hf.exportable import exportable

    model = MOE_LAYERS["dbrx"][0]()
    ref = logits(model, ids(2))
    with exportable(model):
        dense = logits(model, ids(2))
    assert max_rel(ref, dense) < 1e-6
    assert "forward" not in vars(model.transformer.blocks[0].ffn.experts)  # put back


def test_modernbert_copy_of_layer_zero_gets_its_attn_norm(tmp_path):
    model = build("ModernBertForMaskedLM", **{k: v for k, v in DEC.items() if k != "num_key_value_heads"},
                  local_attention=8, cls_token_id=1, sep_token_id=2)
    grown = copied(model, "model.layers.0", ids(), tmp_path)
    assert grown.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    state = grown.state_dict()
    assert "model.layers.0.attn_norm.weight" not in state  # layer 0 stays without
    assert torch.equal(state["model.layers.1.attn_norm.weight"], torch.ones(64))  # the family's initial value
    assert not state["model.layers.1.attn.Wo.weight"].any() and not state["model.layers.1.mlp.Wo.weight"].any()
    assert any("attn_norm.weight" in n and "built fresh" in n for n in grown.graphgrow_report.notes)


AUDIO = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, conv_dim=[32, 32],
             conv_stride=[5, 2], conv_kernel=[10, 3], num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
             hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0)


def test_hubert_stack_is_the_encoder_not_the_conv_extractor(tmp_path):
    """conv_layers is as long as encoder.layers: the stack is the list that grows with num_hidden_layers, and
    conv_dim / conv_stride / conv_kernel (as long as the stack) stay as they are."""
    from graphgrow.hf.stacks import layer_stacks

    model = build("HubertModel", **AUDIO, do_stable_layer_norm=True, feat_extract_norm="layer")
    (stack,) = layer_stacks(model)
    assert (stack.path, stack.n, stack.field) == ("encoder.layers", 2, "num_hidden_layers")
    x = torch.randn(2, 400, generator=torch.Generator().manual_seed(0))
    grown = copied(model, "encoder.layers.1", x)
    assert (len(grown.encoder.layers), len(grown.feature_extractor.conv_layers)) == (3, 2)
    assert (grown.config.conv_dim, grown.config.conv_stride, grown.config.conv_kernel) == ([32, 32], [5, 2], [10, 3])
    assert not grown.state_dict()["encoder.layers.2.feed_forward.output_dense.weight"].any()


def test_wav2vec2_post_norm_is_refused_in_one_sentence():
    model = build("Wav2Vec2Model", **AUDIO)
    with pytest.raises(UnsupportedModelError, match="post-norm") as e:
        graphgrow.deepen(model, after="encoder.layers.0", block="copy", example_inputs=(torch.randn(2, 400),))
    assert str(e.value).startswith("encoder.layers.0") and "\n" not in str(e.value)


def test_speech2text_encoder_stack_beside_its_conv_subsampler():
    model = build("Speech2TextForConditionalGeneration", "eager", **TOK, vocab_size=VOCAB, d_model=64,
                  encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=128, decoder_ffn_dim=128, dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0, decoder_start_token_id=2, max_source_positions=64,
                  max_target_positions=64, num_conv_layers=2, conv_kernel_sizes=[5, 5], conv_channels=32,
                  input_feat_per_channel=16, input_channels=1)
    g = torch.Generator().manual_seed(0)
    x = {"input_features": torch.randn(2, 32, 16, generator=g), "decoder_input_ids": ids()[:, :5]}
    grown = copied(model, r"model\.(en|de)coder\.layers\.0", x)
    assert (grown.config.encoder_layers, grown.config.decoder_layers) == (3, 3)
    assert len(grown.model.encoder.conv.conv_layers) == 2


def swin():
    return build("SwinForImageClassification", "eager", image_size=32, patch_size=4, embed_dim=32, depths=[2, 2],
                 num_heads=[2, 4], window_size=4, num_labels=10)


def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_swin_block_copied_at_the_end_of_its_stage(tmp_path):
    model = swin()
    logits(model, pixels())  # Swin's forward resets a stage's shift_size where the windows cover the map
    grown = copied(model, "swin.encoder.layers.0.blocks.1", pixels(), tmp_path)
    assert grown.config.depths == [3, 2]
    assert [len(s.blocks) for s in grown.swin.encoder.layers] == [3, 2]
    assert not grown.state_dict()["swin.encoder.layers.0.blocks.2.mlp.fc2.weight"].any()


def test_swin_copy_before_a_shifted_block_is_refused_in_one_sentence():
    """Swin alternates unshifted and shifted windows by position: a copy of block 0 moves block 1 (shifted) to
    an unshifted position."""
    with pytest.raises(UnsupportedModelError, match=r"blocks\.1 differently at its new position 2 \(shift_size") as e:
        graphgrow.deepen(swin(), after="swin.encoder.layers.0.blocks.0", block="copy", example_inputs=pixels())
    assert "\n" not in str(e.value)


def test_convnext_layer_inside_a_stage(tmp_path):
    model = build("ConvNextForImageClassification", "eager", image_size=32, patch_size=4, num_stages=2,
                  hidden_sizes=[32, 64], depths=[2, 2], num_labels=10)
    grown = copied(model, r"convnext\.encoder\.stages\.(0|1)\.layers\.0", pixels(), tmp_path)
    assert grown.config.depths == [3, 3]
    state = grown.state_dict()
    for s in (0, 1):
        assert not state[f"convnext.encoder.stages.{s}.layers.1.pwconv2.weight"].any()
        assert not state[f"convnext.encoder.stages.{s}.layers.1.pwconv2.bias"].any()
    assert sum(t.numel() for t in grown.parameters()) - sum(t.numel() for t in model.parameters()) == \
        sum(t.numel() for k, t in model.state_dict().items() if ".layers.0." in k)


def test_albert_shared_layer_is_refused_as_post_norm():
    """ALBERT's one shared layer sits in albert_layers (inner_group_num states its length); it normalizes after
    its residual add, so a zeroed copy would not be the identity."""
    from graphgrow.hf.stacks import layer_stacks

    model = build("AlbertForMaskedLM", **{k: v for k, v in DEC.items() if k != "num_key_value_heads"},
                  embedding_size=32, num_hidden_groups=1, inner_group_num=1, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    (stack,) = layer_stacks(model)
    assert (stack.path, stack.field) == ("albert.encoder.albert_layer_groups.0.albert_layers", "inner_group_num")
    with pytest.raises(UnsupportedModelError, match="post-norm") as e:
        graphgrow.deepen(model, after="albert.encoder.albert_layer_groups.0.albert_layers.0", block="copy",
                         example_inputs=(ids(),))
    assert "\n" not in str(e.value)
