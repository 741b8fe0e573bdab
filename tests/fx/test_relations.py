"""One tiny model per channel relation (GROWTH.md §2), widened at several factors.

Each test runs in float64, so any error above ~1e-12 is an algorithm error,
and asserts the widths the relation implies.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import space, widen_and_compare

FACTORS = [1.1, 1.41, 2.0, 3.0]
EXACT = 1e-10


def cbr(i, o, k=3, **kw):
    return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, **kw), nn.BatchNorm2d(o), nn.ReLU())


def randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


class Chain(nn.Module):  # produce / consume / carry (BN, ReLU, pooling) / flatten -> linear
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(8, 12)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(12 * 4 * 4, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x):
        x = self.pool(self.b(self.a(x)))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class LiteralView(nn.Module):  # move with a channel constant written in forward
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).view(-1, 6 * 8 * 8))


class Residual(nn.Module):  # unify: one mapping for every operand of the adds
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.b1 = nn.Sequential(cbr(8, 8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b2 = nn.Sequential(cbr(8, 8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b1(x))
        x = F.relu(self.b2(x) + x)
        return self.head(x.mean((2, 3)))


class SEGate(nn.Module):  # unify through broadcasting: x * sigmoid(fc(pool(x)))
    def __init__(self):
        super().__init__()
        self.conv = cbr(3, 12)
        self.fc1 = nn.Linear(12, 4)
        self.fc2 = nn.Linear(4, 12)
        self.out = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        x = self.conv(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return self.out(x * s[:, :, None, None]).mean((2, 3))


class Concat(nn.Module):  # concat: each segment widens inside itself; a conv consumes the mix
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 5, 1)
        self.b = cbr(3, 7)
        self.c = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(3, 4, 1))
        self.out = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        return self.out(torch.cat([self.a(x), self.b(x), self.c(x)], 1)).mean((2, 3))


class ConcatAdd(nn.Module):  # a concat added to a single producer: the producer splits into segments
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(3, 10, 1)
        self.out = nn.Conv2d(10, 3, 1)

    def forward(self, x):
        return self.out(F.relu(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))).mean((2, 3))


class SplitChunk(nn.Module):  # split / chunk / slicing with literal bounds
    def __init__(self):
        super().__init__()
        self.conv = cbr(3, 12)
        self.p = nn.Conv2d(6, 4, 1)
        self.q = nn.Conv2d(6, 4, 1)
        self.r = nn.Conv2d(5, 4, 1)
        self.s = nn.Conv2d(7, 4, 1)
        self.t = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        a, b = x.chunk(2, dim=1)
        c, d = torch.split(x, [5, 7], dim=1)
        e = x[:, 4:]
        return (self.p(a) + self.q(b) + self.r(c) + self.s(d) + self.t(e)).mean((2, 3))


class Shuffle(nn.Module):  # channel shuffle: view -> transpose -> view, then chunk
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8, 1)
        self.b = cbr(3, 8, 1)
        self.c = cbr(8, 8, 1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        y1, y2 = y.chunk(2, dim=1)
        return self.out(torch.cat([y1, self.c(y2)], 1)).mean((2, 3))


class Grouped(nn.Module):  # grouped conv: equal widths per group; depthwise conv: carry
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 12, 1)
        self.g = nn.Conv2d(12, 16, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        return self.out(F.relu(self.dw(F.relu(self.bn(self.g(self.a(x))))))).mean((2, 3))


class ChannelsLast(nn.Module):  # permute to NHWC, Linear over channels, PReLU per channel
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.PReLU(8)
        self.lin = nn.Linear(8, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        x = self.act(self.conv(x)).permute(0, 2, 3, 1)
        return self.out(F.gelu(self.lin(x))).mean((1, 2))


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("cls", [Chain, LiteralView, Residual, SEGate, Concat, ConcatAdd, SplitChunk, Shuffle,
                                 Grouped, ChannelsLast])
def test_relation_exact(cls, factor):
    model = randomize_bn(cls())
    wide, rep, err = widen_and_compare(model, (torch.randn(2, 3, 8, 8),), factor)
    assert err < EXACT, f"{cls.__name__} x{factor}: max_rel {err:.3g}"
    assert rep.params_after > rep.params_before
    for s in rep.spaces:
        if not s.frozen_reasons and s.new_width < round(s.old_width * factor):
            # only ties may round a width; a space never shrinks
            assert s.new_width >= s.old_width


def test_chain_widths_and_flatten_blocks():
    wide, rep, err = widen_and_compare(Chain(), (torch.randn(2, 3, 8, 8),), 1.5)
    assert (space(rep, "a.0").new_width, space(rep, "b.0").new_width, space(rep, "fc1").new_width) == (12, 18, 30)
    assert wide.fc1.weight.shape == (30, 18 * 16)  # flatten: the consumer widens in blocks of H*W
    assert wide.b[1].num_features == 18 and wide.b[1].running_mean.shape == (18,)
    assert space(rep, "fc2").new_width == 5 and "output" in space(rep, "fc2").frozen_reasons[0]


def test_residual_shares_one_mapping():
    wide, rep, err = widen_and_compare(randomize_bn(Residual()), (torch.randn(2, 3, 8, 8),), 1.5)
    widths = {space(rep, n).new_width for n in ("stem.0", "b1.1", "b2.1")}
    assert widths == {12}
    assert err < EXACT


def test_concat_add_splits_producer():
    wide, rep, err = widen_and_compare(ConcatAdd(), (torch.randn(2, 3, 8, 8),), 1.5)
    assert space(rep, "a").new_width == 6 and space(rep, "b").new_width == 9
    assert space(rep, "c").new_width == 15  # the sum of its segments, one mapping each
    assert err < EXACT


def test_literal_split_sizes_rewritten():
    wide, rep, err = widen_and_compare(randomize_bn(SplitChunk()), (torch.randn(2, 3, 8, 8),), 1.5)
    assert isinstance(wide, torch.fx.GraphModule)  # constants in forward were rewritten
    assert space(rep, "conv.0").new_width > 12
    assert err < EXACT


def test_literal_view_rewritten():
    wide, rep, err = widen_and_compare(LiteralView(), (torch.randn(2, 3, 8, 8),), 2.0)
    assert space(rep, "conv").new_width == 12 and wide.fc.in_features == 12 * 64
    assert err < EXACT


def test_shuffle_fully_widened():
    wide, rep, err = widen_and_compare(randomize_bn(Shuffle()), (torch.randn(2, 3, 8, 8),), 1.5)
    assert [s.new_width for s in rep.spaces if s.name in ("a.0", "b.0", "c.0")] == [12, 12, 12]
    assert err < EXACT


def test_grouped_and_depthwise():
    wide, rep, err = widen_and_compare(randomize_bn(Grouped()), (torch.randn(2, 3, 8, 8),), 1.5)
    assert wide.g.groups == 4 and wide.g.in_channels % 4 == 0 and wide.g.out_channels % 4 == 0
    assert wide.g.out_channels == 24 and wide.dw.groups == wide.dw.in_channels == 24
    assert err < EXACT


class MixNorm(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = norm
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.conv2(self.norm(self.conv(x))))).mean((2, 3))


@pytest.mark.parametrize("norm", [nn.LocalResponseNorm(3)])
def test_mixing_norm_freezes_its_space_only(norm):
    wide, rep, err = widen_and_compare(MixNorm(norm), (torch.randn(2, 3, 8, 8),), 1.5)
    conv = space(rep, "conv")
    assert conv.new_width == 8 and "mixes channels" in conv.frozen_reasons[0]
    assert type(norm).__name__ in conv.frozen_reasons[0]
    assert space(rep, "conv2").new_width == 12
    assert err < EXACT


@pytest.mark.parametrize("factor, width", [(1.5, 8), (2, 16), (3, 24)])
def test_group_norm_replicates_uniformly_at_integer_factors(factor, width):
    """GroupNorm keeps its statistics when every channel is copied k times (groups stay contiguous)."""
    model = MixNorm(nn.GroupNorm(2, 8))
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-1, 1)
    wide, rep, err = widen_and_compare(model, (torch.randn(2, 3, 8, 8),), factor)
    conv = space(rep, "conv")
    assert conv.new_width == width and wide.norm.num_channels == width and wide.norm.num_groups == 2
    if width == 8:
        assert "integer factors" in conv.frozen_reasons[0] and "GroupNorm" in conv.frozen_reasons[0]
    assert space(rep, "conv2").new_width == int(8 * factor)
    assert err < EXACT


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.cumsum(self.conv(x), dim=1)  # an op the analysis does not model
        return self.out(F.relu(self.conv2(y))).mean((2, 3))


def test_unknown_op_freezes_and_is_named():
    wide, rep, err = widen_and_compare(Unknown(), (torch.randn(2, 3, 8, 8),), 1.5)
    conv = space(rep, "conv")
    assert conv.new_width == 8 and "cumsum" in conv.frozen_reasons[0]
    assert space(rep, "conv2").new_width == 12
    assert err < EXACT


def test_layernorm_stream_in_mlp_widens_by_fill_and_rescale():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 8)
            self.ln = nn.LayerNorm(8)
            self.up = nn.Linear(8, 16)
            self.down = nn.Linear(16, 8)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h = self.inp(x)
            h = h + self.down(F.gelu(self.up(self.ln(h))))
            return self.out(h)

    wide, rep, err = widen_and_compare(MLP(), (torch.randn(4, 5, 6),), 1.5)
    assert space(rep, "up").new_width == 24
    assert space(rep, "inp").new_width == 12 and space(rep, "down").new_width == 12  # fill + rescale
    assert wide.ln.eps == pytest.approx(1e-5 * 8 / 12)
    assert err < EXACT
    wide, rep, err = widen_and_compare(MLP(), (torch.randn(4, 5, 6),), 1.5, fill=False)
    assert space(rep, "inp").new_width == 8 and "integer factors" in space(rep, "inp").frozen_reasons[0]
    assert space(rep, "up").new_width == 24 and err < EXACT


def test_noise_exact_keeps_function_and_breaks_symmetry():
    model = randomize_bn(Residual())
    x = (torch.randn(2, 3, 8, 8),)
    plain, _, _ = widen_and_compare(model, x, 2.0, seed=3)
    noisy, rep, err = widen_and_compare(model, x, 2.0, seed=3, noise=0.1, noise_mode="exact")
    assert err < EXACT
    w0, w1 = plain.b1[1].weight, noisy.b1[1].weight
    assert not torch.allclose(w0, w1)  # copies' outgoing weights differ ...
    # ... by perturbations that sum to zero over the copies of each unit: column sums per unit unchanged
    assert rep.function_preserving


def test_noise_paper_and_random_pad_are_labelled():
    model = Chain().double()
    x = (torch.randn(2, 3, 8, 8, dtype=torch.float64),)
    import graphgrow

    paper = graphgrow.widen(model, 2.0, example_inputs=x, noise=0.1, noise_mode="paper")
    assert not paper.graphgrow_report.function_preserving
    pad = graphgrow.widen(model, 2.0, example_inputs=x, init="random-pad")
    assert not pad.graphgrow_report.function_preserving
    assert pad.fc1.weight.shape == (40, 24 * 16)
    with torch.no_grad():
        assert (model(*x) - pad(*x)).abs().max() > 1e-3  # honestly not the same function


def test_reproducible_for_a_seed():
    model = randomize_bn(Residual())
    x = (torch.randn(2, 3, 8, 8),)
    a, _, _ = widen_and_compare(model, x, 1.41, seed=5)
    b, _, _ = widen_and_compare(model, x, 1.41, seed=5)
    c, _, _ = widen_and_compare(model, x, 1.41, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_state_dict_keys_and_class_preserved():
    model = randomize_bn(Residual())
    wide, rep, err = widen_and_compare(model, (torch.randn(2, 3, 8, 8),), 1.5)
    assert type(wide) is Residual
    assert list(wide.state_dict().keys()) == list(model.state_dict().keys())


def test_widths_only_exclude_divisor():
    model = Chain()
    x = (torch.randn(2, 3, 8, 8),)
    _, rep, err = widen_and_compare(model, x, 1.5, widths={"a.0": 20})
    assert space(rep, "a.0").new_width == 20 and space(rep, "b.0").new_width == 18
    _, rep, _ = widen_and_compare(model, x, 1.5, only=r"^b\.")
    assert space(rep, "a.0").new_width == 8 and space(rep, "b.0").new_width == 18
    assert "only" in space(rep, "a.0").frozen_reasons[0]
    _, rep, _ = widen_and_compare(model, x, 1.5, exclude=r"fc1")
    assert space(rep, "fc1").new_width == 20 and "exclude" in space(rep, "fc1").frozen_reasons[0]
    _, rep, _ = widen_and_compare(model, x, 1.3, divisor=8)
    assert space(rep, "a.0").new_width == 16 and space(rep, "b.0").new_width == 16


def test_pass_interface():
    from torch.fx import symbolic_trace

    from graphgrow.passes import WidenPass

    gm = symbolic_trace(Chain().eval())
    x = torch.randn(2, 3, 8, 8)
    p = WidenPass(1.5, example_inputs=(x,))
    res = p(gm)
    assert res.modified and isinstance(res.graph_module, torch.fx.GraphModule)
    with torch.no_grad():
        assert (res.graph_module(x) - gm(x)).abs().max() < 1e-5
    assert p.report.params_after > p.report.params_before


class BatchNormAct(nn.BatchNorm2d):
    """timm-style: the module calls F.batch_norm on its own attributes, then an activation."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return F.relu(x)


def test_functional_batch_norm_on_module_attributes():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = BatchNormAct(8)
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.out(self.bn(self.conv(x))).mean((2, 3))

    wide, rep, err = widen_and_compare(randomize_bn(Net()), (torch.randn(2, 3, 8, 8),), 1.5)
    assert err < EXACT
    assert space(rep, "conv").new_width == 12 and wide.bn.num_features == 12 and wide.bn.running_var.shape == (12,)
