"""graphgrow.widen on DBRX: its experts hold w1 / v1 / w2 as one parameter each, stored [E * ffn, d] and read
per expert as ``w.view(-1, ffn, d)[e]``; the grown model has the parameters of DBRX built at the grown widths
(ffn_config.ffn_hidden_size and attn_config.kv_n_heads are nested config fields), the same logits, and a
checkpoint directory streams to the same tensors."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_testing import logits, max_rel, shapes, token_ids  # noqa: E402

import graphgrow  # noqa: E402

VOCAB = 128


def ids(seed=0, length=10):
    return token_ids(VOCAB, seed, length)


def build(d_model=64, heads=4, kv=2, ffn=128):
    config = transformers.DbrxConfig(vocab_size=VOCAB, d_model=d_model, n_heads=heads, n_layers=2, max_seq_len=64,
                                     attn_config={"kv_n_heads": kv, "rope_theta": 10000.0, "clip_qkv": 8.0},
                                     ffn_config={"ffn_hidden_size": ffn, "moe_num_experts": 4, "moe_top_k": 2},
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.DbrxForCausalLM(config).float().eval()


def widened(model, factor):
    grown = graphgrow.widen(model, factor, example_inputs=(ids(),))
    for seed in (1, 2):
        assert max_rel(logits(model, ids(seed)), logits(grown, ids(seed))) < 1e-5
    assert grown.graphgrow_report.check.worst.max_rel < 1e-5
    return grown


def test_dbrx_x2_grows_stream_heads_and_every_expert_to_the_ideal():
    """x2: d_model 64 -> 128, heads 4 -> 8, kv heads 2 -> 4, each expert's ffn 128 -> 256: the shapes (so the
    parameter count: 238,400 -> 919,168, fraction of ideal 1.0) of DBRX built at those widths. Only the routers'
    expert counts (f) and the vocabulary (a) stay."""
    model = build()
    grown = widened(model, 2)
    ideal = build(128, 8, 4, 256)
    assert shapes(grown) == shapes(ideal)
    assert sum(p.numel() for p in model.parameters()) == 238_400
    assert sum(p.numel() for p in grown.parameters()) == sum(p.numel() for p in ideal.parameters()) == 919_168
    cfg = grown.config
    assert (cfg.d_model, cfg.n_heads, cfg.attn_config.kv_n_heads, cfg.ffn_config.ffn_hidden_size,
            cfg.ffn_config.moe_num_experts) == (128, 8, 4, 256, 4)
    for space in grown.graphgrow_report.spaces:
        if space.name != "lm_head.weight":
            assert all("expert count" in r for r in space.frozen_reasons), (space.name, space.frozen_reasons)
    # reloaded from its own config the grown model is the same function
    again = transformers.DbrxForCausalLM(transformers.DbrxConfig.from_dict(cfg.to_dict())).eval()
    again.load_state_dict(grown.state_dict())
    assert max_rel(logits(grown, ids(3)), logits(again, ids(3))) < 1e-6


def test_dbrx_expert_blocks_grow_in_place():
    """Each expert's block of rows in the stored [E * ffn, d] weights is that expert's grown block: with the
    stream's copies read off the embedding table (its columns are copied), w1's and v1's columns summed over each
    stream channel's copies give rows of the same expert's old block, every old row at least once; w2's blocks
    (read [ffn, d]) hold the old expert's stream columns copied."""
    model = build()
    grown = widened(model, 2)
    old_wte, new_wte = model.transformer.wte.weight.detach(), grown.transformer.wte.weight.detach()
    src = [int((new_wte[:, j:j + 1] - old_wte).abs().amax(0).argmin()) for j in range(128)]
    assert sorted(src) == sorted(list(range(64)) * 2)
    one_hot = torch.zeros(128, 64)
    one_hot[torch.arange(128), torch.tensor(src)] = 1.0
    for name in ("w1", "v1", "w2"):
        old = getattr(model.transformer.blocks[0].ffn.experts.mlp, name).detach().view(4, 128, 64)
        new = getattr(grown.transformer.blocks[0].ffn.experts.mlp, name).detach().view(4, 256, 128)
        for e in range(4):
            if name == "w2":  # columns copied: each new column is its stream channel's old column (over row copies)
                back = (new[e] @ one_hot) / 2  # (each column appears twice: the mean of both copies)
                assert torch.allclose(back.sum(0), old[e].sum(0), atol=1e-5), (name, e)  # (rows split over copies)
                continue
            back = new[e] @ one_hot  # (256, 64): each row an old row of expert e
            dist = (back[:, None, :] - old[e][None]).abs().amax(-1)
            assert float(dist.min(1).values.max()) < 1e-5, (name, e)
            assert set(dist.argmin(1).tolist()) == set(range(128)), (name, e)


def test_dbrx_x1_5_keeps_the_stream_for_its_fixed_layer_norm_epsilon():
    """x1.5: DBRX's LayerNorms fix eps at 1e-5 in code (no config field): fill + rescale cannot be stated, so the
    stream keeps its width (class (b)) and, d_model kept, the heads too (head_dim = d_model / n_heads); every
    expert's ffn grows 128 -> 192."""
    model = build()
    grown = widened(model, 1.5)
    assert shapes(grown) == shapes(build(ffn=192))
    reasons = {s.name: s.frozen_reasons for s in grown.graphgrow_report.spaces}
    stream = reasons["transformer.wte.weight"]
    assert any("DbrxConfig cannot state it grown (no norm epsilon field" in r for r in stream), stream
    assert "config ffn_config.ffn_hidden_size: 128 -> 192" in grown.graphgrow_report.notes


@pytest.mark.parametrize("factor", [2, 1.5])
def test_dbrx_checkpoint_streams_like_in_memory(tmp_path, factor):
    """widen_checkpoint on a saved DBRX directory: same config, the same tensors bit for bit."""
    from safetensors.torch import load_file

    from graphgrow.hf.stream import widen_checkpoint

    model = build()
    model.save_pretrained(tmp_path / "src")
    in_memory = graphgrow.widen(model, factor, example_inputs=(ids(),))
    result = widen_checkpoint(tmp_path / "src", tmp_path / "out", factor)
    assert result["check"]["max_rel"] < 1e-5
    a, b = result["config"].to_dict(), in_memory.config.to_dict()
    assert {k: v for k, v in a.items() if k != "_name_or_path"} == {k: v for k, v in b.items() if k != "_name_or_path"}
    streamed = load_file(tmp_path / "out" / "model.safetensors")
    state = in_memory.state_dict()
    assert set(streamed) == set(state)
    for key, value in streamed.items():
        assert torch.equal(value, state[key]), key
