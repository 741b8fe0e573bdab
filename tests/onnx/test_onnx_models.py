"""ONNX files from both torch exporters (TorchScript and dynamo), widened by 1.5 and checked in onnxruntime."""

import io
import warnings

import onnx
import pytest

torch = pytest.importorskip("torch", reason="exports its test models with torch")

from graphgrow import models
import graphgrow.onnx as gonnx

TV = ["resnet18", "resnext50_32x4d", "googlenet", "inception_v3", "densenet121", "mobilenet_v2",
      "mobilenet_v3_small", "efficientnet_b0", "squeezenet1_1", "regnet_y_400mf", "shufflenet_v2_x0_5",
      "vgg11_bn", "alexnet"]
SIZE = {"inception_v3": 80, "vgg11_bn": 224, "alexnet": 224}


def export(model, inputs, dynamo: bool) -> onnx.ModelProto:
    model = model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(model, inputs, dynamo=True, verbose=False).model_proto
        f = io.BytesIO()
        torch.onnx.export(model, inputs, f, dynamo=False, opset_version=17)
        return onnx.load_from_string(f.getvalue())


def _shuffle_limit(s):
    """torchvision shufflenet_v2_x0_5 stage 3: the nested shuffles admit no per-block mapping (documented)."""
    return any("not a copy of any original channel" in r or "missing after widening" in r or r.startswith("tied to")
               for r in s.frozen_reasons)


def _assert_exact_and_widened(rep, frozen_ok=None, max_frozen=0):
    assert rep.check.passed and rep.check.worst.max_rel <= 1e-4
    stayed = [s for s in rep.spaces if s.new_width == s.old_width
              and not any(r.startswith("reaches a model output") for r in s.frozen_reasons)]
    assert all(frozen_ok and frozen_ok(s) for s in stayed), [(s.name, s.frozen_reasons) for s in stayed]
    assert len(stayed) <= max_frozen


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", list(models.ZOO))
def test_zoo_onnx(name, dynamo):
    m = models.ZOO[name].build()
    # the transformers' normalized residual streams replicate by integer factors
    factor = 2.0 if models.ZOO[name].kind == "transformer" else 1.5
    rep = gonnx.widen(export(m, models.example_inputs(name, batch=1), dynamo), factor)
    wide = rep.model
    _assert_exact_and_widened(rep)
    assert rep.params_after > 1.9 * rep.params_before
    onnx.checker.check_model(wide)


HEAVY = {"vgg11_bn", "alexnet"}  # 100M-parameter heads at 224x224: about 3 minutes together, run with -m slow


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in TV])
def test_torchvision_onnx(name, dynamo):
    torchvision = pytest.importorskip("torchvision")
    kw = dict(aux_logits=False, init_weights=True) if name in ("googlenet", "inception_v3") else {}
    m = torchvision.models.get_model(name, num_classes=10, **kw)
    s = SIZE.get(name, 64)
    rep = gonnx.widen(export(m, (torch.randn(1, 3, s, s),), dynamo), 1.5)
    shuffle = name.startswith("shufflenet")
    _assert_exact_and_widened(rep, _shuffle_limit if shuffle else None, max_frozen=9 if shuffle else 0)
