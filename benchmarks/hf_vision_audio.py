"""Hugging Face vision and audio encoders widened x2 / x1.5 (issue 18): tiny random models, eval, float32.

Each row: max relative error of the main output (last_hidden_state, else logits) on the example input, params
before -> after, the fraction of ideal (grown params / params of the same family built with every width
scaled: hidden/intermediate sizes, head counts, per-stage lists; head size kept), the spaces that grew, and
every space that stayed below the requested width with its reason.  Base models (ViTModel, CLIPVisionModel,
...) return the stream itself, so it stays (reaches a model output); the classification / CTC variants show
the body growing.  Usage: ``python benchmarks/hf_vision_audio.py [fam,fam|all] [2,1.5]``.
"""
import sys, warnings, copy, time, traceback
warnings.filterwarnings("ignore")
import torch, transformers as T, graphgrow
torch.manual_seed(0)
def vit_kw(**k): return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8, **k)
FAM = {
 "vit": ("ViTModel", vit_kw(), "pix"),
 "vit-cls": ("ViTForImageClassification", vit_kw(num_labels=10), "pix"),
 "deit": ("DeiTForImageClassification", vit_kw(num_labels=10), "pix"),
 "beit": ("BeitForImageClassification", vit_kw(use_relative_position_bias=True, num_labels=10), "pix"),
 "data2vec-vision": ("Data2VecVisionForImageClassification", vit_kw(use_relative_position_bias=True, num_labels=10), "pix"),
 "dinov2": ("Dinov2ForImageClassification", vit_kw(drop=("intermediate_size",), mlp_ratio=2, num_labels=10), "pix"),
 "swin": ("SwinForImageClassification", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=10), "pix"),
 "convnext": ("ConvNextModel", dict(hidden_sizes=[16, 32], depths=[1, 1], image_size=32, num_stages=2), "pix"),
 "convnext-cls": ("ConvNextForImageClassification", dict(hidden_sizes=[16, 32], depths=[1, 1], image_size=32, num_stages=2, num_labels=10), "pix"),
 "resnet": ("ResNetForImageClassification", dict(hidden_sizes=[16, 32], depths=[1, 1], embedding_size=16, num_labels=10), "pix"),
 "regnet": ("RegNetForImageClassification", dict(hidden_sizes=[16, 32], depths=[1, 1], embedding_size=16, groups_width=8, num_labels=10), "pix"),
 "wav2vec2": ("Wav2Vec2ForCTC", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
              num_conv_pos_embedding_groups=4, vocab_size=32), "wav"),
 "hubert": ("HubertForCTC", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
              num_conv_pos_embedding_groups=4, vocab_size=32), "wav"),
 "clip-vision": ("CLIPVisionModel", vit_kw(), "pix"),
 "siglip-vision": ("SiglipVisionModel", vit_kw(), "pix"),
 "clip-text": ("CLIPTextModel", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=99, max_position_embeddings=32), "tok"),
 "siglip-text": ("SiglipTextModel", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=99, max_position_embeddings=32), "tok"),
}
WIDTH_LISTS = ("hidden_sizes", "num_heads", "conv_dim")
WIDTHS = ("hidden_size", "intermediate_size", "num_attention_heads", "embed_dim", "embedding_size", "groups_width")

def build(name, scale=1.0):
    cls_name, kwargs, kind = FAM[name]
    kwargs = dict(kwargs); kwargs.pop("drop", ())
    if scale != 1.0:
        for k in list(kwargs):
            if k in WIDTHS or k in WIDTH_LISTS:
                v = kwargs[k]
                kwargs[k] = type(v)(int(round(x * scale)) for x in v) if isinstance(v, (list, tuple)) else int(round(v * scale))
    cls = getattr(T, cls_name)
    cfg = cls.config_class(**kwargs)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return cls(cfg).eval(), kind

def inputs(model, kind):
    g = torch.Generator().manual_seed(0)
    c = model.config
    if kind == "pix":
        s = getattr(c, "image_size", 32); return (torch.randn(2, c.num_channels, s, s, generator=g),)
    if kind == "wav":
        return (torch.randn(2, 400, generator=g),)
    return (torch.randint(0, c.vocab_size, (2, 9), generator=g),)

def n(m): return sum(p.numel() for p in m.parameters())

def out(m, x):
    with torch.no_grad():
        o = m(*x)
    return o.last_hidden_state if getattr(o, "last_hidden_state", None) is not None else o[0]

def measure(name, factor):
    model, kind = build(name)
    x = inputs(model, kind)
    t = time.time()
    try:
        g = graphgrow.widen(model, factor, example_inputs=x)
    except Exception as e:
        return f"{name:16s} x{factor}: REFUSED/CRASH {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    r = g.graphgrow_report
    a, b = out(model, x), out(g, x)
    err = float((a - b).abs().max() / a.abs().max())
    ideal = n(build(name, factor)[0])
    grown = [s for s in r.spaces if s.new_width > s.old_width]
    stay = [s for s in r.spaces if s.new_width < round(s.old_width * factor)]
    lines = [f"{name:16s} x{factor}: err {err:.1e} params {n(model)} -> {n(g)} (ideal {ideal}, {n(g)/ideal:.3f}) "
             f"grew {len(grown)}/{len(r.spaces)} spaces  {time.time()-t:.1f}s"]
    for s in stay:
        lines.append(f"     stays {s.name[:45]} {s.old_width}->{s.new_width} | {'; '.join(s.frozen_reasons)[:250]}")
    for note in r.notes:
        lines.append(f"     note: {note[:250]}")
    return "\n".join(lines)

if __name__ == "__main__":
    names = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] != "all" else list(FAM)
    factors = [float(f) for f in sys.argv[2].split(",")] if len(sys.argv) > 2 else [2.0]
    for nm in names:
        for f in factors:
            print(measure(nm, f), flush=True)
