"""The checkpoint writer serial against a pool of worker processes (``--workers N``), bit-identity asserted.

    PYTHONPATH=. python benchmarks/hf_parallel.py DIR [--factor 1.5 | --deepen REGEX] [--workers 1,2] [--check]
    PYTHONPATH=. python benchmarks/hf_parallel.py DIR --build-mb 200   # first make DIR: a random bf16 Llama

Grows the checkpoint directory DIR once per entry of --workers, each run in a fresh subprocess (outputs in
DIR-parallel-N beside it, removed after), and prints per run: the wall time of widen_checkpoint /
deepen_checkpoint (planning included; --check adds the verification), the time of the os.sync() that follows
(the writer leaves its bytes in the page cache: the flushed total is the fair comparison between runs), the
peak RSS of the main process and of the largest worker, and the speed-up against the first entry.  Every run's
files must have the same sha256 as the first run's, or the script fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build(src: str, megabytes: float, shard_mb: float) -> None:
    """A Llama-shaped bf16 checkpoint of about ``megabytes`` (hidden 1024, MLP 2816, GQA 16/4 heads, vocab
    16000, as many layers as fit), random weights, sharded at ``shard_mb``, one shard in memory at a time."""
    import torch
    import transformers
    from safetensors.torch import save_file

    per_layer = 2 * (2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 2816 + 2 * 1024)
    layers = max(1, int((megabytes * 1e6 - 2 * 2 * 16000 * 1024) // per_layer))
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                                      num_attention_heads=16, num_key_value_heads=4, vocab_size=16000,
                                      tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in transformers.LlamaForCausalLM(config).state_dict().items()}
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_mb * 1e6:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    part = src + ".part"
    os.makedirs(part, exist_ok=True)
    weight_map, gen = {}, torch.Generator().manual_seed(0)
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: torch.empty(shapes[n], dtype=torch.bfloat16).normal_(std=0.02, generator=gen) for n in names},
                  os.path.join(part, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    with open(os.path.join(part, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    config.to_json_file(os.path.join(part, "config.json"))
    os.replace(part, src)


def digests(folder: str) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            h = hashlib.sha256()
            with open(os.path.join(root, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            out[os.path.relpath(os.path.join(root, name), folder)] = h.hexdigest()
    return out


def measure(src: str, out: str, workers: int, factor: float, deepen: str | None, check: bool) -> dict:
    """In a fresh subprocess: one growth, timed."""
    from graphgrow.hf.stream import deepen_checkpoint, widen_checkpoint

    start = time.perf_counter()
    if deepen:
        deepen_checkpoint(src, out, after=deepen, check=check, workers=workers)
    else:
        widen_checkpoint(src, out, factor, check=check, workers=workers)
    grown = time.perf_counter() - start
    os.sync()
    synced = time.perf_counter() - start - grown
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"workers": workers, "seconds": grown, "sync_seconds": synced, "peak_rss_mb": rss,
            "worker_peak_rss_mb": workers_rss, "out_bytes": sum(os.path.getsize(os.path.join(out, f))
                                                                 for f in os.listdir(out)),
            "digests": digests(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="a Hugging Face checkpoint directory")
    parser.add_argument("--factor", type=float, default=1.5)
    parser.add_argument("--deepen", metavar="REGEX", help="block expansion after the layers REGEX names instead")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--check", action="store_true", help="verify each output (loads both models)")
    parser.add_argument("--build-mb", type=float, help="first build DIR (when missing): a random bf16 Llama")
    parser.add_argument("--shard-mb", type=float, default=50)
    parser.add_argument("--measure", nargs=2, metavar=("OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    src = os.path.abspath(args.dir)
    if args.measure:
        print(json.dumps(measure(src, args.measure[0], int(args.measure[1]), args.factor, args.deepen, args.check)))
        return
    if args.build_mb and not os.path.isdir(src):
        build(src, args.build_mb, args.shard_mb)
    what = f"deepen --after {args.deepen!r}" if args.deepen else f"widen x{args.factor}"
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    print(f"# {src} ({size / 1e9:.2f} GB), {what}{', checked' if args.check else ''}; "
          f"{len(os.sched_getaffinity(0))} CPUs, {time.strftime('%Y-%m-%d')}\n")
    print("| workers | grow s | + sync s | total s | speed-up | main peak RSS MB | worker peak RSS MB | output GB |")
    print("|---|---|---|---|---|---|---|---|")
    first = None
    for n in (int(w) for w in args.workers.split(",")):
        out = f"{src}-parallel-{n}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, __file__, src, "--measure", out, str(n), "--factor", str(args.factor)]
        cmd += (["--deepen", args.deepen] if args.deepen else []) + (["--check"] if args.check else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        shutil.rmtree(out, ignore_errors=True)
        if proc.returncode:
            raise SystemExit(f"--workers {n} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.splitlines()[-1])
        first = first or r
        if r["digests"] != first["digests"]:
            bad = sorted(k for k in set(r["digests"]) | set(first["digests"])
                         if r["digests"].get(k) != first["digests"].get(k))
            raise SystemExit(f"--workers {n} wrote different bytes than --workers {first['workers']}: {bad[:5]}")
        total = r["seconds"] + r["sync_seconds"]
        speedup = (first["seconds"] + first["sync_seconds"]) / total
        print(f"| {n} | {r['seconds']:.1f} | {r['sync_seconds']:.1f} | {total:.1f} | {speedup:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['worker_peak_rss_mb']:.0f} | {r['out_bytes'] / 1e9:.2f} |", flush=True)
    print(f"\nevery run wrote the same {len(first['digests'])} files, byte for byte (sha256)")


if __name__ == "__main__":
    main()
