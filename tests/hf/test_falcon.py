"""Issue 18, Falcon on every attention layout transformers writes (5.24 and 5.25 differ; the tests run on the
installed version): new_decoder_architecture's kv groups ``(groups, queries + 2, head_dim)`` copied whole
(5.25 reaches them through two views, ``view(..., -1, hd)`` then ``view(..., kv, -1, hd)``, and picks the
key/value slots by select), multi_query's single key/value head (5.24 picks it by a constant index tensor
``[-2]``, 5.25 by a split) and the per-head ``[q | k | v]`` of the original layout (5.25: ``unflatten``).
Every widening is exact, reaches the parameters of the family built at the grown sizes, and states them."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import graphgrow  # noqa: E402

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=128,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LAYOUTS = {
    "groups": dict(new_decoder_architecture=True, num_kv_heads=2),
    "groups-one-norm": dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
    "multi-query": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True),
    "per-head": dict(new_decoder_architecture=False, multi_query=False, parallel_attn=True),
}


def build(**cfg):
    config = transformers.FalconConfig(**{**BASE, **cfg})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.FalconForCausalLM(config).eval()


def ids(seed=0, length=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, VOCAB, (2, length), generator=g)
    x[0, 0] = VOCAB - 1
    return x


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def max_rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


def grown_sizes(layout: str, factor: float) -> dict:
    """The sizes the grown config must state: heads and stream by the factor; the key/value heads with their
    query groups (multi_query keeps its one head: the family cannot state a second)."""
    heads = round(4 * factor)
    out = dict(hidden_size=round(64 * factor), num_attention_heads=heads, ffn_hidden_size=round(128 * factor))
    if layout.startswith("groups"):
        out["num_kv_heads"] = round(2 * factor)
    elif layout == "per-head":
        out["num_kv_heads"] = heads
    return out


@pytest.mark.parametrize("factor", [2, 1.5])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_falcon_reaches_the_ideal_width(layout, factor):
    cfg = LAYOUTS[layout]
    model = build(**cfg)
    grown = graphgrow.widen(model, factor, example_inputs=(ids(),))
    with torch.no_grad():
        for seed in (1, 2):  # inputs graphgrow did not draw
            assert max_rel(model(ids(seed)).logits, grown(ids(seed)).logits) < 1e-5
    expect = grown_sizes(layout, factor)
    for field, value in expect.items():
        assert getattr(grown.config, field) == value, field
    ideal = build(**{**cfg, **expect})
    assert n_params(grown) == n_params(ideal)  # (fraction of ideal: exactly 1)
    assert grown.graphgrow_report.params_after == n_params(ideal)
    frozen = {s.name: s for s in grown.graphgrow_report.spaces if s.new_width < round(s.old_width * factor)}
    qkv = "transformer.h.0.self_attention.query_key_value.weight"
    if layout == "multi-query":  # queries doubled, the one key/value head kept: (2 * 4 + 2) heads of 16
        assert frozen[qkv].new_width == (expect["num_attention_heads"] + 2) * 16
        assert "multi_query=True" in " ".join(frozen[qkv].frozen_reasons)
        frozen = {k: v for k, v in frozen.items() if "query_key_value" not in k}
    assert list(frozen) == ["lm_head.weight"]  # (the vocabulary: reaches a model output)


def test_grouped_heads_copy_whole_groups():
    # every 64 rows of the grown projection are one old kv group (2 queries, key, value) whole, so
    # view(..., kv, -1, hd) keeps reading (queries, key, value) in every group (which groups take the extra
    # copies is Net2Net's random draw)
    model = build(**LAYOUTS["groups"])
    grown = graphgrow.widen(model, 2, example_inputs=(ids(),))
    old = model.transformer.h[0].self_attention.query_key_value.weight.detach()
    new = grown.transformer.h[0].self_attention.query_key_value.weight.detach()
    assert tuple(new.shape) == (256, 128)
    folded = new.reshape(256, 64, 2).sum(-1)  # (the stream's columns: each followed by its copy, divided by 2)
    found = []
    for block in folded.reshape(4, 64, 64):
        hits = [g for g in range(2) if torch.allclose(block, old[64 * g: 64 * (g + 1)], atol=1e-6)]
        assert len(hits) == 1
        found += hits
    assert set(found) == {0, 1}


@pytest.mark.parametrize("layout", ["groups", "multi-query", "per-head"])
def test_falcon_block_copy_is_exact(layout):
    model = build(**LAYOUTS[layout])
    grown = graphgrow.deepen(model, after="transformer.h.0", block="copy", example_inputs=(ids(),))
    assert grown.config.num_hidden_layers == 3
    with torch.no_grad():
        assert max_rel(model(ids(1)).logits, grown(ids(1)).logits) == 0.0
    copy_ = grown.transformer.h[1]
    assert not copy_.self_attention.dense.weight.any() and not copy_.mlp.dense_4h_to_h.weight.any()
