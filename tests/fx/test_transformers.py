"""Transformer relations on torch.fx graphs (docs/maths.md §5): norms replicate uniformly, heads are units,
embeddings and tied heads grow with the residual stream. Every case is widened in float64 and compared."""

import pytest
import torch
import torch.nn as nn

import graphgrow
from graphgrow.models import ZOO, example_inputs

from helpers import space, widen_and_compare
from transformer_stacks import Stack, tokens

EXACT = 1e-10  # float64

CASES = {
    "layernorm": dict(),
    "rmsnorm": dict(norm="rms"),
    "rmsnorm_written": dict(norm="rms_written"),
    "layernorm_written": dict(norm="layer_written"),
    "post_norm": dict(post=True),
    "matmul_attention": dict(attention="matmul"),
    "multihead_attention": dict(attention="mha"),
    "gqa_rotary": dict(kv_heads=2, rotary=True),
    "gqa_one_kv_head": dict(attention="matmul", kv_heads=1),
    "qk_norm": dict(qk_norm=True),
    "swiglu_tied_rms": dict(mlp="swiglu", tie=True, norm="rms"),
    "tied_layernorm": dict(tie=True),
    "tied_post_norm": dict(post=True, tie=True),
    "gemma_scale_tied": dict(norm="rms_written", tie=True, embed_scale=True, mlp="swiglu"),
    "moe_dense": dict(mlp="moe"),
    "moe_top2": dict(mlp="moe", top_k=2, norm="rms"),
}


def _all_widened(rep, factor):
    for s in rep.spaces:
        if s.name == "head" or "router" in s.name:  # (the expert count stays: the router's softmax mixes it)
            assert s.new_width == s.old_width
        else:
            assert s.new_width == s.old_width * factor, (s.name, s.old_width, s.new_width, s.frozen_reasons)


@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_integer_factor_widens_every_space_exactly(case, factor):
    torch.manual_seed(0)
    model = Stack(**CASES[case])
    wide, rep, err = widen_and_compare(model, tokens(), factor)
    assert err < EXACT
    _all_widened(rep, factor)
    if CASES[case].get("tie"):
        assert wide.head.weight is wide.embed.weight
    if CASES[case].get("attention") != "mha":
        attn = wide.blocks[0].attn
        assert attn.q.out_features // 8 == 4 * factor  # heads copied, head_dim 8 kept
        assert attn.k.out_features // 8 == CASES[case].get("kv_heads", 4) * factor


def test_heads_grow_at_any_factor_with_head_dim_kept():
    torch.manual_seed(0)
    model = Stack(heads=12, head_dim=4, kv_heads=12, hidden=48)
    wide, rep, err = widen_and_compare(model, tokens(), 1.41)
    assert err < EXACT
    q = space(rep, "blocks.0.attn.q")
    assert q.new_width == 17 * 4  # 12 -> 17 heads of 4
    assert space(rep, "blocks.0.mlp.up").new_width == round(48 * 1.41)


def test_gqa_grows_key_value_heads_with_their_query_groups():
    torch.manual_seed(1)
    model = Stack(heads=8, kv_heads=2, head_dim=4, dim=32)
    wide, rep, err = widen_and_compare(model, tokens(), 1.5)
    assert err < EXACT
    q, k = space(rep, "blocks.0.attn.q").new_width // 4, space(rep, "blocks.0.attn.k").new_width // 4
    assert q == 12 and k == 3 and q // k == 4  # the group size stays 4


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_post_norm_stream_keeps_its_width_at_non_integer_factors(norm):
    torch.manual_seed(0)
    wide, rep, err = widen_and_compare(Stack(norm=norm, post=True), tokens(), 1.5)
    assert err < EXACT
    emb = space(rep, "embed")
    assert emb.new_width == emb.old_width
    assert "integer factors" in emb.frozen_reasons[0] and "post-norm" in emb.frozen_reasons[0]
    assert space(rep, "blocks.0.mlp.up").new_width == 60
    with pytest.raises(graphgrow.InvalidArgumentError, match="'embed' cannot grow from 32 to 48: .*post-norm"):
        graphgrow.widen(Stack(norm=norm, post=True), 1.5, example_inputs=tokens(), strict=True)


@pytest.mark.parametrize("factor", [1.41, 1.5])
@pytest.mark.parametrize("case", ["layernorm", "rmsnorm", "rmsnorm_written", "layernorm_written", "matmul_attention",
                                  "multihead_attention", "gqa_rotary", "qk_norm", "swiglu_tied_rms", "tied_layernorm",
                                  "gemma_scale_tied", "moe_top2"])
def test_fill_and_rescale_widens_pre_norm_streams_at_any_factor(case, factor):
    torch.manual_seed(0)
    model = Stack(**CASES[case])
    wide, rep, err = widen_and_compare(model, tokens(), factor)
    assert err < EXACT
    emb = space(rep, "embed")
    heads_width = space(rep, "blocks.0.attn.mha.in_proj").new_width // 3 if case == "multihead_attention" else None
    assert emb.new_width == (heads_width or round(32 * factor)), emb.frozen_reasons
    assert all(s.new_width > s.old_width for s in rep.spaces if s.name != "head" and "router" not in s.name), \
        [(s.name, s.frozen_reasons) for s in rep.spaces if s.new_width == s.old_width]
    if CASES[case].get("norm", "layer") in ("layer", "rms") and case not in ("matmul_attention", "gqa_rotary",
                                                                              "qk_norm", "multihead_attention"):
        norm = wide.blocks[0].n1
        assert norm.eps == pytest.approx(model.blocks[0].n1.eps * 32 / emb.new_width)


@pytest.mark.parametrize("factor, width, heads", [(2, 128, (8, 4)), (1.5, 96, (6, 3))])
def test_zoo_lm_tied_and_exact(factor, width, heads):
    model = ZOO["tiny_lm"].build().double().eval()
    x = example_inputs("tiny_lm")
    wide, rep, err = widen_and_compare(model, x, factor)
    assert err < 1e-10
    assert wide.lm_head.weight is wide.embed.weight and wide.lm_head.weight.shape == (256, width)
    assert all(s.new_width > s.old_width for s in rep.spaces if s.name != "lm_head")
    q = space(rep, "layers.0.attn.q_proj")
    k = space(rep, "layers.0.attn.k_proj")
    assert (q.new_width // 16, k.new_width // 16) == heads  # heads of 16, GQA groups of 2 kept
    model32 = ZOO["tiny_lm"].build().eval()
    wide32 = graphgrow.widen(model32, factor, example_inputs=x)
    with torch.no_grad():
        ref = model32(*x)
        assert ((wide32(*x) - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_zoo_vit_every_space_widened():
    model = ZOO["tiny_vit"].build()
    wide, rep, err = widen_and_compare(model, example_inputs("tiny_vit"), 2)
    assert err < EXACT
    for s in rep.spaces:
        assert s.new_width == (s.old_width if s.name == "head" else 2 * s.old_width), s.name


def randomize_vit(model):
    """torchvision zero-initializes the classifier and sets norms to the identity: nothing to compare then."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0, 0.2)
                m.bias.uniform_(-0.1, 0.1)
    return model


def test_torchvision_vit_heads_grow_with_a_filled_stream():
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(0)
    model = randomize_vit(tv.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_classes=10,
                                               num_heads=12, hidden_dim=48, mlp_dim=64))
    wide, rep, err = widen_and_compare(model, (torch.randn(2, 3, 32, 32),), 1.41)
    assert err < EXACT and err > 0
    attn = wide.encoder.layers.encoder_layer_0.self_attention
    assert attn.num_heads == 17 and attn.head_dim == 4 and attn.embed_dim == 68
    assert space(rep, "conv_proj").new_width == 68  # the stream follows the heads (fill + rescale)
    assert wide.encoder.layers.encoder_layer_0.ln_1.eps == pytest.approx(1e-6 * 48 / 68)


def test_torchvision_vit_matches_the_twice_wider_config():
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(0)
    cfg = dict(image_size=32, patch_size=8, num_layers=2, num_classes=10)
    model = randomize_vit(tv.VisionTransformer(num_heads=4, hidden_dim=32, mlp_dim=64, **cfg))
    wide, rep, err = widen_and_compare(model, (torch.randn(2, 3, 32, 32),), 2)
    assert err < EXACT
    ref = tv.VisionTransformer(num_heads=8, hidden_dim=64, mlp_dim=128, **cfg)
    assert sum(p.numel() for p in wide.parameters()) == sum(p.numel() for p in ref.parameters())
    attn = wide.encoder.layers.encoder_layer_0.self_attention
    assert attn.num_heads == 8 and attn.head_dim == 8 and attn.embed_dim == 64


def test_per_head_mask_is_kept_and_bad_operands_freeze():
    """A mean over heads of the attention scores would need every head: those channels freeze."""

    class HeadMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.o = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(7, 3)

        def forward(self, x):
            b, t, _ = x.shape
            q = self.q(x).view(b, t, 4, 4).transpose(1, 2)
            k = self.k(x).view(b, t, 4, 4).transpose(1, 2)
            s = (q @ k.transpose(-2, -1)).sum(1)  # sums over heads: mixes them
            return self.o(s)

    wide, rep, err = widen_and_compare(HeadMean(), (torch.randn(2, 7, 16),), 2)
    assert err < EXACT
    assert space(rep, "q").new_width == 16 and space(rep, "q").frozen_reasons


def test_widths_name_heads_and_bad_head_widths_are_one_sentence():
    torch.manual_seed(0)
    model = Stack(heads=8, kv_heads=2, head_dim=4, dim=32).double().eval()
    wide = graphgrow.widen(model, None, example_inputs=tokens(), widths={"blocks.0.attn.q": {"heads": 12}})
    attn = wide.blocks[0].attn
    assert (attn.q.out_features, attn.k.out_features) == (48, 12)  # 12 query heads, 3 key/value heads
    rep = wide.graphgrow_report
    assert space(rep, "blocks.0.attn.q").head_dim == 4 and "heads 8 -> 12 of 4" in rep.table()
    with pytest.raises(graphgrow.InvalidArgumentError, match=r"= 40 cannot be met .*query group of 4"):
        graphgrow.widen(model, None, example_inputs=tokens(), widths={"blocks.0.attn.q": {"heads": 10}})
    with pytest.raises(graphgrow.InvalidArgumentError, match=r"= 34 cannot be met .*copied whole"):
        graphgrow.widen(model, None, example_inputs=tokens(), widths={"blocks.0.attn.q": 34})
    with pytest.raises(graphgrow.InvalidArgumentError, match="not cut into attention heads"):
        graphgrow.widen(model, None, example_inputs=tokens(), widths={"blocks.0.mlp.up": {"heads": 3}})


def test_fill_falls_back_when_the_numbers_disagree():
    """A layer scale multiplies a branch that no linear map ends (a GELU last) before the residual add: the
    mean-filled channels of a LayerNorm stream are then not the mean of the scaled branch (a linear writer takes
    the λ-weighted mean instead: tests/fx/test_vision_ops.py). The numeric check sees it and the stream stays."""

    class LayerScaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.ln, self.fc, self.out = nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 3)
            self.ln2 = nn.LayerNorm(8)
            self.gamma = nn.Parameter(torch.rand(8) + 0.5)

        def forward(self, x):
            h = self.inp(x)
            h = h + self.gamma * torch.nn.functional.gelu(self.fc(self.ln(h)))
            return self.out(self.ln2(h))

    torch.manual_seed(0)
    wide, rep, err = widen_and_compare(LayerScaled(), (torch.randn(3, 4, 5),), 1.5)
    assert err < EXACT
    assert space(rep, "inp").new_width == 8 and space(rep, "fc").new_width == 8
    assert any("fill + rescale did not verify" in n for n in rep.notes)


def test_channels_last_pad_and_roll_keep_the_stream():
    """Swin's window padding and cyclic shift on a channels-last stream are per-channel moves."""

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.norm, self.fc, self.out = nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):  # x: (B, H, W, 3)
            h = self.inp(x)
            y = torch.nn.functional.pad(self.norm(h), (0, 0, 1, 1, 1, 1))
            y = torch.roll(y, shifts=(1, -1), dims=(1, 2))[:, 1:-1, 1:-1, :]
            return self.out(h + self.fc(y)).mean((1, 2))

    torch.manual_seed(0)
    for factor in (2, 1.5):
        wide, rep, err = widen_and_compare(Shifted(), (torch.randn(2, 5, 5, 3),), factor)
        assert err < EXACT
        assert space(rep, "inp").new_width == int(8 * factor) and space(rep, "fc").new_width == int(8 * factor)
