"""F.glu (Speech2Text's conv subsampler: a conv's output halves gate each other) and torch.roll along positions
(Swin's shifted windows): both keep channels apart, so the channels around them widen exactly."""

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
