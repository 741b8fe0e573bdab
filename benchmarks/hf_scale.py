"""Growing a Llama-shaped checkpoint (bf16, random weights) in bounded memory: 1.1 B or 7 B parameters.

    PYTHONPATH=. python benchmarks/hf_scale.py [FOLDER] [--model 1b|7b] [--factors 2,1.5] [--workers 1]

Makes FOLDER/src (default FOLDER: /tmp/graphgrow_hf_scale[_7b]; kept between runs): TinyLlama-1.1B's shape
(hidden 2048, MLP 5632, 22 layers, 32 heads, 4 kv heads) or Llama-2-7B's (hidden 4096, MLP 11008, 32 layers,
32 heads), vocab 32000, random bf16 weights, sharded as the hub shards them (2 GB / 10 GB), built shard by
shard from the shapes of a meta-device LlamaForCausalLM (never in memory); the free disk space is checked
first (7B x1.5: 13.5 GB in, 30 GB out, one output at a time). Then, each in a fresh subprocess, wall time and
peak RSS (VmHWM of the main process; the largest worker's too):

* plan-F:      the planning alone (meta-device model, torch.export, analysis, recipes, config): the fixed cost
* widen-F:     the default command, graphgrow.hf.stream.widen_checkpoint(..., F): plan, stream every tensor
               (default writer), flush, and the layer-by-layer check
* widen-F-wN:  the same with workers=N (1: the serial writer)
* stream-F:    (1b) check=False: plan and stream only
* floor-F:     the floor for the same bytes: every input shard read with safetensors, and the output's tensors
               (same names, shapes, dtype and shards as widen-F wrote) written with safetensors' save_file and
               flushed to disk (fsync), as graphgrow flushes its output
* identity:    (1b) rewrite_checkpoint with the identity plan, against floor-1
* --upcycle E,K (only these rows): moeplan-ExK, the planning alone (meta model, graphgrow.hf.upcycle.plan_upcycle);
               upcycle-ExK, the default command graphgrow.hf.upcycle_stream.upcycle_checkpoint(src, out, E, K)
               (Llama -> Mixtral, zero routers, default writer, layer-by-layer check); floor-upcycle-ExK, the
               flushed floor for the Mixtral checkpoint it wrote (same names, shapes, shards)
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


# Llama shapes: TinyLlama-1.1B and Llama-2-7B (multi-head attention, as the hub's meta-llama/Llama-2-7b-hf,
# whose two shards are 9.98 GB and 3.5 GB)
PRESETS = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
}
SHARD_GB = {"1b": 2.0, "7b": 10.0}
NAMES = {"1b": "TinyLlama-1.1B's shape", "7b": "Llama-2-7B's shape"}


def build(src: str, shard_bytes: int, preset: str = "1b") -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(**PRESETS[preset], vocab_size=32000, tie_word_embeddings=False,
                                      dtype="bfloat16", architectures=["LlamaForCausalLM"])
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


def _layout(ckpt) -> list:
    return [(file, [(n, list(ckpt.shape(n)), str(ckpt.dtype(n)).split(".")[-1]) for n in names])
            for file, names in ckpt.shards]


def measure(mode: str, src: str, out: str, ref: str) -> dict:
    """Run in a subprocess: the seconds and peak RSS of one mode (``ref``: the output layout's JSON file)."""
    import inspect

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
    kind, _, rest = mode.partition("-")
    factor, _, workers = rest.partition("-w")
    extra = {}
    if kind == "floor":  # read the input; write (and flush) tensors shaped as the output's, in its shards
        os.makedirs(out)
        for file, _ in ckpt.shards:
            with safe_open(os.path.join(src, file), framework="pt") as f:
                for k in f.offset_keys():
                    f.get_tensor(k)
        with open(ref) as f:
            layout = json.load(f) if factor != "1" else _layout(ckpt)
        for file, tensors in layout:
            path = os.path.join(out, file)
            save_file({n: torch.empty(shape, dtype=getattr(torch, dtype)) for n, shape, dtype in tensors}, path,
                      metadata={"format": "pt"})
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)  # flushed as graphgrow flushes its output
            os.close(fd)
    elif kind == "moeplan":  # the upcycle's planning alone
        from graphgrow.hf.upcycle import plan_upcycle

        experts, top_k = (int(v) for v in factor.split("x"))
        plan = plan_upcycle(meta_model(ckpt), experts, top_k)
        extra["pieces"] = len(plan.pieces)
    elif kind in ("upcycle", "upcyclestream"):  # (upcyclestream: check="none", the writing alone)
        from graphgrow.hf import parallel
        from graphgrow.hf.upcycle_stream import upcycle_checkpoint

        experts, top_k = (int(v) for v in factor.split("x"))
        chosen = []
        default_workers = parallel.default_workers
        parallel.default_workers = lambda *a: chosen.append(default_workers(*a)) or chosen[-1]
        result = upcycle_checkpoint(src, out, experts, top_k, **({"workers": int(workers)} if workers else {}),
                                    check="none" if kind == "upcyclestream" else "layers")
        extra["workers"] = chosen[-1] if chosen else int(workers or 1)
        out_ckpt = Checkpoint.open(out)
        with open(ref, "w") as f:
            json.dump(_layout(out_ckpt), f)
        extra.update(out_bytes=out_ckpt.total_bytes, out_largest=out_ckpt.largest_tensor_bytes,
                     out_params=out_ckpt.total_bytes // 2, summary=result["report"].summary(),
                     notes=result["report"].notes, check=result["check"])
    elif kind == "plan":
        model = meta_model(ckpt)
        w = plan_widening(model, meta_inputs(model), float(factor), options=GrowOptions())
        extra["widened"] = f"{len(w.report(model, 0).widened)}/{len(w.an.produced)}"
    elif kind in ("widen", "stream"):
        kw = {"check": False} if kind == "stream" else {}
        if workers:
            if "workers" not in inspect.signature(widen_checkpoint).parameters:
                raise SystemExit("this graphgrow has no workers= option")
            kw["workers"] = int(workers)
        from graphgrow.hf import parallel

        chosen = []
        default_workers = parallel.default_workers
        parallel.default_workers = lambda *a: chosen.append(default_workers(*a)) or chosen[-1]
        result = widen_checkpoint(src, out, float(factor), **kw)
        extra["workers"] = chosen[-1] if chosen else int(workers or 1)
        out_ckpt = Checkpoint.open(out)
        with open(ref, "w") as f:
            json.dump(_layout(out_ckpt), f)
        extra.update(out_bytes=out_ckpt.total_bytes, out_largest=out_ckpt.largest_tensor_bytes,
                     summary=result["report"].summary(), notes=result["report"].notes, check=result["check"])
    else:
        rewrite_checkpoint(ckpt, out, ckpt.config, Identity(), workers=1)  # (the writer alone, in-process)
    import resource

    extra["worker_peak_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest worker
    return {"mode": mode, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
            "baseline_rss_mb": baseline, **extra}


def _run(mode, src, out, ref) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--measure", mode, src, out, ref], capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def _require_disk(folder: str, need: float) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise SystemExit(f"{folder}: {free / 1e9:.1f} GB free, this run needs about {need / 1e9:.1f} GB "
                         "(the input, one output and nothing else at a time); free some space or pick another folder")


def _row(r, floor, largest="") -> None:
    ratio = f"{r['seconds'] / floor['seconds']:.2f}" if floor is not None else ""
    size = f"{r['out_bytes'] / 1e9:.2f}" if "out_bytes" in r else ""
    check = r.get("check") or {}
    what = f"{check.get('check')} {check['max_rel']:.1e}" if check else ""
    workers = r.get("workers") or ""
    worker_peak = f"{r['worker_peak_mb']:.0f}" if workers and workers > 1 and r.get("worker_peak_mb") else ""
    print(f"| {r['mode']} | {r['seconds']:.1f} | {ratio} | {r['peak_rss_mb']:.0f} | "
          f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} | {workers} | {worker_peak} | {size} | {largest} | {what} |",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=None)
    parser.add_argument("--model", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--shard-gb", type=float, default=None)
    parser.add_argument("--factors", default=None)
    parser.add_argument("--workers", type=int, default=1,
                        help="also run the default command with --workers N (default 1: the serial writer; 0: not)")
    parser.add_argument("--upcycle", metavar="E,K", default=None,
                        help="run only the upcycle rows: the checkpoint -> E experts, top-K (Mixtral), vs its floor")
    parser.add_argument("--measure", nargs=4, metavar=("MODE", "SRC", "OUT", "REF"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    folder = args.folder or f"/tmp/graphgrow_hf_scale{'' if args.model == '1b' else '_' + args.model}"
    factors = args.factors or ("2,1.5" if args.model == "1b" else "1.5")
    os.makedirs(folder, exist_ok=True)
    src = os.path.join(folder, "src")
    if not os.path.isdir(src):
        import torch
        import transformers

        with torch.device("meta"):
            n = sum(t.numel() for t in transformers.LlamaForCausalLM(transformers.LlamaConfig(
                **PRESETS[args.model], vocab_size=32000, tie_word_embeddings=False)).parameters())
        _require_disk(folder, 2 * n * 1.05)
        start = time.perf_counter()
        build(src, int((args.shard_gb or SHARD_GB[args.model]) * 1e9), args.model)
        print(f"built {src} in {time.perf_counter() - start:.0f} s")
    import torch
    import transformers

    from graphgrow.hf.checkpoint import Checkpoint

    ckpt = Checkpoint.open(src)
    n_params = ckpt.total_bytes // 2
    print(f"# graphgrow on a checkpoint directory: {n_params / 1e9:.2f} B parameters (bf16, {NAMES[args.model]}), "
          f"{ckpt.total_bytes / 1e9:.2f} GB in {len(ckpt.shards)} shards, largest tensor "
          f"{ckpt.largest_tensor_bytes / 1e6:.0f} MB\n")
    command = (f"--upcycle {args.upcycle}" if args.upcycle else f"--factors {factors} --workers {args.workers}")
    print(f"`PYTHONPATH=. python benchmarks/hf_scale.py --model {args.model} {command}`; torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} "
          f"CPUs, {time.strftime('%Y-%m-%d')}\n")
    print("| run | wall s | ratio to floor | peak RSS MB | over baseline MB | writer processes | largest worker's peak "
          "RSS MB | output GB | largest output tensor MB | check |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    if args.upcycle:
        _upcycle_rows(args, folder, src, ckpt)
        return
    rows = []
    layout = os.path.join(folder, "out-layout.json")
    for factor in factors.split(","):
        grown = (float(factor) ** 2) * ckpt.total_bytes  # (about: most parameters grow with the square)
        _require_disk(folder, grown * 1.05)
        out = os.path.join(folder, f"out-{factor}")
        plan = _run(f"plan-{factor}", src, out, layout)
        runs = [_run(f"widen-{factor}", src, out, layout)]
        shutil.rmtree(out, ignore_errors=True)
        if args.workers:  # the default command's writer against another worker count (1: serial)
            runs.append(_run(f"widen-{factor}-w{args.workers}", src, out, layout))
            shutil.rmtree(out, ignore_errors=True)
        if args.model == "1b":  # the streaming alone, for the memory split
            runs.append(_run(f"stream-{factor}", src, out, layout))
            shutil.rmtree(out, ignore_errors=True)
        floor = _run(f"floor-{factor}", src, os.path.join(folder, "floor"), layout)
        shutil.rmtree(os.path.join(folder, "floor"), ignore_errors=True)
        _row(plan, None)
        for r in runs:
            _row(r, floor, f"{r['out_largest'] / 1e6:.0f}")
        _row({**floor, "out_bytes": runs[0]["out_bytes"]}, None)
        rows.append((factor, plan, runs, floor))
    if args.model == "1b":
        identity = _run("identity", src, os.path.join(folder, "out-identity"), layout)
        floor1 = _run("floor-1", src, os.path.join(folder, "floor"), layout)
        for r in (identity, floor1):
            shutil.rmtree(os.path.join(folder, "out-identity" if r is identity else "floor"), ignore_errors=True)
        _row({**identity, "out_bytes": ckpt.total_bytes}, floor1)
        _row({**floor1, "out_bytes": ckpt.total_bytes}, None)
    print()
    n_layers = PRESETS[args.model]["num_hidden_layers"]
    for factor, plan, runs, floor in rows:
        widen = runs[0]
        print(f"x{factor}: {widen['summary']}; " + "; ".join(widen["notes"]))
        rss = widen["peak_rss_mb"] - widen["baseline_rss_mb"]
        fixed = plan["peak_rss_mb"] - plan["baseline_rss_mb"]
        print(f"  default command (check {widen['check']['check']}, max_rel {widen['check']['max_rel']:.1e}): "
              f"{widen['seconds']:.0f} s = {widen['seconds'] / floor['seconds']:.2f} x the flushed floor; peak RSS "
              f"over baseline {rss:.0f} MB = planning {fixed:.0f} MB + {(rss - fixed) * 1e6 / widen['out_largest']:.1f}"
              f" x the largest output tensor ({widen['out_largest'] / 1e6:.0f} MB)")
        for r in runs[1:]:
            print(f"  {r['mode']}: {r['seconds']:.0f} s; the default command's writer ({widen.get('workers')} workers) "
                  f"took {widen['seconds'] / r['seconds']:.2f} x its time")
        per_byte = (widen["seconds"] - plan["seconds"]) / widen["out_bytes"]
        per_layer = plan["seconds"] / n_layers
        for name, params, layers in (("70B", 68.98e9, 80), ("1T MoE", 1.0e12, 61)):
            out_bytes = widen["out_bytes"] / ckpt.total_bytes * params * 2
            print(f"  projection {name} ({params / 1e9:.0f} B params, {layers} layers): {out_bytes / 1e9:.0f} GB "
                  f"written and checked, ~{(out_bytes * per_byte + layers * per_layer) / 3600:.1f} h on this machine "
                  f"(the default writer: {widen.get('workers')} processes) at the measured {per_byte * 1e9:.1f} s/GB and {per_layer:.2f} s/layer of planning")


def _upcycle_rows(args, folder: str, src: str, ckpt) -> None:
    """The upcycle rows (issue 20): planning, the default command, its flushed floor; then the figures the
    issue asks for (time against the floor, peak RSS against the largest output tensor)."""
    experts, top_k = (int(v) for v in args.upcycle.split(","))
    tag = f"{experts}x{top_k}"
    cfg = PRESETS[args.model]
    mlp = 3 * cfg["hidden_size"] * cfg["intermediate_size"] * cfg["num_hidden_layers"] * 2
    _require_disk(folder, (ckpt.total_bytes + (experts - 1) * mlp) * 1.05)
    layout = os.path.join(folder, f"out-upcycle-{tag}-layout.json")  # (not the widening rows' files)
    out = os.path.join(folder, f"out-upcycle-{tag}")
    plan = _run(f"moeplan-{tag}", src, out, layout)
    up = _run(f"upcycle-{tag}", src, out, layout)
    shutil.rmtree(out, ignore_errors=True)
    alone = _run(f"upcyclestream-{tag}", src, out, layout)  # the writing alone, for the time and memory split
    shutil.rmtree(out, ignore_errors=True)
    floor = _run(f"floor-upcycle-{tag}", src, os.path.join(folder, "floor-upcycle"), layout)
    shutil.rmtree(os.path.join(folder, "floor-upcycle"), ignore_errors=True)
    _row(plan, None)
    _row(up, floor, f"{up['out_largest'] / 1e6:.0f}")
    _row(alone, floor, f"{alone['out_largest'] / 1e6:.0f}")
    _row({**floor, "out_bytes": up["out_bytes"]}, None)
    print()
    rss = up["peak_rss_mb"] - up["baseline_rss_mb"]
    fixed = plan["peak_rss_mb"] - plan["baseline_rss_mb"]
    worker = up.get("worker_peak_mb") or 0
    print(f"upcycle {tag}: {up['summary']}")
    for note in up["notes"]:
        print(f"  {note}")
    ran = (f", routed experts run {up['check']['experts_run']}/{up['check']['experts_total']}"
           if up["check"].get("experts_total") else "")
    print(f"  default command (check {up['check']['check']}, max_rel {up['check']['max_rel']:.1e}{ran}): "
          f"{up['seconds']:.0f}"
          f" s = {up['seconds'] / floor['seconds']:.2f} x the flushed floor ({floor['seconds']:.0f} s); "
          f"{up['out_bytes'] / 1e9:.2f} GB written ({up['out_params'] / 1e9:.2f} B params)")
    print(f"  peak RSS over baseline {rss:.0f} MB = planning {fixed:.0f} MB + {(rss - fixed) * 1e6 / up['out_largest']:.1f}"
          f" x the largest output tensor ({up['out_largest'] / 1e6:.0f} MB); writer processes {up.get('workers')}, "
          f"the largest worker's peak RSS {worker:.0f} MB")
    print(f"  the writing alone (check none): {alone['seconds']:.0f} s = {alone['seconds'] / floor['seconds']:.2f} x the "
          f"floor, peak RSS over baseline {alone['peak_rss_mb'] - alone['baseline_rss_mb']:.0f} MB, the largest "
          f"worker's {alone.get('worker_peak_mb') or 0:.0f} MB")


if __name__ == "__main__":
    main()
