"""GPU-path and breadth check, meant for a machine with a CUDA GPU (and timm installed).

1. torch on CUDA: models living on the GPU (float32 and float16) are widened and verified there.
2. onnxruntime's CUDA provider, when the installed onnxruntime has it (else the clear refusal is recorded).
3. breadth: a sweep over timm architectures that no test lists, widened by 1.5 and verified in torch.

    python benchmarks/device_check.py --out results.json [--timm-limit N] [--budget-s S]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import graphgrow  # noqa: E402

TIMM = ["resnet50d", "resnext26ts", "seresnext26d_32x4d", "regnety_008", "efficientnet_b0", "mobilenetv3_large_100",
        "ghostnet_100", "rexnet_100", "dla34", "cspdarknet53", "res2net50_26w_4s", "dpn68", "inception_v4",
        "xception41", "hrnet_w18_small", "densenet121", "convnext_nano", "mobilevit_xxs", "efficientvit_b0",
        "fastvit_t8", "repvgg_a0", "mixnet_s", "tinynet_a", "lcnet_050", "resnetv2_50", "nf_resnet26",
        "selecsls42b", "vgg11_bn", "ese_vovnet19b_dw", "hardcorenas_a", "semnasnet_100", "tf_mixnet_s",
        "levit_128s", "deit_tiny_patch16_224", "poolformer_s12", "coat_lite_tiny", "cait_xxs24_224",
        "twins_svt_small", "pit_ti_224", "mnasnet_100", "skresnet18", "sknet" if False else "resnest14d",
        "gernet_s", "cs3darknet_s", "darknet53", "eca_resnet33ts", "gcresnet33ts", "halonet26t", "botnet26t_256",
        "lambda_resnet26t", "edgenext_xx_small", "efficientformer_l1", "mobileone_s0", "repghostnet_050",
        "inception_next_tiny", "regnetz_b16", "tresnet_m", "rdnet_tiny", "mambaout_femto", "hgnet_tiny"]


def status_of(fn):
    t = time.perf_counter()
    try:
        info = fn() or {}
        info.setdefault("status", "ok")
    except graphgrow.VerificationError as exc:
        info = {"status": "WRONG", "error": str(exc)}
    except graphgrow.GraphGrowError as exc:
        info = {"status": "refused", "error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # noqa: BLE001
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f"{fr.filename.split('graphgrow/')[-1]}:{fr.lineno}" for fr in reversed(tb)
                      if "graphgrow" in fr.filename), "")
        info = {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:300]}", "where": where}
    info["seconds"] = round(time.perf_counter() - t, 2)
    return info


def summarize(rep):
    return {"params_before": rep.params_before, "params_after": rep.params_after,
            "spaces": len(rep.spaces), "widened": len(rep.widened),
            "frozen": sum(1 for s in rep.spaces if s.status == "frozen"),
            "max_rel": rep.check.worst.max_rel if rep.check is not None else None,
            "top_frozen": sorted(rep.frozen_reasons().items(), key=lambda kv: -kv[1])[:3]}


def gpu_checks(results):
    import torchvision

    dev = torch.device("cuda")
    for name in ["resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121", "shufflenet_v2_x1_0"]:
        for dtype, rtol in ((torch.float32, 1e-4), (torch.float16, 1e-2)):
            def run(name=name, dtype=dtype, rtol=rtol):
                torch.manual_seed(0)
                m = torchvision.models.get_model(name, num_classes=10).eval().to(dev, dtype)
                x = torch.randn(2, 3, 64, 64, device=dev, dtype=dtype)
                wide = graphgrow.widen(m, 1.5, example_inputs=(x,), verify="torch", rtol=rtol, atol=1e-3)
                assert next(wide.parameters()).device.type == "cuda"
                assert next(wide.parameters()).dtype == dtype
                return summarize(wide.graphgrow_report)

            results["cuda_torch"][f"{name}/{str(dtype).split('.')[-1]}"] = status_of(run)

    def ort_cuda():
        import torchvision

        m = torchvision.models.resnet18(num_classes=10).eval()
        x = torch.randn(1, 3, 64, 64)
        rep = graphgrow.check(m, m, (x,), backend="onnxruntime", providers="cuda")
        return {"max_rel": rep.worst.max_rel, "providers": rep.providers}

    results["ort_cuda"] = status_of(ort_cuda)


def timm_sweep(results, limit, budget_s, start):
    try:
        import timm
    except ImportError:
        results["timm_error"] = "timm not installed"
        return
    results["timm_version"] = timm.__version__
    available = set(timm.list_models())
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    for name in TIMM[:limit]:
        if time.perf_counter() - start > budget_s:
            results["timm"][name] = {"status": "skipped: time budget"}
            continue
        if name not in available:
            results["timm"][name] = {"status": "skipped: not in this timm"}
            continue

        def run(name=name):
            torch.manual_seed(0)
            m = timm.create_model(name, pretrained=False, num_classes=10).eval().to(dev)
            size = m.pretrained_cfg.get("input_size", (3, 224, 224))[-1] if hasattr(m, "pretrained_cfg") else 224
            fixed = any(k in name for k in ("deit", "levit", "cait", "pit", "coat", "twins", "botnet", "halonet",
                                             "efficientformer", "mobilevit", "fastvit"))
            s = size if fixed else 96
            x = torch.randn(1, 3, s, s, device=dev)
            wide = graphgrow.widen(m, 1.5, example_inputs=(x,), verify="torch")
            out = summarize(wide.graphgrow_report)
            out["input"] = s
            return out

        results["timm"][name] = status_of(run)
        print(name, results["timm"][name]["status"], results["timm"][name].get("seconds"), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="device_check.json")
    p.add_argument("--timm-limit", type=int, default=len(TIMM))
    p.add_argument("--budget-s", type=float, default=420)
    a = p.parse_args(argv)
    start = time.perf_counter()
    results = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "cuda_torch": {}, "timm": {}}
    try:
        import onnxruntime

        results["onnxruntime"] = onnxruntime.__version__
        results["ort_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    if torch.cuda.is_available():
        gpu_checks(results)
    print(json.dumps({k: v for k, v in results.items() if k != "timm"}, indent=1), flush=True)
    timm_sweep(results, a.timm_limit, a.budget_s, start)
    counts = {}
    for v in results["timm"].values():
        counts[v["status"]] = counts.get(v["status"], 0) + 1
    results["timm_counts"] = counts
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print("timm:", counts)


if __name__ == "__main__":
    main()
