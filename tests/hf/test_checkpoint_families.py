"""Checkpoint directories of families the streamed path once refused, grown exactly as in memory: ELECTRA
(embeddings_project that ElectraConfig drops at embedding_size == hidden_size), MarianMTModel (sinusoidal
positions left out of save_pretrained, recomputed at load), JetMoE (``.tolist()`` of the routing: the graph is
shaped on the stored weights). Each written tensor is bit for bit the in-memory widening's, on the inputs the
streamed path plans with (zeros)."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import graphgrow  # noqa: E402

VOCAB = 128
TOK = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _electra():
    return transformers.ElectraModel(transformers.ElectraConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=66, embedding_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=0))


def _marian():
    return transformers.MarianMTModel(transformers.MarianConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, decoder_start_token_id=0, **TOK))


def _jetmoe():
    return transformers.JetMoeForCausalLM(transformers.JetMoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2,
        kv_channels=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64, bos_token_id=1,
        eos_token_id=2))


# family -> (params after x2, spaces widened / all): the in-memory widening's figures
EXPECT = {_electra: (108_416, "2/16"), _marian: (249_856, "4/37"), _jetmoe: (969_856, "20/25")}


def _zeros(model):
    if model.config.is_encoder_decoder:
        return {"input_ids": torch.zeros((1, 8), dtype=torch.long),
                "decoder_input_ids": torch.zeros((1, 4), dtype=torch.long)}
    return (torch.zeros((1, 8), dtype=torch.long),)


def _main(model, x):
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out.to_tuple()[0]


@pytest.mark.parametrize("family", list(EXPECT), ids=lambda f: f.__name__.strip("_"))
def test_streamed_checkpoint_is_the_in_memory_widening(tmp_path, family):
    from safetensors.torch import load_file

    from graphgrow.hf.stream import widen_checkpoint

    torch.manual_seed(0)
    model = family().eval()
    model.save_pretrained(tmp_path / "src")
    result = widen_checkpoint(tmp_path / "src", tmp_path / "out", 2)
    assert result["check"]["max_rel"] < 1e-5
    params, spaces = EXPECT[family]
    # (the streamed figure counts the stored tensors: Marian's unsaved tables out, its final_logits_bias buffer in)
    stored = sum(t.numel() for t in load_file(tmp_path / "out" / "model.safetensors").values())
    assert result["report"].params_after == stored
    assert result["report"].summary().startswith(f"{spaces} channel spaces widened")

    big = graphgrow.widen(model, 2, example_inputs=_zeros(model))
    assert sum(p.numel() for p in big.parameters()) == params
    in_memory = big.state_dict()
    streamed = load_file(tmp_path / "out" / "model.safetensors")
    assert set(streamed) <= set(in_memory)
    for key, value in streamed.items():
        assert torch.equal(value, in_memory[key]), key
    grown = type(model).from_pretrained(tmp_path / "out").eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(3, VOCAB, (2, 10), generator=g)
    x = {"input_ids": x, "decoder_input_ids": x[:, :5]} if model.config.is_encoder_decoder else x
    a, b = _main(model, x), _main(grown, x)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5


def test_marian_sinusoidal_positions_keep_the_stream_and_survive_save_load(tmp_path):
    """MarianMTModel does not save its sinusoidal ``embed_positions.weight`` and from_pretrained recomputes it at
    the config's width: copied channels would not survive a save (1e-1 off before), so the stream keeps its width,
    class (d)."""
    torch.manual_seed(0)
    model = _marian().eval()
    big = graphgrow.widen(model, 2, example_inputs=_zeros(model))
    assert big.config.d_model == 64 and big.config.encoder_ffn_dim == 256
    stream = [s for s in big.graphgrow_report.spaces if s.name == "model.encoder.embed_positions.weight"]
    assert stream and "sinusoidal" in " ".join(stream[0].frozen_reasons)
    big.save_pretrained(tmp_path / "big")
    again = type(model).from_pretrained(tmp_path / "big").eval()
    x = {"input_ids": torch.randint(3, VOCAB, (2, 9)), "decoder_input_ids": torch.randint(3, VOCAB, (2, 5))}
    assert torch.equal(_main(big, x), _main(again, x))
    assert float((_main(model, x) - _main(again, x)).abs().max() / _main(model, x).abs().max()) < 1e-5


def test_phimoe_directory_is_refused_in_one_short_sentence(tmp_path, capsys):
    """PhiMoE's graph can be shaped neither on the meta device nor on the CPU (aten.histc of int32 routing counts
    has no CPU kernel): the CLI says which op and why in one line, exit 2, nothing written (the refusal used to
    dump the node's metadata)."""
    from graphgrow.cli import main

    torch.manual_seed(0)
    model = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64, **TOK))
    model.save_pretrained(tmp_path / "src")
    assert main(["widen", str(tmp_path / "src"), "--factor", "2", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err[-1]) < 300 and "histc" in err[-1], err[-1]
    assert not (tmp_path / "out").exists()
