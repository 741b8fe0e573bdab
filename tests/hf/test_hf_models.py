"""graphgrow.widen / deepen on transformers models: same class, a config stating the new sizes, the same
logits (checked here again, independently of graphgrow's own check), save/load and greedy generate."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import graphgrow  # noqa: E402
from graphgrow.errors import InvalidArgumentError, UnsupportedModelError  # noqa: E402

VOCAB = 96


def llama(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def gpt2(**kw):
    cfg = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    cfg.update(kw)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()


def bert(head=False):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    if head:
        return transformers.BertForMaskedLM(cfg).eval()
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def ids(seed=0, length=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, VOCAB, (2, length), generator=g)
    x[0, 0] = VOCAB - 1  # graphgrow draws check inputs up to the example's maximum
    return x


def max_rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("make,factor,expect", [
    (llama, 2, dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)),
    (llama, 1.5, dict(hidden_size=96, intermediate_size=192)),
    (gpt2, 2, dict(hidden_size=128, num_attention_heads=8)),
    (gpt2, 1.5, dict(hidden_size=96, num_attention_heads=6)),
])
def test_widen_same_class_config_and_function(make, factor, expect, tmp_path):
    model = make()
    grown = graphgrow.widen(model, factor, example_inputs=(ids(),))
    assert type(grown) is type(model)
    for field, value in expect.items():
        assert getattr(grown.config, field) == value, field
    for seed in (1, 2):
        assert max_rel(logits(model, ids(seed)), logits(grown, ids(seed))) < 1e-5
    grown.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(logits(grown, ids(3)), logits(again, ids(3)))
    prompt = ids(4)[:1, :6]
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False),
                       grown.generate(prompt, max_new_tokens=6, do_sample=False))


def test_fill_rescales_the_config_epsilon():
    model = llama(rms_norm_eps=1e-5)
    grown = graphgrow.widen(model, 1.5, example_inputs=(ids(),))
    assert grown.config.hidden_size == 96
    assert grown.config.rms_norm_eps == pytest.approx(1e-5 * 64 / 96)


def test_tied_embeddings_stay_tied():
    model = gpt2()
    grown = graphgrow.widen(model, 2, example_inputs=(ids(),))
    assert grown.lm_head.weight is grown.transformer.wte.weight
    assert grown.config.tie_word_embeddings


@pytest.mark.parametrize("make", [llama, gpt2])
def test_block_copy_deepen(make, tmp_path):
    model = make()
    layers = "model.layers" if make is llama else "transformer.h"
    grown = graphgrow.deepen(model, after=f"{layers}.(0|1)", block="copy", example_inputs=(ids(),))
    assert type(grown) is type(model) and grown.config.num_hidden_layers == 4
    assert max_rel(logits(model, ids(1)), logits(grown, ids(1))) == 0.0
    # the copy of layer 0 is layer 1, with its output projections zero and the rest equal to layer 0
    state = grown.state_dict()
    out_proj = "self_attn.o_proj.weight" if make is llama else "attn.c_proj.weight"
    assert not state[f"{layers}.1.{out_proj}"].any()
    assert torch.equal(state[f"{layers}.1.{out_proj.replace('o_proj', 'q_proj').replace('c_proj', 'c_attn')}"],
                       state[f"{layers}.0.{out_proj.replace('o_proj', 'q_proj').replace('c_proj', 'c_attn')}"])
    prompt = ids(4)[:1, :6]
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False),
                       grown.generate(prompt, max_new_tokens=6, do_sample=False))  # KV cache: layer_idx renumbered
    grown.save_pretrained(tmp_path)
    assert type(model).from_pretrained(tmp_path).config.num_hidden_layers == 4


def test_block_copy_refuses_post_norm_blocks():
    with pytest.raises(UnsupportedModelError, match="post-norm"):
        graphgrow.deepen(bert(), after="encoder.layer.0", block="copy", example_inputs=(ids(),))


def test_block_copy_bad_after():
    with pytest.raises(InvalidArgumentError, match="matches no layer"):
        graphgrow.deepen(llama(), after="model.layers.9", block="copy", example_inputs=(ids(),))


def test_post_norm_widens_at_integer_factors():
    model = bert(head=True)
    grown = graphgrow.widen(model, 2, example_inputs=(ids(),))
    assert grown.config.hidden_size == 128 and grown.config.num_attention_heads == 8
    assert grown.config.intermediate_size == 256
    assert max_rel(logits(model, ids(1)), logits(grown, ids(1))) < 1e-5


def test_widths_the_config_cannot_state_are_kept():
    """BertModel returns its residual stream, so the stream keeps its width; BERT's attention width is
    hidden_size, so the heads keep theirs too (the nearest widening the config states); the MLP grows."""
    model = bert()
    grown = graphgrow.widen(model, 2, example_inputs=(ids(),))
    assert grown.config.hidden_size == 64 and grown.config.num_attention_heads == 4
    assert grown.config.intermediate_size == 256
    assert any("cannot state them grown" in n for n in grown.graphgrow_report.notes)
    assert max_rel(logits(model, ids(1)), logits(grown, ids(1))) < 1e-5


def test_bf16_model_keeps_its_dtype_and_is_checked_within_bf16_rounding():
    model = llama().to(torch.bfloat16)
    grown = graphgrow.widen(model, 1.5, example_inputs=(ids(),))
    assert grown.dtype == torch.bfloat16 and grown.config.hidden_size == 96
    assert any("bfloat16 rounding" in n for n in grown.graphgrow_report.notes)
    a, b = logits(model.float(), ids(1)), logits(grown.float(), ids(1))
    assert max_rel(a, b) < 3e-2


def test_llama_gqa_heads_grow_by_query_groups_at_any_factor():
    grown = graphgrow.widen(llama(), 1.5, example_inputs=(ids(),))
    assert (grown.config.num_attention_heads, grown.config.num_key_value_heads) == (6, 3)
    assert grown.config.head_dim == 16


def test_keyword_example_inputs_reach_an_encoder_decoder():
    """example_inputs as a dict: the model is called by keyword (T5 needs decoder_input_ids), captured, widened and
    verified with the same names; the grown model computes the same logits when called the same way."""
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                dropout_rate=0.0, decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    feed = {"input_ids": ids(0, 9), "decoder_input_ids": ids(1, 5)}
    wide = graphgrow.widen(model, 2, example_inputs=feed)
    assert wide.graphgrow_report.params_after > wide.graphgrow_report.params_before
    with torch.no_grad():
        assert max_rel(model(**feed).logits, wide(**feed).logits) < 1e-5
    with pytest.raises(InvalidArgumentError, match="dict"):
        graphgrow.widen(model, 2, example_inputs={1: feed["input_ids"]})
