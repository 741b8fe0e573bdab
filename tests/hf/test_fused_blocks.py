"""CodeGen's fused qkv projection cut into ``mp_num = 4`` blocks ``[q | v | k]`` (graphgrow.hf.family_axes): the
family is asked which axes of the reshape grow with its heads, the four blocks then grow inside alike, so the heads
grow exactly without the verification-driven fallback, in memory and streamed from a checkpoint directory."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_testing import logits_rel as _rel, n_params as _params  # noqa: E402

VOCAB = 128


def _codegen(heads: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.CodeGenConfig(vocab_size=VOCAB, n_embd=16 * heads, n_layer=2, n_head=heads, rotary_dim=8,
                                     n_ctx=64, n_positions=64, n_inner=128, bos_token_id=0, eos_token_id=0)
    return transformers.CodeGenForCausalLM(cfg).eval()


@pytest.mark.parametrize("heads,factor,new_heads", [(4, 2, 8), (8, 1.5, 12), (4, 1.5, 6), (8, 1.25, 10), (12, 1.5, 18)])
def test_codegen_heads_grow_through_mp_blocks(heads, factor, new_heads):
    """Heads grow exactly at any count the family states: 4 heads (one per block) to 6 puts 1.5 heads in each of
    the 4 blocks (local_dim 24, heads of 16 across block boundaries), as CodeGen's own split and reshape read them;
    the x1.5 stream grows by fill + rescale (layer_norm_epsilon x d/d')."""
    import graphgrow

    model = _codegen(heads)
    x = torch.randint(0, VOCAB, (2, 12))
    grown = graphgrow.widen(model, factor, example_inputs=(x,))
    rep = grown.graphgrow_report
    assert (grown.config.n_head, grown.config.n_embd) == (new_heads, 16 * new_heads)
    assert grown.transformer.h[0].attn.qkv_proj.weight.shape == (3 * 16 * new_heads, 16 * new_heads)
    assert not any("lays its fused heads out differently" in n for n in rep.notes)  # (no fallback taken)
    assert [s.name for s in rep.spaces if s.frozen_reasons] == ["lm_head.weight"]  # (the logits: reason (a))
    assert _rel(model, grown, torch.randint(0, VOCAB, (3, 10))) < 1e-5
    ideal = _params(type(model)(grown.config))
    assert _params(grown) == ideal  # (fraction of ideal 1.0: every width of the family built at the new sizes)


@pytest.mark.parametrize("check,factor,params", [(True, 2, 296_576), (False, 2, 296_576), (False, 1.5, 173_312)])
def test_codegen_streamed_matches_in_memory(tmp_path, check, factor, params):
    """The streamed checkpoint plans without any verification; with the family's block layout read, it writes
    the in-memory result, checked or not (last round it wrote a model 0.77 off with check=False)."""
    from safetensors.torch import load_file

    import graphgrow
    from graphgrow.hf.stream import widen_checkpoint

    model = _codegen(4)
    model.save_pretrained(tmp_path / "src")
    result = widen_checkpoint(tmp_path / "src", tmp_path / "out", factor, check=check)
    assert (result["check"] is None) == (not check)
    if check:
        assert result["check"]["max_rel"] < 1e-5
    grown = type(model).from_pretrained(tmp_path / "out").eval()
    assert grown.config.n_head == round(4 * factor) and _params(grown) == params and _params(model) == 82_816
    x = torch.randint(0, VOCAB, (2, 10))
    assert _rel(model, grown, x) < 1e-5
    in_memory = graphgrow.widen(model, factor, example_inputs=(x,)).state_dict()
    for key, value in load_file(tmp_path / "out" / "model.safetensors").items():
        assert torch.equal(value, in_memory[key]), key
