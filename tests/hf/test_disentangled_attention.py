"""DeBERTa-v2's disentangled attention: heads merged into the batch axis (``[B*H, L, hd]``), content-to-position
and position-to-content scores gathered along the relative-distance axis by ``torch.gather`` with indices computed
from positions and expanded over (batch x heads) (core/dispatch.gather_along), the relative position table read
whole as the positions of an activation (its columns a space of their own), the head view ``(heads, -1)``."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_testing import logits_rel as _rel, n_params as _params  # noqa: E402

VOCAB = 128


def _deberta(seed: int = 0, **extra):
    torch.manual_seed(seed)
    cfg = transformers.DebertaV2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64, relative_attention=True,
                                       pos_att_type=["p2c", "c2p"], max_relative_positions=16, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0, pad_token_id=0, **extra)
    return transformers.DebertaV2ForMaskedLM(cfg).eval()


@pytest.mark.parametrize("extra", [{}, {"share_att_key": True}, {"position_buckets": 8}])
def test_deberta_v2_x2_grows_heads_and_stream(extra):
    import graphgrow

    model = _deberta(**extra)
    x = torch.randint(1, VOCAB, (2, 12))
    grown = graphgrow.widen(model, 2, example_inputs=(x,))
    rep = grown.graphgrow_report
    cfg = grown.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (128, 8, 256)
    assert tuple(grown.deberta.encoder.rel_embeddings.weight.shape)[1] == 128
    assert [s.name for s in rep.spaces if s.frozen_reasons] == ["cls.predictions.decoder.weight"]  # (a): logits
    assert _params(grown) == _params(type(model)(cfg))  # 1.0 of ideal
    assert _rel(model, grown, torch.randint(1, VOCAB, (3, 10))) < 1e-5


def test_deberta_v2_x1_5_post_norm_stream_and_heads_named():
    """x1.5: the post-norm stream keeps its width (e); 6 heads of 16 cannot be stated over a 64-wide stream (b:
    head_dim = hidden_size / num_attention_heads, 64 % 6 != 0); the MLP grows; exact."""
    import graphgrow

    model = _deberta()
    x = torch.randint(1, VOCAB, (2, 12))
    grown = graphgrow.widen(model, 1.5, example_inputs=(x,))
    rep = grown.graphgrow_report
    assert (grown.config.hidden_size, grown.config.num_attention_heads, grown.config.intermediate_size) == \
        (64, 4, 192)
    reasons = {s.name: "; ".join(s.frozen_reasons) for s in rep.spaces if s.frozen_reasons}
    assert "post-norm" in reasons["deberta.encoder.layer.0.attention.output.dense.weight"] \
        or "whole integer factors" in reasons["deberta.encoder.layer.0.attention.output.dense.weight"]
    assert "cannot state it grown" in reasons["deberta.encoder.layer.0.attention.self.query_proj.weight"]
    assert not any("not understood" in r for r in reasons.values())
    assert _rel(model, grown, x) < 1e-5


@pytest.mark.parametrize("check", [True, False])
def test_deberta_v2_streamed_matches_in_memory(tmp_path, check):
    """Planned on the meta device the gather's indices have no values: the expand over (batch x heads) says they
    are the same for every head, so the streamed checkpoint is the in-memory widening."""
    from safetensors.torch import load_file

    import graphgrow
    from graphgrow.hf.stream import widen_checkpoint

    model = _deberta()
    model.save_pretrained(tmp_path / "src")
    result = widen_checkpoint(tmp_path / "src", tmp_path / "out", 2, check=check)
    if check:
        assert result["check"]["max_rel"] < 1e-5
    grown = type(model).from_pretrained(tmp_path / "out").eval()
    x = torch.randint(1, VOCAB, (2, 10))
    assert grown.config.num_attention_heads == 8 and _rel(model, grown, x) < 1e-5
    in_memory = graphgrow.widen(model, 2, example_inputs=(x,)).state_dict()
    for key, value in load_file(tmp_path / "out" / "model.safetensors").items():
        assert torch.equal(value, in_memory[key]), key
