"""Tests for the reference model zoo (models/)."""
from __future__ import annotations

import io
import os
import statistics
import sys
import warnings

import pytest
import torch
import torch.fx
import torch.nn as nn

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from graphgrow import models  # noqa: E402
from graphgrow.models import ZOO, example_inputs  # noqa: E402

EXPECTED_KEYS = {
    "inception_bn", "inception_bn_narrow", "resnet_small", "densenet_small",
    "mobilenetv2_small", "senet_small", "lenet", "shufflenet_small", "resnext_small", "tiny_lm", "tiny_vit",
}
NUM_CLASSES = 10
BATCH = 2


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = ZOO[name].build()
    assert isinstance(model, nn.Module)
    return model.eval()


def test_zoo_keys_and_entries():
    assert set(ZOO) == EXPECTED_KEYS
    for name, entry in ZOO.items():
        assert entry.name == name
        assert entry.input_shape[0] == 1
        assert isinstance(entry.description, str) and entry.description
        (x,) = example_inputs(name, batch=3, seed=1)
        assert tuple(x.shape) == (3,) + tuple(entry.input_shape[1:])
    # Determinism of example inputs.
    a = example_inputs("resnet_small", seed=5)[0]
    b = example_inputs("resnet_small", seed=5)[0]
    assert torch.equal(a, b)


def test_transformer_entries():
    lm, vit = ZOO["tiny_lm"], ZOO["tiny_vit"]
    assert lm.kind == vit.kind == "transformer" and lm.vocab == 256
    (tok,) = example_inputs("tiny_lm", batch=2)
    assert tok.dtype == torch.int64 and int(tok.max()) < 256
    model = _build("tiny_lm")
    assert model.lm_head.weight is model.embed.weight
    attn = model.layers[0].attn
    assert (attn.heads, attn.kv_heads, attn.head_dim) == (4, 2, 16)
    assert model(tok).shape == (2, 32, 256) and _build("tiny_vit")(example_inputs("tiny_vit")[0]).shape == (2, 10)


def test_builders_exported():
    for fn in ("inception_bn", "resnet_small", "densenet_small", "mobilenetv2_small",
               "senet_small", "lenet", "shufflenet_small", "grouped_resnext_small"):
        assert callable(getattr(models, fn))


@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_forward_and_fx_trace(name):
    model = _build(name)
    inputs = example_inputs(name, batch=BATCH)
    with torch.no_grad():
        out = model(*inputs)
    assert out.shape == ((BATCH, 32, 256) if name == "tiny_lm" else (BATCH, NUM_CLASSES))
    assert torch.isfinite(out).all()

    gm = torch.fx.symbolic_trace(model)
    assert isinstance(gm, torch.fx.GraphModule)
    with torch.no_grad():
        traced_out = gm(*inputs)
    assert (traced_out - out).abs().max().item() < 1e-6


@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_onnx_export(name):
    onnx = pytest.importorskip("onnx")
    model = _build(name)
    inputs = example_inputs(name, batch=BATCH)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)

    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (ort_out,) = sess.run(None, {"input": inputs[0].numpy()})
    with torch.no_grad():
        ref = model(*inputs)
    assert ort_out.shape == tuple(ref.shape)
    assert (torch.from_numpy(ort_out) - ref).abs().max().item() < 1e-4


def _convs(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_inception_bn_narrow_param_ratio():
    full = models.inception_bn(width_mult=1.0)
    narrow = ZOO["inception_bn_narrow"].build()
    fc, nc = _convs(full), _convs(narrow)
    assert len(fc) == len(nc) and len(fc) >= 40
    ratios = [b.weight.numel() / a.weight.numel() for a, b in zip(fc, nc)]
    median = statistics.median(ratios)
    total = sum(b.weight.numel() for b in nc) / sum(a.weight.numel() for a in fc)
    print(f"narrow/full conv param ratio: median={median:.4f} total={total:.4f} "
          f"min={min(ratios):.4f} max={max(ratios):.4f} over {len(ratios)} convs")
    assert 0.2 <= median <= 0.4
    assert 0.2 <= total <= 0.4
    # "Most" conv layers are near 30 % (only the stem conv, fixed 3 input
    # channels, is an outlier).
    near = sum(0.25 <= r <= 0.35 for r in ratios)
    assert near >= 0.9 * len(ratios)


def test_inception_bn_structure():
    model = models.inception_bn()
    n_inception = sum(isinstance(m, models.InceptionModule)
                      for m in model.modules())
    n_reduction = sum(isinstance(m, models.ReductionModule)
                      for m in model.modules())
    assert 6 <= n_inception <= 8
    assert n_reduction >= 1
    # BN after every conv: same number of convs and BNs.
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == len(_convs(model))
    # Both average- and max-pool projection branches appear.
    pools = {type(m.branch_pool[0]) for m in model.modules()
             if isinstance(m, models.InceptionModule)}
    assert pools == {nn.AvgPool2d, nn.MaxPool2d}


@pytest.mark.parametrize("width_mult", [1.0, 0.55])
def test_inception_bn_factorized(width_mult):
    torch.manual_seed(0)
    model = models.inception_bn(width_mult=width_mult, factorized=True).eval()
    kernels = {tuple(m.kernel_size) for m in _convs(model)}
    assert (3, 1) in kernels and (1, 3) in kernels
    (x,) = example_inputs("inception_bn")
    with torch.no_grad():
        out = model(x)
        gm = torch.fx.symbolic_trace(model)
        assert (gm(x) - out).abs().max().item() < 1e-6
    assert out.shape == (BATCH, NUM_CLASSES)


def test_builder_kwargs():
    torch.manual_seed(0)
    with torch.no_grad():
        assert models.inception_bn(num_classes=7)(torch.randn(1, 3, 32, 32)).shape == (1, 7)
        assert models.lenet(in_channels=3, input_size=32)(torch.randn(1, 3, 32, 32)).shape == (1, 10)
        assert models.resnet_small(num_classes=5)(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    # Tiny width multiplier still yields >= 1 channel everywhere.
    assert min(m.out_channels for m in _convs(models.inception_bn(width_mult=0.01))) >= 1


def test_model_features_present():
    """Each model contains the graph features it is meant to exercise."""
    def targets(name):
        gm = torch.fx.symbolic_trace(_build(name))
        return [n.target for n in gm.graph.nodes]

    import operator
    assert sum(t is operator.add for t in targets("resnet_small")) == 6
    assert torch.cat in targets("densenet_small")
    mb = _build("mobilenetv2_small")
    assert any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
               for m in mb.modules())
    assert sum(t is operator.add for t in targets("mobilenetv2_small")) >= 3
    se = targets("senet_small")
    assert operator.mul in se and "unsqueeze" in se and operator.getitem in se
    sh = targets("shufflenet_small")
    assert "chunk" in sh and "size" in sh and "view" in sh and torch.transpose in sh
    assert any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels
               for m in _build("resnext_small").modules())
