"""Block copy (graphgrow.deepen(block="copy")) on encoder-decoders (a stack at a time or both) and on MoE and
parallel-branch families: same class, the config stating each stack's depth, the same logits (max relative
error 0: the copy adds exact zeros), the copy's output projections zero, save/load and greedy generate."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import graphgrow  # noqa: E402
from graphgrow.errors import UnsupportedModelError  # noqa: E402

VOCAB = 128
TOK = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
DEC = dict(TOK, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)
MOE = dict(DEC, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)


def build(cls: str, attn: str = "sdpa", **cfg):
    model_cls = getattr(transformers, cls)
    config = model_cls.config_class(**cfg)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return model_cls(config).eval()


def t5():
    return build("T5ForConditionalGeneration", "eager", vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=3,
                 num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)


def seq2seq(cls: str):
    return build(cls, "eager", **TOK, vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                 max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                 decoder_start_token_id=2)


CAUSAL = {
    "mixtral": lambda: build("MixtralForCausalLM", **DEC, num_local_experts=4, num_experts_per_tok=2),
    "qwen2-moe": lambda: build("Qwen2MoeForCausalLM", **MOE, shared_expert_intermediate_size=128),
    "qwen3-moe": lambda: build("Qwen3MoeForCausalLM", **MOE),
    "olmoe": lambda: build("OlmoeForCausalLM", **{k: v for k, v in MOE.items() if k != "moe_intermediate_size"}),
    # layer 0 dense (first_k_dense_replace=1): layer 2, an MoE layer with shared experts, is copied
    "deepseek-v3": lambda: build("DeepseekV3ForCausalLM", **dict(MOE, num_hidden_layers=4, num_key_value_heads=4),
                                 kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                 v_head_dim=16, n_routed_experts=4, n_group=1, topk_group=1, first_k_dense_replace=1),
    "falcon": lambda: build("FalconForCausalLM", **{k: v for k, v in DEC.items() if k != "num_key_value_heads"},
                            ffn_hidden_size=128, num_kv_heads=2, new_decoder_architecture=True),
}
# the layer copied and the output projections its copy zeroes (stacked 3-D expert down_proj: every expert)
CAUSAL_AFTER = {
    "mixtral": ("model.layers.0", ["mlp.experts.down_proj", "self_attn.o_proj.weight"]),
    "qwen2-moe": ("model.layers.0", ["mlp.experts.down_proj", "mlp.shared_expert.down_proj.weight",
                                     "self_attn.o_proj.weight"]),
    "qwen3-moe": ("model.layers.1", ["mlp.experts.down_proj", "self_attn.o_proj.weight"]),
    "olmoe": ("model.layers.0", ["mlp.experts.down_proj", "self_attn.o_proj.weight"]),
    "deepseek-v3": ("model.layers.2", ["mlp.experts.down_proj", "mlp.shared_experts.down_proj.weight",
                                       "self_attn.o_proj.weight"]),
    "falcon": ("transformer.h.0", ["mlp.dense_4h_to_h.weight", "self_attention.dense.weight"]),
}


def ids(seed=0, length=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, VOCAB, (2, length), generator=g)
    x[0, 0] = VOCAB - 1  # graphgrow draws check inputs up to the example's maximum
    return x


def max_rel(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


def reloaded(model, tmp_path):
    model.save_pretrained(tmp_path)
    return type(model).from_pretrained(tmp_path, attn_implementation=model.config._attn_implementation).eval()


@pytest.mark.parametrize("family", sorted(CAUSAL))
def test_moe_and_parallel_layers_are_copied_exactly(family, tmp_path):
    model = CAUSAL[family]()
    layer, zeroed = CAUSAL_AFTER[family]
    grown = graphgrow.deepen(model, after=layer, block="copy", example_inputs=(ids(),))
    assert type(grown) is type(model)
    assert grown.config.num_hidden_layers == model.config.num_hidden_layers + 1
    with torch.no_grad():
        ref = model(ids(1)).logits
        assert max_rel(ref, grown(ids(1)).logits) == 0.0
    head, _, i = layer.rpartition(".")
    copy_ = f"{head}.{int(i) + 1}"
    state, old = grown.state_dict(), model.state_dict()
    rest = {k[len(copy_) + 1:] for k in state if k.startswith(copy_ + ".")}
    assert sorted(k for k in rest if not state[f"{copy_}.{k}"].any() and old[f"{layer}.{k}"].any()) == zeroed
    for k in state:  # everything else of the copy is the layer's own weights (router, gate/up experts, norms)
        if k.startswith(copy_ + ".") and k[len(copy_) + 1:] not in zeroed:
            assert torch.equal(state[k], old[f"{layer}.{k[len(copy_) + 1:]}"]), k
    prompt = ids(4)[:1, :6]
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False),
                       grown.generate(prompt, max_new_tokens=6, do_sample=False))
    back = reloaded(grown, tmp_path)
    assert back.config.num_hidden_layers == grown.config.num_hidden_layers
    with torch.no_grad():
        assert max_rel(ref, back(ids(1)).logits) == 0.0


def seq_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": ids(seed), "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=g)}


def _generate(model, grown):
    """Greedy generate of both; the grown one with a cache grown as the layers are met (transformers 5.24 sizes
    the default decoder cache by num_hidden_layers, the encoder's depth)."""
    kw = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[0, 1, 2])
    cache = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
    prompt = ids(3)[:1]
    return model.generate(prompt, **kw), grown.generate(prompt, cache=cache, **kw)


@pytest.mark.parametrize("after, depths", [
    ("encoder.block.1", (4, 3)),
    ("decoder.block.1", (3, 4)),
    (r"(en|de)coder\.block\.1", (4, 4)),  # both stacks at once
    # block 0 holds T5's relative position bias, which later blocks receive from it: the copy is built without
    (["encoder.block.2", "decoder.block.0"], (4, 4)),
])
def test_t5_block_copy_per_stack(after, depths, tmp_path):
    model = t5()
    grown = graphgrow.deepen(model, after=after, block="copy", example_inputs=seq_inputs())
    assert type(grown) is type(model)
    assert (grown.config.num_layers, grown.config.num_decoder_layers) == depths
    assert (len(grown.encoder.block), len(grown.decoder.block)) == depths
    with torch.no_grad():
        ref = model(**seq_inputs(1)).logits
        assert max_rel(ref, grown(**seq_inputs(1)).logits) == 0.0
    state = grown.state_dict()
    if depths[1] == 4:  # the decoder copy: self-attention, cross-attention and FFN outputs zero
        i = 1 if "decoder.block.0" in after else 2
        for k in ("layer.0.SelfAttention.o.weight", "layer.1.EncDecAttention.o.weight", "layer.2.DenseReluDense.wo.weight"):
            assert not state[f"decoder.block.{i}.{k}"].any()
        assert torch.equal(state[f"decoder.block.{i}.layer.1.EncDecAttention.q.weight"],
                           state[f"decoder.block.{i - 1}.layer.1.EncDecAttention.q.weight"])
        assert (f"decoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight" in state) == (i == 0)
    a, b = _generate(model, grown)
    assert torch.equal(a, b) and a.shape[1] > 1
    back = reloaded(grown, tmp_path)
    assert (back.config.num_layers, back.config.num_decoder_layers) == depths
    with torch.no_grad():
        assert max_rel(ref, back(**seq_inputs(1)).logits) == 0.0


def test_pre_norm_seq2seq_both_stacks():
    model = seq2seq("M2M100ForConditionalGeneration")
    grown = graphgrow.deepen(model, after=r"model\.(en|de)coder\.layers\.0", block="copy", example_inputs=seq_inputs())
    assert (grown.config.encoder_layers, grown.config.decoder_layers) == (3, 3)
    with torch.no_grad():
        assert max_rel(model(**seq_inputs(1)).logits, grown(**seq_inputs(1)).logits) == 0.0
    assert not grown.state_dict()["model.decoder.layers.1.encoder_attn.out_proj.weight"].any()
    a, b = _generate(model, grown)
    assert torch.equal(a, b)


@pytest.mark.parametrize("cls", ["BartForConditionalGeneration", "MarianMTModel"])
@pytest.mark.parametrize("after", ["model.encoder.layers.0", "model.decoder.layers.1"])
def test_post_norm_seq2seq_is_refused_in_one_sentence(cls, after):
    with pytest.raises(UnsupportedModelError, match="post-norm") as e:
        graphgrow.deepen(seq2seq(cls), after=after, block="copy", example_inputs=seq_inputs())
    assert str(e.value).startswith(after) and "\n" not in str(e.value)


def test_whisper_both_stacks(tmp_path):
    """An audio encoder-decoder (pre-norm): input features by keyword, both stacks deepened at once."""
    model = build("WhisperForConditionalGeneration", "eager", **TOK, vocab_size=VOCAB, d_model=64, encoder_layers=2,
                  decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                  decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                  decoder_start_token_id=1, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_features": torch.randn(2, 16, 32, generator=g), "decoder_input_ids": ids()[:, :5]}
    grown = graphgrow.deepen(model, after=r"model\.(en|de)coder\.layers\.1", block="copy", example_inputs=inputs)
    assert type(grown) is type(model)
    assert (grown.config.encoder_layers, grown.config.decoder_layers) == (3, 3)
    with torch.no_grad():
        ref = model(**inputs).logits
        assert max_rel(ref, grown(**inputs).logits) == 0.0
        assert max_rel(ref, reloaded(grown, tmp_path)(**inputs).logits) == 0.0


def test_t5_checkpoint_directory_both_stacks(tmp_path):
    from graphgrow.hf.stream import deepen_checkpoint

    model = t5()
    model.save_pretrained(tmp_path / "in")
    out = deepen_checkpoint(tmp_path / "in", tmp_path / "out", after=r"(en|de)coder\.block\.(0|1)")
    assert out["check"]["max_rel"] == 0.0
    assert (out["config"].num_layers, out["config"].num_decoder_layers) == (5, 5)
    grown = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out", attn_implementation="eager")
    with torch.no_grad():
        assert max_rel(model(**seq_inputs(1)).logits, grown.eval()(**seq_inputs(1)).logits) == 0.0
