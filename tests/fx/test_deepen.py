"""Net2DeeperNet on torch.fx graphs: identity blocks of every kind, the paper's configuration, calibration,
composition with widen, and the refusals."""

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import graphgrow
from graphgrow import models
from graphgrow.core.deepen import activation_stats, identity_bn, identity_conv_weight, parse_kernel
from graphgrow.fx.deepen import nonneg_signs
from graphgrow.fx.trace import trace_module
from graphgrow.passes import DeepenPass
from helpers import max_rel


def _deepen_checked(model, x, **kw):
    """Deepen; assert the original is untouched and the result matches it in float64-free eval mode."""
    model.eval()
    before = copy.deepcopy(model.state_dict())
    deep = graphgrow.deepen(model, example_inputs=x, **kw)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the original model was modified"
    deep.eval()
    with torch.no_grad():
        err = max_rel(model(*x), deep(*x))
    assert err <= 1e-5
    rep = deep.graphgrow_report
    assert rep.check.passed and rep.check.worst.max_rel <= 1e-4
    return deep, rep


def test_identity_weights():
    w = identity_conv_weight(3, (1, 3))
    assert w.shape == (3, 3, 1, 3) and w.sum() == 3 and w[1, 1, 0, 1] == 1 and w[0, 1].sum() == 0
    bn = identity_bn([0.5, -1.0], [4.0, 0.25], eps=1e-5)
    x = torch.tensor([2.0, 3.0])
    y = (x - torch.tensor(bn["running_mean"])) / torch.sqrt(torch.tensor(bn["running_var"]) + 1e-5) \
        * torch.tensor(bn["weight"]) + torch.tensor(bn["bias"])
    assert torch.allclose(y.float(), x, atol=1e-7)
    assert parse_kernel("1x3+3x1") == ((1, 3), (3, 1)) and parse_kernel(5) == ((5,),)
    mean, var = activation_stats([torch.arange(8.).reshape(2, 2, 2).numpy(), torch.ones(1, 2, 2).numpy()])
    ref = torch.cat([torch.arange(8.).reshape(2, 2, 2), torch.ones(1, 2, 2)]).transpose(0, 1).reshape(2, -1)
    assert torch.allclose(torch.tensor(mean).float(), ref.mean(1)) and \
        torch.allclose(torch.tensor(var).float(), ref.var(1, unbiased=False))


class _Signs(nn.Module):
    def forward(self, x):
        r = torch.relu(x)
        return (torch.max(x, r), r + torch.sigmoid(x), x - r, r * -1.0, torch.cat([r, r.softmax(1)], 1),
                x.clamp(min=0.0), nn.functional.hardtanh(x), r.view(r.shape[0], -1).mean(1), r * 2,
                torch.max(x, 1)[0], x.max(dim=1).values, torch.max(r, 1)[0],
                nn.functional.interpolate(r, scale_factor=2, mode="bilinear"),
                nn.functional.interpolate(r, scale_factor=2, mode="bicubic"))


def test_nonneg_analysis():
    gm, _ = trace_module(_Signs())
    signs = nonneg_signs(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    got = [signs[n].nonneg for n in out]
    assert got == [True, True, False, False, True, True, False, True, True, False, False, True, True, False]


def test_paper_deeper_inception_fx():
    """Every module of the zoo's factorized Inception-BN gets two extra identity vertical-horizontal pairs."""
    model = models.inception_bn(factorized=True)
    x = models.example_inputs("inception_bn", batch=2)
    deep, rep = _deepen_checked(model, x, after=models.PAPER_DEEPER_AFTER, kernel=models.PAPER_DEEPER_KERNEL)
    assert len(rep.insertions) == 9
    assert all(i.kernels == [[3, 1], [1, 3], [3, 1], [1, 3]] and i.activation for i in rep.insertions)
    added = sum(4 * (i.channels * i.channels * 3 + 2 * i.channels) for i in rep.insertions)
    assert rep.params_after - rep.params_before == added
    convs = [m for m in deep.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len([m for m in model.modules() if isinstance(m, nn.Conv2d)]) + 36
    # the original state_dict keys are all kept
    assert set(model.state_dict()) <= set(deep.state_dict())


TV_CASES = {
    # model: (input size, [(block, after, kernel)])
    "resnet18": (64, [("conv-bn-relu", "layer1", 3), ("conv-bn", "layer2.0.bn1", 3), ("residual", "layer3", 3),
                      ("linear", "flatten", 3), ("residual", "flatten", 3)]),
    "googlenet": (64, [("conv-bn-relu", "inception3a", "1x3+3x1"), ("conv-bn", "inception4a", 5),
                       ("residual", "maxpool3", 3), ("linear", "flatten", 3)]),
    "inception_v3": (80, [("conv-bn-relu", "Mixed_6b", "1x7+7x1"), ("conv-bn", "Mixed_5b", 3),
                          ("residual", "Mixed_5c", "1x3+3x1"), ("linear", "flatten", 3)]),
    "vgg11_bn": (32, [("conv-bn-relu", "features.2", 3), ("conv-bn", "features.9", 3),
                      ("residual", "features.10", 3), ("linear", "classifier.1", 3)]),
    "mobilenet_v2": (64, [("conv-bn-relu", "features.1.conv.0", 3), ("conv-bn", "features.3", 3),
                          ("residual", "features.5", 3), ("linear", "flatten", 3)]),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg11_bn" else n for n in TV_CASES])
def test_torchvision_block_kinds(name):
    size, cases = TV_CASES[name]
    kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, num_classes=10, **kw).eval()
    x = (torch.randn(2, 3, size, size),)
    for block, after, kernel in cases:
        deep, rep = _deepen_checked(model, x, after=after, block=block, kernel=kernel)
        assert [i.block for i in rep.insertions] == [block]
        assert rep.params_after > rep.params_before
        if block == "linear":
            assert rep.insertions[0].activation  # after a ReLU / pooling: the ReLU is exact


def test_conv_bn_relu_refused_after_possibly_negative():
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(graphgrow.InvalidArgumentError, match="after 'features.3'.*may be negative.*BatchNorm2d.*'conv-bn' or 'residual'"):
        graphgrow.deepen(model, after="features.3", example_inputs=torch.randn(1, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_linear_without_relu_on_signed_features():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).eval()
    deep, rep = _deepen_checked(model, (torch.randn(3, 6),), after="1", block="linear")
    assert not rep.insertions[0].activation and "Tanh" in rep.insertions[0].nonneg_reason
    assert deep.get_submodule("1_deep").fc.weight.shape == (8, 8)


class _Scalar(nn.Module):
    def forward(self, x):
        return x.flatten(1).sum(1)


@pytest.mark.parametrize("kw, match", [
    ({"after": "nothing_here"}, "matches no node or module"),
    ({"after": "layer1", "kernel": 4}, "not a positive odd number"),
    ({"after": "layer1", "kernel": "1x2+3x1"}, "not a positive odd number"),
    ({"after": "fc"}, "rank-2 tensor"),
    ({"after": "layer1", "block": "bottleneck"}, "block must be one of"),
    ({"after": "layer1", "block": "linear"}, "rank-4 tensor"),
    ({"after": "[unclosed"}, "not a valid regular expression"),
    ({"after": "layer1", "calibrate": 3}, "calibrate must be an iterable"),
])
def test_bad_arguments(kw, match):
    model = torchvision.models.resnet18(num_classes=10).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(graphgrow.GraphGrowError, match=match):
        graphgrow.deepen(model, example_inputs=torch.randn(1, 3, 32, 32), **kw)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_channel_axis():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Scalar())
    with pytest.raises(graphgrow.InvalidArgumentError, match="no channel axis"):
        graphgrow.deepen(model, after="1", block="conv-bn", example_inputs=torch.randn(2, 3, 8, 8))


def test_calibration_brings_training_mode_close():
    model = models.inception_bn(factorized=True)
    x = models.example_inputs("inception_bn", batch=2)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 32, 32, generator=gen), torch.zeros(16)) for _ in range(4)]  # (input, label)
    deep, rep = _deepen_checked(model, x, after=models.PAPER_DEEPER_AFTER, kernel="3x1+1x3", calibrate=batches)
    assert rep.calibration_batches == 4
    assert rep.train_deviation > 0.1
    assert rep.train_deviation_calibrated < rep.train_deviation / 3
    assert "calibrated on 4 batches" in rep.summary()
    bn = deep.get_submodule("blocks.0.branch_dbl3x3.2_deep.0.bn")
    assert torch.allclose(bn.weight ** 2, bn.running_var + bn.eps, rtol=1e-5)
    assert torch.allclose(bn.bias, bn.running_mean)


def test_residual_calibration_keeps_zero_gamma():
    model = models.resnet_small().eval()
    x = models.example_inputs("resnet_small", batch=2)
    deep, rep = _deepen_checked(model, x, after="layer2", block="residual",
                                calibrate=[torch.randn(8, 3, 32, 32) for _ in range(2)])
    last = deep.get_submodule("layer2_deep.body.1.bn")
    assert float(last.weight.detach().abs().max()) == 0 and float(last.running_var.min()) > 0


@pytest.mark.parametrize("order", ["widen-deepen", "deepen-widen"])
def test_compose_with_widen(order):
    model = models.resnet_small().eval()
    x = models.example_inputs("resnet_small", batch=2)
    if order == "widen-deepen":
        grown = graphgrow.deepen(graphgrow.widen(model, 1.5, example_inputs=x), after="layer1", block="residual",
                                 example_inputs=x)
    else:
        grown = graphgrow.widen(graphgrow.deepen(model, after="layer1", example_inputs=x), 1.5, example_inputs=x)
        rep = grown.graphgrow_report
        assert any("layer1_deep" in s.name for s in rep.widened)
    with torch.no_grad():
        assert max_rel(model(*x), grown.eval()(*x)) <= 1e-5
    assert sum(p.numel() for p in grown.parameters()) > 2 * sum(p.numel() for p in model.parameters())


def test_deepen_pass_and_onnxruntime_verify():
    model = models.resnet_small().eval()
    x = models.example_inputs("resnet_small", batch=2)
    gm = torch.fx.symbolic_trace(model)
    # on a GraphModule leaf module paths name every call: the last ReLU of every stage
    p = DeepenPass(after=r"layer\d\.1\.relu2", block="conv-bn-relu", kernel="1x3+3x1", example_inputs=x, verify="onnxruntime")
    res = p(gm)
    assert res.modified and isinstance(res.graph_module, torch.fx.GraphModule)
    assert len(p.report.insertions) == 3
    assert p.report.check.backend == "onnxruntime" and p.report.check.worst.max_rel <= 1e-4


@pytest.mark.parametrize("name", [n for n, e in models.ZOO.items() if e.kind == "cnn"])
def test_zoo_models(name):
    """Every zoo model: conv-bn-relu after its first two ReLU outputs, a residual block on the input of its
    classifier's last Linear, and conv-bn on the model input itself."""
    model = models.ZOO[name].build().eval()
    x = models.example_inputs(name, batch=2)
    gm, _ = trace_module(model)
    mods = dict(gm.named_modules())
    relus = [n.target if n.op == "call_module" else n.name for n in gm.graph.nodes
             if (n.op == "call_module" and isinstance(mods[n.target], (nn.ReLU, nn.ReLU6)))
             or (n.op == "call_function" and n.target in (torch.relu, nn.functional.relu))]
    relus = list(dict.fromkeys(relus))[:2]
    deep, rep = _deepen_checked(model, x, after=relus, kernel="1x3+3x1")
    assert len(rep.insertions) >= 2 and all(i.activation for i in rep.insertions)
    fc = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], nn.Linear)][-1]
    src = fc.args[0]
    deep, rep = _deepen_checked(model, x, after=src.name, block="residual")
    assert rep.insertions[0].form == "linear"
    deep, rep = _deepen_checked(model, x, after=next(iter(gm.graph.nodes)).name, block="conv-bn")
    assert "model input" in rep.insertions[0].nonneg_reason


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, y):
        return torch.relu(self.a(x)) + self.b(y)


def test_after_inputs_and_twice():
    """Blocks on model inputs (several placeholders), then a second deepening of the result at the same point."""
    model = _TwoInputs().eval()
    x = (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))
    deep, rep = _deepen_checked(model, x, after=["x", "y"], block="conv-bn", kernel=5)
    assert [i.name for i in rep.insertions] == ["deep_x", "deep_y"]
    again, rep2 = _deepen_checked(deep, x, after="relu", kernel=3)
    assert rep2.insertions[0].activation
    with torch.no_grad():
        assert max_rel(model(*x), again(*x)) <= 1e-5


def test_verification_catches_a_wrong_block(monkeypatch):
    """A block that is not the identity (its tap off-centre) is caught by the check and nothing is returned."""
    import graphgrow.core.deepen as core

    def shifted(channels, kernel, dtype=None):
        w = identity_conv_weight(channels, kernel)
        return __import__("numpy").roll(w, 1, axis=-1)

    monkeypatch.setattr(core, "identity_conv_weight", shifted)
    model = models.resnet_small().eval()
    with pytest.raises(graphgrow.VerificationError, match="deepened model is not equivalent"):
        graphgrow.deepen(model, after="layer1", example_inputs=models.example_inputs("resnet_small", batch=2))
