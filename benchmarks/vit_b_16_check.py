import torch, time, onnx, io, warnings, sys
warnings.simplefilter("ignore")
import graphgrow, graphgrow.onnx as go
from torchvision.models import vit_b_16
torch.manual_seed(0)
m = vit_b_16().eval(); x = torch.randn(1, 3, 224, 224)
with torch.no_grad():  # torchvision's zero classifier and identity norms would make every check pass
    for mod in m.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.weight.uniform_(0.5, 1.5); mod.bias.uniform_(-0.5, 0.5)
    m.heads.head.weight.normal_(0, 0.05); m.heads.head.bias.uniform_(-0.1, 0.1)
for f in [float(a) for a in sys.argv[1].split(',')]:
    t = time.time(); w = graphgrow.widen(m, f, example_inputs=(x,))
    r = w.graphgrow_report
    a = w.encoder.layers.encoder_layer_0.self_attention
    print(f"fx x{f}", round(time.time()-t,1), "s params", r.params_before, "->", r.params_after, "heads", a.num_heads, "head_dim", a.head_dim, "embed", a.embed_dim, "eps", w.encoder.layers.encoder_layer_0.ln_1.eps, "check", r.check, "notes", r.notes)
    print("  not widened:", [(s.name, s.frozen_reasons[:1]) for s in r.spaces if s.new_width == s.old_width])
    buf = io.BytesIO(); torch.onnx.export(m, (x,), buf, dynamo=False, opset_version=17)
    t = time.time(); res = go.widen(onnx.load_from_string(buf.getvalue()), f)
    print(f"onnx x{f}", round(time.time()-t,1), "s", res.params_before, "->", res.params_after, res.check, res.notes)
    print("  not widened:", [(s.name, s.frozen_reasons[:1]) for s in res.spaces if s.new_width == s.old_width])
    print("  widths:", sorted({(s.old_width, s.new_width) for s in res.spaces}))
