"""Ops of vision and audio encoders that keep channels apart, so the channels around them widen exactly: F.glu
(Speech2Text's conv subsampler: a conv's output halves gate each other), torch.roll along positions (Swin's
shifted windows), a GroupNorm with one channel per group (Wav2Vec2's feature extractor: any factor)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import space, widen_and_compare

EXACT = 1e-10  # float64


class GatedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(6, 16, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 12, 3, padding=1)
        self.head = nn.Conv1d(6, 3, 1)

    def forward(self, x):
        return self.head(F.glu(self.conv2(F.glu(self.conv1(x), dim=1)), dim=1))


def test_glu_halves_widen_alike():
    torch.manual_seed(0)
    model = GatedConvs()
    wide, rep, err = widen_and_compare(model, (torch.randn(2, 6, 10),), factor=2)
    assert err < EXACT
    assert (wide.conv1.weight.shape, wide.conv2.weight.shape, wide.head.weight.shape) == \
        ((32, 6, 3), (24, 16, 3), (3, 12, 1))
    # each new channel of the first half is gated by the copy of its own partner in the second half
    w_old, w_new = model.conv1.weight.double(), wide.conv1.weight
    src = [next(j for j in range(16) if torch.equal(w_new[i], w_old[j])) for i in range(32)]
    assert all(src[i + 16] == src[i] + 8 for i in range(16))
    assert space(rep, "conv1").new_width == 32


class RolledWindows(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: (batch, height, width, channels), channels last as in Swin
        h = self.proj(x)
        h = torch.roll(h, shifts=(-1, -1), dims=(1, 2))
        h = h + self.mlp(self.norm(h))
        h = torch.roll(h, shifts=(1, 1), dims=(1, 2))
        return self.head(h.mean((1, 2)))


def test_roll_along_positions_carries_channels():
    torch.manual_seed(0)
    model = RolledWindows()
    wide, rep, err = widen_and_compare(model, (torch.randn(2, 4, 4, 4),), factor=2)
    assert err < EXACT
    assert (wide.proj.weight.shape, wide.mlp.weight.shape, wide.head.weight.shape) == ((16, 4), (16, 16), (3, 16))


class InstanceGroupNorm(nn.Module):
    def __init__(self, functional=False):
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv1d(3, 8, 5, stride=2)
        self.norm = nn.GroupNorm(8, 8)
        self.conv2 = nn.Conv1d(8, 4, 3)

    def forward(self, x):
        h = self.conv1(x)
        h = F.group_norm(h, 8, self.norm.weight, self.norm.bias, 1e-5) if self.functional else self.norm(h)
        return self.conv2(F.gelu(h))


def test_group_norm_with_one_channel_per_group_widens_at_any_factor():
    for functional in (False, True):
        torch.manual_seed(0)
        model = InstanceGroupNorm(functional)
        with torch.no_grad():
            model.norm.weight.uniform_(0.5, 1.5)
            model.norm.bias.uniform_(-0.5, 0.5)
        wide, rep, err = widen_and_compare(model, (torch.randn(2, 3, 40),), factor=1.5)
        assert err < EXACT
        assert (wide.conv1.weight.shape, wide.norm.weight.shape, wide.conv2.weight.shape) == \
            ((12, 3, 5), (12,), (4, 12, 3))
        if not functional:
            assert (wide.norm.num_groups, wide.norm.num_channels) == (12, 12)


class LayerScaleBlocks(nn.Module):
    """Pre-LN blocks whose branches are multiplied by a learned layer scale λ before joining the stream (BEiT,
    DINOv2): at x1.5 the stream takes fill + rescale, and its filled channel must hold mean_c(λ_c x_c)."""

    def __init__(self, width=8, layers=2):
        super().__init__()
        self.embed = nn.Linear(3, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.scales = nn.ParameterList(nn.Parameter(torch.rand(width) + 0.5) for _ in range(layers))
        self.final = nn.LayerNorm(width)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        h = self.embed(x)
        for norm, fc, scale in zip(self.norms, self.fcs, self.scales):
            h = h + scale * F.dropout(fc(F.gelu(norm(h))), 0.0, training=False)
        return self.head(self.final(h))


def test_layer_scale_on_a_mean_filled_stream():
    torch.manual_seed(0)
    model = LayerScaleBlocks()
    with torch.no_grad():
        for norm in list(model.norms) + [model.final]:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    wide, rep, err = widen_and_compare(model, (torch.randn(2, 5, 3),), factor=1.5)
    assert err < EXACT
    assert wide.embed.weight.shape == (12, 3) and getattr(wide.fcs, "0").weight.shape == (12, 12)
    assert all(not s.frozen_reasons for s in rep.spaces if s.name != "head"), rep.summary()
    # the filled rows of the branch's writer are the λ-weighted mean of its rows; the scale's filled entries are 1
    fc, lam = model.fcs[0], model.scales[0].detach().double()
    new_fc, new_lam = getattr(wide.fcs, "0"), getattr(wide.scales, "0")
    filled = [i for i in range(12) if not any(torch.equal(new_lam[i], lam[j]) for j in range(8))]
    assert len(filled) == 4 and all(float(new_lam[i].detach()) == 1.0 for i in filled)
