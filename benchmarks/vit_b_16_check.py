"""The transformer issue's measurement on torchvision vit_b_16 (224x224, batch 1): widen x1.41 and x2 from
PyTorch (fx) and from its ONNX export (TorchScript exporter, opset 17), each verified (torch / onnxruntime).

torchvision initializes the classifier to zero and the norms to the identity, which would make every output
equal and every check blind: the norms and the classifier get random values first.

Usage::

    PYTHONPATH=. python benchmarks/vit_b_16_check.py [FACTORS]      # default 1.41,2

Prints one block per factor and frontend; the committed results are in benchmarks/results/vit_b_16_check.md.
"""

import io
import sys
import time
import warnings

import onnx
import torch
from torchvision.models import vit_b_16

import graphgrow
import graphgrow.onnx as go

warnings.simplefilter("ignore")


def main(factors):
    torch.manual_seed(0)
    m = vit_b_16().eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
        m.heads.head.weight.normal_(0, 0.05)
        m.heads.head.bias.uniform_(-0.1, 0.1)
    buf = io.BytesIO()
    torch.onnx.export(m, (x,), buf, dynamo=False, opset_version=17)
    for f in factors:
        t = time.time()
        w = graphgrow.widen(m, f, example_inputs=(x,))
        r = w.graphgrow_report
        a = w.encoder.layers.encoder_layer_0.self_attention
        print(f"fx x{f}: {time.time() - t:.1f} s, params {r.params_before} -> {r.params_after}, heads {a.num_heads} "
              f"of {a.head_dim}, stream {a.embed_dim}, ln eps {w.encoder.layers.encoder_layer_0.ln_1.eps:.3g}; "
              f"{r.check}")
        print("  not widened:", [(s.name, s.frozen_reasons[:1]) for s in r.spaces if s.new_width == s.old_width])
        t = time.time()
        res = go.widen(onnx.load_from_string(buf.getvalue()), f)
        print(f"onnx x{f}: {time.time() - t:.1f} s, params {res.params_before} -> {res.params_after}; {res.check}")
        print("  not widened:", [(s.name, s.frozen_reasons[:1]) for s in res.spaces if s.new_width == s.old_width])
        print("  widths (old, new):", sorted({(s.old_width, s.new_width) for s in res.spaces}))


if __name__ == "__main__":
    main([float(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1.41,2").split(",")])
