"""ONNX exports of tiny random Hugging Face models (GPT-2, Llama with GQA, BERT, T5), by the TorchScript exporter
and by the dynamo exporter, widened x2: exact, heads and stream grown, and the widened model's weights shaped
like those of the family's export built at twice the width (its parameter count the ideal)."""

import collections
import io
import os
import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch", reason="exports its test models with torch")
transformers = pytest.importorskip("transformers", reason="exports Hugging Face models")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import graphgrow.onnx as gonnx  # noqa: E402

HEAD_DIM, VOCAB = 8, 128


def _config(family: str, w: int):
    """The family's tiny config at ``w`` times the base width (heads x w at a fixed head size)."""
    if family == "gpt2":
        return transformers.GPT2LMHeadModel, transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32 * w, n_layer=2, n_head=4 * w, n_inner=64 * w, n_positions=32,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return transformers.LlamaForCausalLM, transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32 * w, intermediate_size=64 * w, num_hidden_layers=2,
            num_attention_heads=4 * w, num_key_value_heads=2 * w, head_dim=HEAD_DIM, max_position_embeddings=32,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "bert":
        return transformers.BertForMaskedLM, transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32 * w, intermediate_size=64 * w, num_hidden_layers=2,
            num_attention_heads=4 * w, max_position_embeddings=32, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
    return transformers.T5ForConditionalGeneration, transformers.T5Config(
        vocab_size=VOCAB, d_model=32 * w, d_kv=HEAD_DIM, d_ff=64 * w, num_layers=2, num_heads=4 * w,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)


class Logits(torch.nn.Module):
    """The model returning its logits only (T5: from token ids and decoder token ids)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, decoder_ids=None):
        if decoder_ids is not None:
            return self.model(input_ids=ids, decoder_input_ids=decoder_ids).logits
        return self.model(input_ids=ids).logits


def export(family: str, dynamo: bool, w: int = 1) -> onnx.ModelProto:
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    cls, cfg = _config(family, w)
    # TorchScript cannot convert scaled_dot_product_attention with enable_gqa (Llama's GQA): eager attention there
    cfg._attn_implementation = "eager" if family == "llama" and not dynamo else "sdpa"
    torch.manual_seed(0)
    model = Logits(cls(cfg)).eval()
    with torch.no_grad():  # no two parameters equal (the dynamo exporter shares equal initializers)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(1)
    args = tuple(torch.randint(3, VOCAB, (2, 8), generator=g) for _ in range(2 if family == "t5" else 1))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(model, args, dynamo=True, opset_version=18, verbose=False).model_proto
        f = io.BytesIO()
        torch.onnx.export(model, args, f, dynamo=False, opset_version=17)
        return onnx.load_from_string(f.getvalue())


def weight_shapes(model) -> collections.Counter:
    """The shapes of the float initializers of rank 2 or more (weights, tables; folded masks in dynamo exports)."""
    return collections.Counter(tuple(t.dims) for t in model.graph.initializer
                               if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2)


def float_params(model) -> int:
    return int(sum(np.prod(t.dims) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT))


def stream_width(model) -> int:
    """The width of the token embedding table (the initializer a Gather reads with VOCAB rows)."""
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    return next(inits[n.input[0]][1] for n in model.graph.node if n.op_type == "Gather"
                and inits.get(n.input[0], [0])[0] == VOCAB)


CASES = [(f, d) for f in ("gpt2", "llama", "bert", "t5") for d in (False, True)]


@pytest.mark.parametrize("family, dynamo", CASES, ids=[f"{f}-{'dynamo' if d else 'torchscript'}" for f, d in CASES])
def test_hf_export_widens_heads_and_stream(family, dynamo, tmp_path):
    path = tmp_path / f"{family}.onnx"
    onnx.save(export(family, dynamo), str(path))
    ideal = export(family, dynamo, w=2)
    rep = gonnx.widen(str(path), 2)
    assert rep.check.passed and rep.check.worst.max_rel < 1e-5, rep.check.summary()
    # every space grows but the logits (the vocabulary reaches the model output)
    stayed = [(s.name, s.frozen_reasons) for s in rep.spaces if s.new_width != 2 * s.old_width]
    assert len(stayed) == 1 and stayed[0][1][0].startswith("reaches a model output"), stayed
    heads = [s for s in rep.spaces if s.head_dim == HEAD_DIM]
    assert heads and all(s.new_width // HEAD_DIM == 2 * (s.old_width // HEAD_DIM) for s in heads)
    assert stream_width(rep.model) == 2 * stream_width(onnx.load(str(path))) == 64
    # the weights are those of the family built twice as wide: head counts and stream from the shapes
    got, want = weight_shapes(rep.model), weight_shapes(ideal)
    if family == "t5" and dynamo:
        # dynamo folds T5's relative bias (+ mask) into per-batch initializers (2, heads, 8, 8) shared by the
        # layers; each layer copies its heads its own way, so a shared one becomes one per layer
        got.pop((2, 8, 8, 8), None), want.pop((2, 8, 8, 8), None)
    elif family == "t5":
        got.pop((1, 1, 8, 8), None)  # (the cross-attention's zero bias + mask, equal over heads, one head slice)
    assert got == want, (got - want, want - got)
    fraction = float_params(rep.model) / float_params(ideal)
    assert 0.97 <= fraction <= 1.02, fraction  # (above 1: T5 dynamo, see above)


class WithMask(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask).logits


def test_attention_mask_input_widens():
    """An attention mask input: the masks built from it (Cast, Equal, And, Expand, Where, IsNaN) carry no
    channels, and the heads still grow."""
    cls, cfg = _config("bert", 1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = WithMask(cls(cfg)).eval()
    ids, mask = torch.randint(3, VOCAB, (2, 8)), torch.ones(2, 8, dtype=torch.int64)
    mask[0, :3] = 0
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, mask), f, dynamo=False, opset_version=17)
    m = onnx.load_from_string(f.getvalue())
    assert {"IsNaN", "Where", "And"} <= {n.op_type for n in m.graph.node}
    rep = gonnx.widen(m, 2)
    assert rep.check.passed and rep.check.worst.max_rel < 1e-5
    heads = [s for s in rep.spaces if s.head_dim == HEAD_DIM]
    assert len(heads) == 6 and all(s.new_width == 2 * s.old_width == 64 for s in heads)
    assert stream_width(rep.model) == 64
