"""Growing a Llama-shaped checkpoint of ~1 B parameters (bf16, random weights) in bounded memory.

    PYTHONPATH=. python benchmarks/hf_scale.py [FOLDER] [--factors 2,1.5] [--shard-gb 2]

Makes FOLDER/src (default FOLDER: /tmp/graphgrow_hf_scale; kept between runs): TinyLlama-1.1B's shape
(hidden 2048, MLP 5632, 22 layers, 32 heads, 4 kv heads, vocab 32000), random bf16 weights, sharded at
--shard-gb, built shard by shard from the shapes of a meta-device LlamaForCausalLM (never in memory).
Then, each in a fresh subprocess, wall time and peak RSS (VmHWM):

* plan-F:   the planning alone (meta-device model, torch.export, analysis, recipes, config): the fixed cost
* widen-F:  graphgrow.hf.stream.widen_checkpoint(..., F, check=False): plan + stream every tensor
* floor-F:  the floor for the same bytes: every input shard read with safetensors, and the output's tensors
            (same names, shapes, dtype and shards as widen-F wrote) written with safetensors' save_file
* identity: rewrite_checkpoint with the identity plan, against floor-1 (read + write of the input bytes)

The page cache is warm (the checkpoint fits in memory), so times are CPU and copy bound.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def build(src: str, shard_bytes: int) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                      tie_word_embeddings=False, dtype="bfloat16",
                                      architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in transformers.LlamaForCausalLM(config).state_dict().items()}
    shards, size = [[]], 0  # transformers' greedy split: a new shard when the next tensor would overflow
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    os.makedirs(src + ".part", exist_ok=True)
    weight_map, torch_gen = {}, torch.Generator().manual_seed(0)
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: torch.empty(shapes[n], dtype=torch.bfloat16).normal_(std=0.02, generator=torch_gen)
                   for n in names}
        save_file(tensors, os.path.join(src + ".part", file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    total = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    with open(os.path.join(src + ".part", "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    config.to_json_file(os.path.join(src + ".part", "config.json"))
    os.replace(src + ".part", src)


def measure(mode: str, src: str, out: str, ref: str) -> dict:
    """Run in a subprocess: the seconds and peak RSS of one mode."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from graphgrow.core.sites import GrowOptions
    from graphgrow.hf.checkpoint import Checkpoint, rewrite_checkpoint
    from graphgrow.hf.stream import meta_inputs, meta_model, widen_checkpoint
    from graphgrow.hf.widen import plan_widening

    class Identity:
        def outputs(self, name):
            return [(name, ckpt.shape(name), ckpt.dtype(name))]

        def compute(self, name, tensor):
            return {name: tensor}

    baseline = peak_rss_mb()
    start = time.perf_counter()
    ckpt = Checkpoint.open(src)
    kind, _, factor = mode.partition("-")
    extra = {}
    if kind == "floor":  # read the input; write tensors shaped as ref's (the grown output, or the input)
        target = Checkpoint.open(ref)
        os.makedirs(out)
        for file, _ in ckpt.shards:
            with safe_open(os.path.join(src, file), framework="pt") as f:
                for k in f.offset_keys():
                    f.get_tensor(k)
        for file, names in target.shards:
            save_file({n: torch.empty(target.shape(n), dtype=target.dtype(n)) for n in names},
                      os.path.join(out, file), metadata={"format": "pt"})
    elif kind == "plan":
        model = meta_model(ckpt)
        w = plan_widening(model, meta_inputs(model), float(factor), options=GrowOptions())
        extra["widened"] = f"{len(w.report(model, 0).widened)}/{len(w.an.produced)}"
    elif kind == "widen":
        result = widen_checkpoint(src, out, float(factor), check=False)
        out_ckpt = Checkpoint.open(out)
        extra.update(out_bytes=out_ckpt.total_bytes, out_largest=out_ckpt.largest_tensor_bytes,
                     summary=result["report"].summary(), notes=result["report"].notes)
    else:
        rewrite_checkpoint(ckpt, out, ckpt.config, Identity())
    return {"mode": mode, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
            "baseline_rss_mb": baseline, **extra}


def _run(mode, src, out, ref) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--measure", mode, src, out, ref], capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="/tmp/graphgrow_hf_scale")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--factors", default="2,1.5")
    parser.add_argument("--measure", nargs=4, metavar=("MODE", "SRC", "OUT", "REF"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    src = os.path.join(args.folder, "src")
    if not os.path.isdir(src):
        start = time.perf_counter()
        build(src, int(args.shard_gb * 1e9))
        print(f"built {src} in {time.perf_counter() - start:.0f} s")
    import torch
    import transformers

    from graphgrow.hf.checkpoint import Checkpoint

    ckpt = Checkpoint.open(src)
    n_params = ckpt.total_bytes // 2
    print(f"# graphgrow on a checkpoint directory: {n_params / 1e9:.2f} B parameters (bf16, TinyLlama-1.1B's "
          f"shape), {ckpt.total_bytes / 1e9:.2f} GB in {len(ckpt.shards)} shards, largest tensor "
          f"{ckpt.largest_tensor_bytes / 1e6:.0f} MB\n")
    print(f"`PYTHONPATH=. python benchmarks/hf_scale.py --factors {args.factors}`; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}\n")
    print("| run | wall s | ratio to floor | peak RSS MB | over baseline MB | output GB | largest output tensor MB |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for factor in args.factors.split(","):
        out = os.path.join(args.folder, f"out-{factor}")
        plan = _run(f"plan-{factor}", src, out, src)
        widen = _run(f"widen-{factor}", src, out, src)
        floor = _run(f"floor-{factor}", src, os.path.join(args.folder, "floor"), out)
        shutil.rmtree(os.path.join(args.folder, "floor"), ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        for r in (plan, widen, floor):
            ratio = f"{r['seconds'] / floor['seconds']:.2f}" if r is widen else ""
            size = f"{widen['out_bytes'] / 1e9:.2f}" if r is not plan else ""
            largest = f"{widen['out_largest'] / 1e6:.0f}" if r is widen else ""
            print(f"| {r['mode']} | {r['seconds']:.1f} | {ratio} | {r['peak_rss_mb']:.0f} | "
                  f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} | {size} | {largest} |", flush=True)
        rows.append((factor, plan, widen, floor))
    identity = _run("identity", src, os.path.join(args.folder, "out-identity"), src)
    floor1 = _run("floor-1", src, os.path.join(args.folder, "floor"), src)
    for r in (identity, floor1):
        shutil.rmtree(os.path.join(args.folder, "out-identity" if r is identity else "floor"), ignore_errors=True)
        ratio = f"{identity['seconds'] / floor1['seconds']:.2f}" if r is identity else ""
        print(f"| {r['mode']} | {r['seconds']:.1f} | {ratio} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} | {ckpt.total_bytes / 1e9:.2f} | |")
    print()
    for factor, plan, widen, floor in rows:
        print(f"x{factor}: {widen['summary']}; " + "; ".join(widen["notes"]))
        stream_s = widen["seconds"] - plan["seconds"]
        per_byte = stream_s / widen["out_bytes"]
        rss = widen["peak_rss_mb"] - widen["baseline_rss_mb"]
        print(f"  streaming {stream_s:.1f} s for {widen['out_bytes'] / 1e9:.2f} GB written: "
              f"{per_byte * 1e9:.2f} s/GB; peak RSS over baseline {rss:.0f} MB = "
              f"{rss * 1e6 / widen['out_largest']:.1f} x the largest output tensor "
              f"(planning alone: {plan['peak_rss_mb'] - plan['baseline_rss_mb']:.0f} MB)")
        for name, params in (("7B", 6.74e9), ("70B", 68.98e9)):
            grown = widen["out_bytes"] / ckpt.total_bytes * params * 2
            print(f"  projection {name} (bf16, {params / 1e9:.1f} B params): {grown / 1e9:.0f} GB written, "
                  f"~{grown * per_byte / 60:.0f} min streaming at the measured per-byte cost "
                  f"(+ planning, which grows with the layer count, not the width)")


if __name__ == "__main__":
    main()
