"""``graphgrow upcycle DIR --experts 8 --top-k 2 -o OUT`` and ``graphgrow grow-experts DIR --factor 2 -o OUT``:
a Hugging Face checkpoint directory that fits in memory, loaded with transformers, grown by
:func:`graphgrow.upcycle` / :func:`graphgrow.grow_experts` (verified), saved with ``save_pretrained`` into a
temporary folder beside OUT and moved into place (the checkpoint writer's rules: same refusals as ``widen``).
The streamed, bounded-memory version replays the same per-tensor pieces (graphgrow.hf.moe_plan)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from ..errors import (
    GraphGrowError,
    InvalidArgumentError,
    ModelFileError,
    VerificationError,
    first_line,
)
from . import exit_codes, options

WEIGHTS = (".safetensors", ".bin", ".index.json", ".pt", ".pth")
WRITTEN = ("config.json", "generation_config.json")


def _load(path: str):
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as exc:
        raise GraphGrowError(f"upcycling a checkpoint directory needs torch and transformers (pip install "
                             f"'graphgrow[hf]'): {exc}") from None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelFileError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    with open(os.path.join(path, "config.json")) as f:
        arch = (json.load(f).get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else transformers.AutoModelForCausalLM
    if cls is None:
        raise ModelFileError(f"{path}'s config.json names architecture {arch!r}, which transformers does not have")
    try:
        return cls.from_pretrained(path, dtype="auto").eval()
    except Exception as exc:  # noqa: BLE001 - any load failure is one sentence
        raise ModelFileError(f"transformers cannot load {path}: {first_line(exc)}") from None


# The checkpoint writer's rules (graphgrow.hf.checkpoint keeps its own copy private; the lead may make one public
# and this module use it): the output beside the input, never inside it, refused when not empty unless
# --overwrite, replaced only once the new one is complete.
def _check_output(src: str, out: str, overwrite: bool) -> str:
    out = os.path.abspath(out)
    if not os.path.isdir(os.path.dirname(out)):
        raise InvalidArgumentError(f"output folder {os.path.dirname(out)} does not exist")
    real_out, real_src = os.path.realpath(out), os.path.realpath(src)
    if os.path.commonpath([real_out, real_src]) in (real_out, real_src):
        raise InvalidArgumentError(f"output directory {out} is, contains or lies inside the checkpoint being read "
                                   f"({src}); choose another")
    if os.path.lexists(out):
        if os.path.islink(out) or not os.path.isdir(out):
            raise InvalidArgumentError(f"output path {out} exists and is not a directory")
        if os.listdir(out) and not overwrite:
            raise InvalidArgumentError(f"output directory {out} is not empty; pass --overwrite to replace it")
    return out


def _move_into_place(tmp: str, out: str) -> None:
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    old = tmp + "-old"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _save(args, result, out: str) -> None:
    """save_pretrained into a fresh folder beside ``out``, the input's other files (tokenizer...) copied, then
    renamed into place; nothing is left behind on failure."""
    out = _check_output(args.input, out, args.overwrite)
    tmp = tempfile.mkdtemp(prefix=".graphgrow-", dir=os.path.dirname(out))
    try:
        result.save_pretrained(tmp)
        for name in sorted(os.listdir(args.input)):
            src = os.path.join(args.input, name)
            if os.path.isfile(src) and not name.endswith(WEIGHTS) and name not in WRITTEN \
                    and not os.path.exists(os.path.join(tmp, name)):
                shutil.copy2(src, os.path.join(tmp, name))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _run(args, grow) -> int:
    if not os.path.isdir(args.input):
        raise InvalidArgumentError(f"{args.input} is not a checkpoint directory")
    out = args.output or f"{os.path.normpath(args.input)}-{'moe' if args.command == 'upcycle' else 'experts'}"
    if args.report:
        options.check_report_path(args.report, args.input)
    _check_output(args.input, out, args.overwrite)  # (refused before any work)
    say = options.progress(args)
    say(f"loading {args.input} ...")
    model = _load(args.input)
    try:
        result = grow(model)
    except VerificationError as exc:
        return options.not_equivalent(args, exc)
    say(f"writing {out} ...")
    _save(args, result, out)
    rep = result.graphgrow_report
    if args.report:
        options.write_text(args.report, json.dumps(rep.to_dict(), indent=1, default=str))
    print(rep.summary())
    for note in rep.notes:
        print(f"  {note}")
    print(f"wrote {out}")
    return exit_codes.OK


def _layers(text):
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InvalidArgumentError(f"--layers takes comma-separated layer indices, not {text!r}") from None


def run_upcycle(args) -> int:
    from ..moe import upcycle

    return _run(args, lambda m: upcycle(m, args.experts, args.top_k, router=args.router, shared=args.shared,
                                        layers=_layers(args.layers), seed=args.seed, noise=args.noise,
                                        verify="none" if args.no_check else "torch"))


def run_grow(args) -> int:
    from ..moe import grow_experts

    return _run(args, lambda m: grow_experts(m, args.factor, keep_top_k=args.keep_top_k, seed=args.seed,
                                             verify="none" if args.no_check else "torch"))


def _common(p) -> None:
    p.add_argument("input", metavar="DIR", help="a Hugging Face checkpoint directory (config.json + weights)")
    p.add_argument("-o", "--output", metavar="OUT", help="output directory (default DIR-moe / DIR-experts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-check", action="store_true", help="skip the check against the input")
    p.add_argument("--report", metavar="FILE.json", help="write the report as JSON")


def add_parser(sub) -> None:
    u = sub.add_parser("upcycle", help="a dense Hugging Face checkpoint -> its mixture-of-experts twin (in memory)")
    _common(u)
    u.add_argument("--experts", type=int, default=8, help="routed experts per sparse layer (default 8)")
    u.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    u.add_argument("--router", choices=["zero", "random"], default="zero")
    u.add_argument("--shared", choices=["dense", "routed"], default=None,
                   help="families with a shared expert: which holds the dense MLP")
    u.add_argument("--layers", metavar="I,J,...", help="the layers made sparse (default all)")
    u.add_argument("--noise", type=float, default=0.0, help="noise inside the experts, x std (NOT exact)")
    u.set_defaults(func=run_upcycle)
    g = sub.add_parser("grow-experts", help="a mixture-of-experts checkpoint with every expert repeated (in memory)")
    _common(g)
    g.add_argument("--factor", type=int, default=2, help="copies of every expert (default 2)")
    g.add_argument("--keep-top-k", action="store_true", help="keep top-k (NOT exact; the deviation is reported)")
    g.set_defaults(func=run_grow)
