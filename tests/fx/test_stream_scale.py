"""Fill + rescale under norms without gain (docs/maths.md §5, fx/stream_scale.py): the stream is scaled by
c = sqrt(d'/d) in its writers and unscaled in its readers, eps unchanged."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import space, widen_and_compare

EXACT = 1e-10  # float64


class Gainless(nn.Module):
    """OLMo's shape: pre-norm blocks whose LayerNorms have no parameters, eps fixed in the code."""

    def __init__(self, offset=False, d=8):
        super().__init__()
        self.emb = nn.Embedding(20, d)
        self.fc1, self.fc2 = nn.Linear(d, 16), nn.Linear(16, d)
        self.head = nn.Linear(d, 5)
        self.shift = nn.Parameter(torch.randn(d)) if offset else None
        self.d = d

    def forward(self, ids):
        h = self.emb(ids)
        if self.shift is not None:
            h = h + self.shift  # an unscaled parameter added to the stream: the stream cannot be scaled
        h = h + self.fc2(F.gelu(self.fc1(F.layer_norm(h, (self.d,), eps=1e-5))))
        return self.head(F.layer_norm(h, (self.d,), eps=1e-5))


def test_gainless_norm_stream_grows_at_one_and_a_half():
    torch.manual_seed(0)
    model = Gainless()
    ids = torch.randint(0, 20, (2, 6))
    wide, rep, err = widen_and_compare(model, (ids,), 1.5)
    assert err < EXACT
    assert space(rep, "emb").new_width == 12 and space(rep, "fc1").new_width == 24
    c = math.sqrt(12 / 8)
    # the stream's writers carry c, the old channels of the table are c x the old ones
    assert torch.allclose(wide.emb.weight[:, :8], model.emb.weight.double() * c)
    assert sum(p.numel() for p in wide.parameters()) == 20 * 12 + (12 * 24 + 24) + (24 * 12 + 12) + (12 * 5 + 5)


def test_gainless_norm_stream_with_an_unscaled_addend_keeps_whole_factors():
    torch.manual_seed(0)
    model = Gainless(offset=True)
    ids = torch.randint(0, 20, (2, 6))
    wide, rep, err = widen_and_compare(model, (ids,), 1.5)
    assert err < EXACT
    assert space(rep, "emb").new_width == 8 and space(rep, "fc1").new_width == 24
    wide2, rep2, err2 = widen_and_compare(model, (ids,), 2)
    assert err2 < EXACT and space(rep2, "emb").new_width == 16


def test_gainless_layer_norm_modules_scale_the_stream_too():
    class Modules(nn.Module):
        def __init__(self, d=8):
            super().__init__()
            self.inp, self.fc, self.out = nn.Linear(5, d), nn.Linear(d, d), nn.Linear(d, 3)
            self.ln = nn.LayerNorm(d, elementwise_affine=False)
            self.ln2 = nn.LayerNorm(d, elementwise_affine=False)

        def forward(self, x):
            h = self.inp(x)
            h = h + self.fc(self.ln(h))
            return self.out(self.ln2(h))

    torch.manual_seed(0)
    model = Modules()
    wide, rep, err = widen_and_compare(model, (torch.randn(3, 4, 5),), 1.5)
    assert err < EXACT and space(rep, "inp").new_width == 12 and space(rep, "fc").new_width == 12
    c = math.sqrt(12 / 8)
    # a map reading and writing the scaled stream keeps its weight; its bias takes c
    assert torch.allclose(wide.fc.bias[:8], model.fc.bias.double() * c)
    assert wide.ln.eps == model.ln.eps
