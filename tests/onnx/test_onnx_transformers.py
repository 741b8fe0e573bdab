"""Transformer relations on ONNX exports (TorchScript opset 17 and dynamo): LayerNormalization,
RMSNorm written out as ReduceMean/Pow/Sqrt, MatMul attention, GQA Expand, class tokens, tied embeddings."""

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="exports its test models with torch")

import graphgrow.onnx as gonnx  # noqa: E402
from graphgrow import models  # noqa: E402
from test_onnx_models import export  # noqa: E402
from transformer_stacks import Stack, tokens  # noqa: E402

CASES = {
    "layernorm": dict(),
    "rms_written": dict(norm="rms_written", mlp="swiglu"),
    "layer_written": dict(norm="layer_written"),
    "gqa_rotary_tied": dict(kv_heads=2, rotary=True, tie=True, norm="rms_written"),
    "matmul_attention": dict(attention="matmul"),
    "post_norm": dict(post=True),
    "moe": dict(mlp="moe", norm="rms_written"),
}


def _exact(rep):
    assert rep.check.passed and rep.check.worst.max_rel <= 1e-4, rep.check.summary()


@pytest.mark.parametrize("factor", [2.0, 1.5])
@pytest.mark.parametrize("case", sorted(CASES))
def test_stack_exports_widen_exactly(case, factor):
    torch.manual_seed(0)
    rep = gonnx.widen(export(Stack(**CASES[case]), tokens(), False), factor)
    _exact(rep)
    stream = [s for s in rep.spaces if s.normalized]
    assert stream
    post_fractional = case == "post_norm" and factor != int(factor)
    for s in stream:
        if post_fractional:
            assert s.new_width == s.old_width and "post-norm" in s.frozen_reasons[0]
        else:
            assert s.new_width == round(s.old_width * factor), (s.name, s.frozen_reasons)
    heads = [s for s in rep.spaces if s.head_dim > 1]
    assert all(s.new_width > s.old_width for s in rep.spaces if s.head_dim == 1 and not s.frozen_reasons)
    assert heads and all(s.new_width > s.old_width for s in heads)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_zoo_lm_export_fill_and_tie(dynamo):
    """The tied embedding of the dynamo export (one initializer, a Transpose for the head) stays one tensor."""
    rep = gonnx.widen(export(models.ZOO["tiny_lm"].build(), models.example_inputs("tiny_lm", batch=1), dynamo), 1.5)
    _exact(rep)
    assert all(s.new_width > s.old_width for s in rep.spaces if not s.frozen_reasons)
    emb = next(s for s in rep.spaces if s.normalized)
    assert emb.new_width == 96
    if dynamo:
        names = [t.name for t in rep.model.graph.initializer]
        assert "lm_head.weight" in names and not any(n.startswith("lm_head.weight__") for n in names)


def test_layernormalization_epsilon_rescaled():
    torch.manual_seed(0)
    rep = gonnx.widen(export(Stack(), tokens(), False), 1.5)
    eps = [a.f for n in rep.model.graph.node if n.op_type == "LayerNormalization" for a in n.attribute
           if a.name == "epsilon"]
    assert eps and all(e == pytest.approx(1e-5 * 32 / 48) for e in eps)


def test_cli_strict_refuses_post_norm_fraction(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "post.onnx"
    src.write_bytes(export(Stack(post=True), tokens(), False).SerializeToString())
    out = tmp_path / "post.wide.onnx"
    r = subprocess.run([sys.executable, "-m", "graphgrow", "widen", str(src), "--factor", "1.5", "--strict",
                        "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "post-norm" in r.stderr and "cannot grow from 32 to 48" in r.stderr
    assert not out.exists()
    r = subprocess.run([sys.executable, "-m", "graphgrow", "widen", str(src), "--factor", "2", "--strict",
                        "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and out.exists()
